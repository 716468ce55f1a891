"""From images as users hold them to the model's input, and from the model's outputs to probabilities.

One path serves training, evaluation, the registered MLflow model and `tuning.predict`:

    encoded bytes (PNG, JPEG, BMP, ...)  --open_image-->  PIL image  --to_gray48-->  uint8 (48, 48)
    uint8 (N, 1, 48, 48)                 --to_input-->    float32 in [0, 1], the study's ToTensor scaling
    the network's outputs                --to_probabilities-->  class probabilities (softmax of logits;
                                                                  Model 1's outputs as they are)

`predict_proba` optionally averages the probabilities over test-time views of each image (`tta_views`).
"""

from __future__ import annotations

import io
from typing import Any, Iterable

import numpy as np
import torch
from torch import nn

from fer_model.augment import shift_batch
from fer_model.config import IMAGE_SIZE, NUM_CLASSES, check_tta
from fer_model.device import fp32

EVAL_BATCH = 1024
# "tencrop" test-time views: (rows, columns) offsets of the five shifted copies, each also mirrored.
TENCROP_SHIFT = 2
TENCROP_OFFSETS = ((0, 0), (-TENCROP_SHIFT, -TENCROP_SHIFT), (-TENCROP_SHIFT, TENCROP_SHIFT),
                   (TENCROP_SHIFT, -TENCROP_SHIFT), (TENCROP_SHIFT, TENCROP_SHIFT))


class ImageError(ValueError):
    """An input that cannot be made into a 48x48 grayscale image; the message says why."""


def open_image(data: bytes):
    """Decode image bytes with PIL (fully loaded), or raise ImageError."""
    from PIL import Image, UnidentifiedImageError

    try:
        image = Image.open(io.BytesIO(data))
        image.load()
        return image
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise ImageError(f"not a readable image ({type(exc).__name__})") from None


def is_gray48(image) -> bool:
    """Whether a PIL image is already what the network sees: 48x48, 8-bit grayscale."""
    return image.mode == "L" and image.size == (IMAGE_SIZE, IMAGE_SIZE)


def to_gray48(image) -> np.ndarray:
    """A PIL image of any size and mode as uint8 (48, 48): grayscale, bilinear resize.

    The data layer converts odd training images with this too, so a served model sees what training saw.
    """
    from PIL import Image

    if not is_gray48(image):
        image = image.convert("L").resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BILINEAR)
    return np.asarray(image, dtype=np.uint8)


def image_array(value: Any) -> np.ndarray:
    """One image as users hold it as uint8 (48, 48): encoded bytes (PNG, JPEG, BMP, ...), the 2,304 raw
    bytes of a 48x48 uint8 array, or an array of grey levels (or H x W x C colours) of any size."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        data = bytes(value)
        try:
            return to_gray48(open_image(data))
        except ImageError:
            if len(data) == IMAGE_SIZE * IMAGE_SIZE:  # raw grey levels: a 48x48 uint8 array's tobytes()
                return np.frombuffer(data, dtype=np.uint8).reshape(IMAGE_SIZE, IMAGE_SIZE).copy()
            raise
    try:
        array = np.asarray(value)
    except (TypeError, ValueError):
        raise ImageError(f"expected image bytes or an array of grey levels, got {type(value).__name__}") from None
    if array.dtype == object or array.dtype.kind not in "uif" or array.ndim not in (2, 3):
        raise ImageError(f"expected image bytes or a 2-D (or H x W x C) array of grey levels, "
                         f"got {type(value).__name__} of shape {array.shape}")
    if array.size == 0 or not np.isfinite(array).all() or array.min() < 0 or array.max() > 255:
        raise ImageError("array values must be grey levels within 0..255")
    from PIL import Image

    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if array.ndim == 2 and array.shape == (IMAGE_SIZE, IMAGE_SIZE):
        return array.astype(np.uint8)
    try:
        return to_gray48(Image.fromarray(array.astype(np.uint8)))
    except (TypeError, ValueError) as exc:
        raise ImageError(f"cannot read an array of shape {array.shape} as an image ({exc})") from None


def image_batch(values: Iterable[Any]) -> torch.Tensor:
    """Images as users hold them -> uint8 (N, 1, 48, 48), the form the data layer keeps images in.

    A value that is not an image raises ImageError naming its row (``row 1: not a readable image``)."""
    arrays = []
    for i, value in enumerate(values):
        try:
            arrays.append(image_array(value))
        except ImageError as exc:
            raise ImageError(f"row {i}: {exc}") from None
    if not arrays:
        return torch.zeros(0, 1, IMAGE_SIZE, IMAGE_SIZE, dtype=torch.uint8)
    return torch.from_numpy(np.stack(arrays)[:, None])


def to_input(images: torch.Tensor, channels_last: bool = False) -> torch.Tensor:
    """uint8 (B, 1, 48, 48) -> float in [0, 1], the network's input."""
    x = images.float().div_(255.0)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


@torch.no_grad()
def predict_outputs(model: nn.Module, images: torch.Tensor, device: torch.device | str | None = None,
                    batch_size: int = EVAL_BATCH, channels_last: bool = True) -> torch.Tensor:
    """The network's raw outputs for uint8 images, in batches, as float32 on the CPU (N, 7).

    Always computed in fp32 (`fer_model.device.fp32`), whatever the machine and even inside a training
    step's bf16 autocast: bf16 outputs moved the Softmax net's probability sums to 0.999023 and made
    one set of weights score differently on CPUs with and without native bf16."""
    device = torch.device(device) if device else next(model.parameters()).device
    was_training = model.training
    model.eval()
    outs = [torch.zeros(0, NUM_CLASSES)]
    with fp32():
        for i in range(0, images.shape[0], batch_size):
            x = to_input(images[i:i + batch_size].to(device, non_blocking=True), channels_last)
            outs.append(model(x).float().cpu())
    model.train(was_training)
    return torch.cat(outs)


def to_probabilities(outputs: torch.Tensor, outputs_probabilities: bool) -> torch.Tensor:
    """Class probabilities from a network's outputs: softmax of logits; a Softmax net's outputs as they are."""
    return outputs if outputs_probabilities else outputs.softmax(dim=1)


def tta_views(images: torch.Tensor, tta: str) -> list[torch.Tensor]:
    """The views of uint8 images (B, 1, 48, 48) that test-time augmentation `tta` averages over.

    - ``none``: the images.
    - ``flip``: the images and their horizontal mirrors.
    - ``tencrop``: ten views. Ten-crop as published takes the centre and four corner crops, smaller than
      the image, each also mirrored, for a network built for the crop's size. The networks here take
      48x48 only, so the five crops are five 48x48 copies of the image: unshifted and shifted by
      `TENCROP_SHIFT` pixels diagonally towards each corner, zero filled as the training-time
      ``translate`` augmentation fills them (`fer_model.augment.shift_batch`); each is also mirrored.

    An unknown `tta` is a ConfigError.
    """
    check_tta(tta)
    if tta == "none":
        return [images]
    if tta == "flip":
        return [images, images.flip(3)]
    views = []
    for dy, dx in TENCROP_OFFSETS:
        offsets = [torch.full((images.shape[0],), d, dtype=torch.long, device=images.device) for d in (dy, dx)]
        shifted = shift_batch(images, *offsets, TENCROP_SHIFT) if dy or dx else images
        views += [shifted, shifted.flip(3)]
    return views


def predict_proba(model: nn.Module, images: torch.Tensor, outputs_probabilities: bool, tta: str = "none",
                  batch_size: int = EVAL_BATCH, **kw: Any) -> torch.Tensor:
    """Class probabilities (N, 7) of uint8 images; with test-time augmentation `tta` (see `tta_views`),
    each image's probabilities are the mean of its views'. `kw` goes to `predict_outputs`."""
    if check_tta(tta) == "none":
        return to_probabilities(predict_outputs(model, images, batch_size=batch_size, **kw), outputs_probabilities)
    probs = [torch.zeros(0, NUM_CLASSES)]
    for i in range(0, images.shape[0], batch_size):  # views of one batch at a time: memory stays one batch's
        views = tta_views(images[i:i + batch_size], tta)
        probs.append(torch.stack([to_probabilities(predict_outputs(model, v, batch_size=batch_size, **kw),
                                                   outputs_probabilities) for v in views]).mean(0))
    return torch.cat(probs)
