"""From images as users hold them to the model's input, and from the model's outputs to probabilities.

One path serves training, evaluation, the registered MLflow model and `tuning.predict`:

    encoded bytes (PNG, JPEG, BMP, ...)  --open_image-->  PIL image  --to_gray48-->  uint8 (48, 48)
    uint8 (N, 1, 48, 48)                 --to_input-->    float32 in [0, 1], the study's ToTensor scaling
    the network's outputs                --to_probabilities-->  class probabilities (softmax of logits;
                                                                  Model 1's outputs as they are)

`predict_proba` optionally averages the probabilities over test-time views of each image (`tta_views`).

Real photos, safely (`open_image`, `to_gray48`):

- At most `MAX_PIXELS` (40 megapixels) per image, checked from the header before the pixels are
  decoded; a larger image (or one Pillow calls a decompression bomb) is an `ImageTooLarge` naming the
  limit. A large JPEG is decoded at a reduced size (`image.draft`, DCT scaling to >= `DRAFT_SIZE`).
- Every mode Pillow decodes becomes 8-bit grayscale on one scale, 0 black to 255 white:
  ``1``, ``L``, ``P``, ``RGB``, ``CMYK``, ``YCbCr`` by Pillow's conversion (ITU-R 601-2 luma);
  16- and 32-bit integers (``I;16``, ``I``) scaled by their bit depth (65535 -> 255; see `_int_max`);
  floats (``F``) as grey levels 0..255, clipped, as the array input and Pillow's own conversion read
  them; transparency (``LA``, ``RGBA``, ``PA``, a palette or colour key) composited on black, i.e. the
  grey level times the opacity, as the training-time ``translate`` augmentation fills with black.
"""

from __future__ import annotations

import io
import re
import warnings
from typing import Any, Iterable

import numpy as np
import torch
from torch import nn

from fer_model.augment import shift_batch
from fer_model.config import IMAGE_SIZE, NUM_CLASSES, check_tta
from fer_model.device import fp32
from fer_model.errors import first_line

EVAL_BATCH = 1024
# "tencrop" test-time views: (rows, columns) offsets of the five shifted copies, each also mirrored.
TENCROP_SHIFT = 2
TENCROP_OFFSETS = ((0, 0), (-TENCROP_SHIFT, -TENCROP_SHIFT), (-TENCROP_SHIFT, TENCROP_SHIFT),
                   (TENCROP_SHIFT, -TENCROP_SHIFT), (TENCROP_SHIFT, TENCROP_SHIFT))


# Decoded pixels per image, checked before decoding: a 40 Mpx RGB image is 120 MB decoded, larger than
# any camera photo of a face needs, and far below what a request-sized "decompression bomb" could claim.
MAX_PIXELS = 40_000_000
# A JPEG larger than this on both sides is decoded at 1/2, 1/4 or 1/8 scale, never below it: plenty for
# a 48x48 bilinear resize, and a large photo decodes in a fraction of the time and memory.
DRAFT_SIZE = 4 * IMAGE_SIZE
_ALPHA_MODES = {"LA", "PA", "RGBA", "La", "RGBa"}


class ImageError(ValueError):
    """An input that cannot be made into a 48x48 grayscale image; the message says why."""


class ImageTooLarge(ImageError):
    """An image of more than `MAX_PIXELS` pixels; never read as anything else."""


def _too_large(what: str) -> ImageTooLarge:
    return ImageTooLarge(f"{what} exceeds the limit of {MAX_PIXELS / 1e6:g} Mpx ({MAX_PIXELS:,} pixels)")


def check_size(width: int, height: int) -> None:
    """Raise ImageTooLarge for an image of more than `MAX_PIXELS` pixels."""
    if width * height > MAX_PIXELS:
        raise _too_large(f"image of {width} x {height} = {width * height / 1e6:.1f} Mpx")


def open_image(data: bytes, draft_size: int = DRAFT_SIZE):
    """Decode image bytes with PIL (fully loaded), or raise ImageError (ImageTooLarge beyond `MAX_PIXELS`,
    known from the header before any pixel is decoded). A JPEG is decoded at the least DCT scale that keeps
    both sides >= `draft_size` (48x48 crops need `DRAFT_SIZE`; face detection more)."""
    from PIL import Image, UnidentifiedImageError

    from PIL import ImageOps

    # Pillow warns between its own limit (89.5 Mpx) and twice it, and refuses above: `check_size` refuses
    # everything over MAX_PIXELS (40 Mpx) itself, so the warning says nothing. Filtered once for the
    # process: a `catch_warnings` block per call is not thread-safe under a threaded server.
    warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)
    try:
        image = Image.open(io.BytesIO(data))  # reads the header only
        check_size(*image.size)
        if image.format in ("JPEG", "MPO"):  # MPO: the JPEGs many phones write
            image.draft(None, (draft_size, draft_size))
        image.load()
        # A phone photo is stored sideways with an EXIF orientation: upright, as a person sees it.
        return ImageOps.exif_transpose(image) if image.getexif().get(0x0112, 1) != 1 else image
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        # Pillow's check runs inside Image.open, before the size is ours to read; its message has the count.
        found = re.search(r"\((\d+) pixels\)", str(exc))
        raise _too_large(f"image of {int(found.group(1)) / 1e6:.1f} Mpx" if found else "image") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError) as exc:
        raise ImageError(f"not a readable image ({type(exc).__name__})") from None


def is_gray48(image) -> bool:
    """Whether a PIL image is already what the network sees: 48x48, 8-bit grayscale."""
    return image.mode == "L" and image.size == (IMAGE_SIZE, IMAGE_SIZE)


def _int_max(image) -> int:
    """The white level of an integer image (``I;16*``, ``I``): 2**bits - 1 for its declared bit depth.

    ``I;16*`` is 16 bits; an ``I`` image takes its depth (and signedness) from a TIFF's BitsPerSample and
    SampleFormat, a PNG's is 16 (older Pillow opened 16-bit PNGs as ``I``); one that declares none
    (made in memory) is 16 bits if its values fit, else 32."""
    if image.mode.startswith("I;16"):
        return 65535
    tags = getattr(image, "tag_v2", None)
    if tags is not None and 258 in tags:
        bits = tags[258][0] if isinstance(tags[258], tuple) else int(tags[258])
        sample_format = tags.get(339, 1)
        signed = (sample_format[0] if isinstance(sample_format, tuple) else sample_format) == 2
        return 2 ** (bits - 1) - 1 if signed else 2 ** bits - 1
    if image.format == "PNG":
        return 65535
    return 65535 if image.getextrema()[1] <= 65535 else 2 ** 31 - 1


def to_gray48(image) -> np.ndarray:
    """A PIL image of any size and mode as uint8 (48, 48): grayscale (each mode as the module docstring
    says), bilinear resize. A mode that has no grey reading is an ImageError.

    The data layer converts odd training images with this too, so a served model sees what training saw.
    """
    if is_gray48(image):
        return np.asarray(image, dtype=np.uint8)
    return to_gray(image, (IMAGE_SIZE, IMAGE_SIZE))


def to_gray(image, size: tuple[int, int] | None = None) -> np.ndarray:
    """A PIL image of any mode as uint8 grayscale (each mode as the module docstring says), at its own
    size or bilinearly resized to `size` (width, height). A mode with no grey reading is an ImageError."""
    from PIL import Image

    bilinear = Image.Resampling.BILINEAR
    resize = (lambda im: im.resize(size, bilinear)) if size else (lambda im: im)
    try:
        if image.mode.startswith("I") or image.mode == "F":
            # Resized as floats, then scaled: the 8-bit conversion would clip everything above 255 to white.
            white = 255.0 if image.mode == "F" else float(_int_max(image))
            values = np.asarray(resize(image.convert("F")), dtype=np.float64)
            values = np.nan_to_num(values, nan=0.0, posinf=white, neginf=0.0)
            return np.round(np.clip(values * (255.0 / white), 0, 255)).astype(np.uint8)
        if image.mode in _ALPHA_MODES or "transparency" in image.info:
            # Premultiplied ("La"): grey times opacity, i.e. composited on black. Through LA: Pillow 13's
            # direct RGBA -> La keeps the grey as it is.
            if image.mode != "La":
                la = image if image.mode == "LA" else image.convert("RGBA").convert("LA")
                image = la.convert("La")
            image = image.getchannel(0)
        return np.asarray(resize(image.convert("L")), dtype=np.uint8)
    except (ValueError, OSError) as exc:  # LAB: "conversion from LAB to RGB not supported"
        raise ImageError(f"cannot read a {image.mode} image as grayscale ({first_line(exc)})") from None


def _grey_array(value: Any) -> np.ndarray:
    """An array value checked: 2-D (or H x W x C) grey levels within 0..255, of at most `MAX_PIXELS`;
    H x W x 1 becomes 2-D."""
    try:
        array = np.asarray(value)
    except (TypeError, ValueError):
        raise ImageError(f"expected image bytes or an array of grey levels, got {type(value).__name__}") from None
    if array.dtype == object or array.dtype.kind not in "uif" or array.ndim not in (2, 3):
        raise ImageError(f"expected image bytes or a 2-D (or H x W x C) array of grey levels, "
                         f"got {type(value).__name__} of shape {array.shape}")
    check_size(array.shape[1], array.shape[0])  # before the value checks, which pass over every pixel
    if array.size == 0 or not np.isfinite(array).all() or array.min() < 0 or array.max() > 255:
        raise ImageError("array values must be grey levels within 0..255")
    return array[:, :, 0] if array.ndim == 3 and array.shape[2] == 1 else array


def image_array(value: Any) -> np.ndarray:
    """One image as users hold it as uint8 (48, 48): encoded bytes (PNG, JPEG, BMP, TIFF, ...), the 2,304
    raw bytes of a 48x48 uint8 array, or an array of grey levels (or H x W x C colours) of up to
    `MAX_PIXELS` pixels. Anything else is an ImageError saying why."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        data = bytes(value)
        try:
            return to_gray48(open_image(data))
        except ImageTooLarge:
            raise
        except ImageError:
            if len(data) == IMAGE_SIZE * IMAGE_SIZE:  # raw grey levels: a 48x48 uint8 array's tobytes()
                return np.frombuffer(data, dtype=np.uint8).reshape(IMAGE_SIZE, IMAGE_SIZE).copy()
            raise
    array = _grey_array(value)
    from PIL import Image

    if array.ndim == 2 and array.shape == (IMAGE_SIZE, IMAGE_SIZE):
        return array.astype(np.uint8)
    try:
        return to_gray48(Image.fromarray(array.astype(np.uint8)))
    except (TypeError, ValueError) as exc:
        raise ImageError(f"cannot read an array of shape {array.shape} as an image ({exc})") from None


def image_gray(value: Any, draft_size: int = DRAFT_SIZE) -> np.ndarray:
    """One image as users hold it (as `image_array` takes it) as uint8 grayscale at its own size: what a
    face detector looks at. The 2,304 raw bytes of a 48x48 array stay 48x48."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        data = bytes(value)
        try:
            return to_gray(open_image(data, draft_size))
        except ImageTooLarge:
            raise
        except ImageError:
            if len(data) == IMAGE_SIZE * IMAGE_SIZE:
                return np.frombuffer(data, dtype=np.uint8).reshape(IMAGE_SIZE, IMAGE_SIZE).copy()
            raise
    array = _grey_array(value)
    if array.ndim == 2:
        return array.astype(np.uint8)
    from PIL import Image

    try:
        return to_gray(Image.fromarray(array.astype(np.uint8)))
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
