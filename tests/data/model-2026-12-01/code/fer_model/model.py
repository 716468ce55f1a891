"""The networks. `build_model(spec)` is the one factory; `fer_model.config.ARCHITECTURES` declares
each architecture's options (and checks them), this file holds the modules that use them.

* ``cnn``          the study's "Model 2": logits out (the default).
* ``cnn-softmax``  the study's "Model 1": the same net ending in Softmax, whose probabilities the
                   study fed to CrossEntropyLoss (so softmax is applied twice): 54.22% vs 57.72%.
* ``cnn-bn``       the study's net with BatchNorm after every convolution (and `width`).
* ``vgg``          VGG-style with BatchNorm, after Khaireddin & Chen 2021 (73.28% on FER2013).
* ``resnet``       a small ResNet of basic blocks for 48x48 grayscale.

`width` scales every channel count and hidden layer, rounded to a multiple of 8 (at least 8):
at 1.0 the nets are as described.
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

    def __init__(self, dropout: float = 0.5, conv3_channels: int = 128, hidden: int = 128, softmax_output: bool = False,
                 batch_norm: bool = False, width: float = 1.0):
        super().__init__()
        c1, c2, conv3_channels, hidden = (_scaled(c, width) for c in (32, 64, conv3_channels, hidden))

        def conv(cin: int, cout: int) -> list[nn.Module]:  # the study's conv (bias kept), BN if asked
            return [nn.Conv2d(cin, cout, 3, padding=1), *([nn.BatchNorm2d(cout)] if batch_norm else []),
                    nn.ReLU(inplace=True)]

        self.features = nn.Sequential(
            *conv(1, c1), *conv(c1, c2),
            nn.MaxPool2d(2),
            *conv(c2, conv3_channels),
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


def _scaled(channels: int, width: float) -> int:
    """`channels` x `width`, rounded to a multiple of 8 (at least 8); unchanged at width 1 for multiples of 8."""
    if width == 1.0:
        return channels
    return max(8, int(round(channels * width / 8)) * 8)


def _conv_bn_relu(cin: int, cout: int, stride: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


class VGG(nn.Module):
    """Four stages of (conv3x3-BN-ReLU) x `depth` + max-pool, channels 64, 128, 256, 512 (x `width`):
    48 -> 24 -> 12 -> 6 -> 3; then FC(512·3·3 -> 4096)-ReLU-Dropout-FC(4096 -> 4096)-ReLU-Dropout-FC(-> 7).

    Khaireddin & Chen (2021), "Facial Emotion Recognition: State of the Art Performance on FER2013":
    their VGG variant is this with depth 2, on 40x40 crops (so 2x2 after the last pool).
    """

    def __init__(self, dropout: float = 0.5, width: float = 1.0, depth: int = 2):
        super().__init__()
        layers: list[nn.Module] = []
        cin = 1
        for channels in (64, 128, 256, 512):
            cout = _scaled(channels, width)
            for i in range(depth):
                layers += _conv_bn_relu(cin if i == 0 else cout, cout)
            layers.append(nn.MaxPool2d(2))
            cin = cout
        self.features = nn.Sequential(*layers)
        side, hidden = IMAGE_SIZE // 16, _scaled(4096, width)
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(cin * side * side, hidden), nn.ReLU(inplace=True), nn.Dropout(dropout),
            nn.Linear(hidden, hidden), nn.ReLU(inplace=True), nn.Dropout(dropout),
            nn.Linear(hidden, NUM_CLASSES),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN, plus the input (a strided 1x1 conv + BN where the shape changes), ReLU."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.body = nn.Sequential(
            *_conv_bn_relu(cin, cout, stride),
            nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout),
        )
        self.shortcut = (nn.Identity() if stride == 1 and cin == cout else
                         nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.body(x) + self.shortcut(x))


class ResNet(nn.Module):
    """Stem conv3x3(1 -> 32)-BN-ReLU at 48x48, then four stages of `depth` basic blocks with 32, 64, 128,
    256 channels (x `width`) at 48, 24, 12, 6 pixels (each later stage starts with stride 2), global
    average pool, dropout, FC(-> 7). Depth 2 is the ResNet-18 layout at half its channels, the
    CIFAR-style stem (no 7x7 conv, no max-pool) for small images.
    """

    def __init__(self, dropout: float = 0.5, width: float = 1.0, depth: int = 2):
        super().__init__()
        stem = _scaled(32, width)
        layers: list[nn.Module] = _conv_bn_relu(1, stem)
        cin = stem
        for stage, channels in enumerate((32, 64, 128, 256)):
            cout = _scaled(channels, width)
            for i in range(depth):
                layers.append(BasicBlock(cin, cout, 2 if stage > 0 and i == 0 else 1))
                cin = cout
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(dropout), nn.Linear(cin, NUM_CLASSES))
        for m in self.modules():  # each block starts as the identity (its last BN at zero): trains deep nets stably
            if isinstance(m, BasicBlock):
                nn.init.zeros_(m.body[-1].weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


# One builder per name in fer_model.config.ARCHITECTURES; each takes that architecture's options.
_BUILDERS: dict[str, Callable[..., nn.Module]] = {
    "cnn": lambda **o: StudyCNN(**o),
    "cnn-softmax": lambda **o: StudyCNN(**o, softmax_output=True),
    "cnn-bn": lambda **o: StudyCNN(**o, batch_norm=True),
    "vgg": lambda **o: VGG(**o),
    "resnet": lambda **o: ResNet(**o),
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
