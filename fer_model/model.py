"""The networks. `build_model(spec)` is the one factory; `fer_model.config.ARCHITECTURES` declares
each architecture's options (and checks them), this file holds the modules that use them.

* ``cnn``          the study's "Model 2": logits out (the default).
* ``cnn-softmax``  the study's "Model 1": the same net ending in Softmax, whose probabilities the
                   study fed to CrossEntropyLoss (so softmax is applied twice): 54.22% vs 57.72%.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from fer_model.config import ARCHITECTURES, IMAGE_SIZE, NUM_CLASSES, ModelSpec


class StudyCNN(nn.Module):
    """Conv(1→32)–ReLU–Conv(32→64)–ReLU–Pool–Conv(64→C3)–ReLU–Pool–FC(C3·12·12→H)–ReLU–Dropout–FC(H→7).

    With C3 = H = 128 it has exactly the study's 2,452,999 parameters. Input: float (B, 1, 48, 48)
    scaled to [0, 1].
    """

    def __init__(self, dropout: float = 0.5, conv3_channels: int = 128, hidden: int = 128, softmax_output: bool = False):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(64, conv3_channels, 3, padding=1), nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
        )
        side = IMAGE_SIZE // 4
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(conv3_channels * side * side, hidden), nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(hidden, NUM_CLASSES),
        )
        self.softmax_output = softmax_output

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.classifier(self.features(x))
        return out.softmax(dim=1) if self.softmax_output else out


# One builder per name in fer_model.config.ARCHITECTURES; each takes that architecture's options.
_BUILDERS: dict[str, Callable[..., nn.Module]] = {
    "cnn": lambda **o: StudyCNN(**o),
    "cnn-softmax": lambda **o: StudyCNN(**o, softmax_output=True),
}
assert set(_BUILDERS) == set(ARCHITECTURES), "every declared architecture needs a builder"


def build_model(spec: ModelSpec) -> nn.Module:
    """The network `spec` describes (its options were checked when the spec was made)."""
    return _BUILDERS[spec.arch](**spec.options)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def forward_flops(model: nn.Module) -> int:
    """Multiply-accumulates x 2 of one 48x48 image's forward pass (convolutions and linear layers)."""
    flops = 0

    def hook(module: nn.Module, _inp, out) -> None:
        nonlocal flops
        if isinstance(module, nn.Conv2d):
            k = module.kernel_size[0] * module.kernel_size[1] * module.in_channels // module.groups
            flops += 2 * k * out[0].numel()
        elif isinstance(module, nn.Linear):
            flops += 2 * module.in_features * module.out_features

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros(1, 1, IMAGE_SIZE, IMAGE_SIZE, device=next(model.parameters()).device))
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return flops


def save_network(model: nn.Module, spec: ModelSpec, path) -> None:
    """A network as plain PyTorch: its spec (plain values) and its state_dict, on the CPU."""
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    torch.save({"spec": spec.to_dict(), "state_dict": state}, path)


def load_network(path) -> tuple[nn.Module, ModelSpec]:
    """Read `save_network`'s file with ``weights_only=True`` (no pickled code) into an eval-mode network."""
    saved = torch.load(path, map_location="cpu", weights_only=True)
    spec = ModelSpec.from_dict(saved["spec"])
    model = build_model(spec)
    model.load_state_dict(saved["state_dict"])
    return model.eval(), spec
