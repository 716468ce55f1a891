"""Augmentation on whole batches, on the device that holds them (no per-image transforms).

Each augmentation is off at strength 0 (the batch is returned untouched, no random numbers drawn),
draws its random numbers from the generator it is given (same generator state, same result), and
keeps the batch's shape and dtype (uint8 batches stay uint8, rounded).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

# Random erasing's rectangle, as torchvision's RandomErasing: 2-33% of the image, aspect 0.3-3.3.
ERASE_AREA = (0.02, 1 / 3)
ERASE_ASPECT = (0.3, 1 / 0.3)


def augmenting(cfg: Any) -> bool:
    """Whether a `TrainConfig` asks for any augmentation."""
    return bool(cfg.flip or cfg.translate or cfg.rotate or cfg.scale or cfg.erase)


def augment_batch(x: torch.Tensor, flip: bool, translate: int, generator: torch.Generator | None = None, *,
                  rotate: float = 0.0, scale: float = 0.0, erase: float = 0.0) -> torch.Tensor:
    """Random horizontal flips, translations of up to `translate` pixels, then rotation by up to
    +-`rotate` degrees and zoom by [1 - `scale`, 1 + `scale`] (one resampling), then random erasing
    with probability `erase`.

    `x` is (B, C, H, W). Translation pads with zeros and crops at a random offset per image
    (the "random crop with padding" of torchvision), done as one gather for the whole batch.
    """
    if flip:
        mask = torch.rand(x.shape[0], device=x.device, generator=generator) < 0.5
        x = torch.where(mask[:, None, None, None], x.flip(3), x)
    if translate > 0:
        shifts = torch.randint(0, 2 * translate + 1, (2, x.shape[0]), device=x.device, generator=generator) - translate
        x = shift_batch(x, shifts[0], shifts[1], translate)
    if rotate > 0 or scale > 0:
        x = rotate_scale(x, rotate, scale, generator)
    if erase > 0:
        x = random_erase(x, erase, generator)
    return x


def shift_batch(x: torch.Tensor, dy: torch.Tensor, dx: torch.Tensor, pad: int) -> torch.Tensor:
    """Each image moved by its own offsets, zero filled: ``out[i, :, r, c] = x[i, :, r + dy[i], c + dx[i]]``.

    `dy`, `dx` are (B,) integer tensors within [-pad, pad]. One gather from the zero-padded batch.
    """
    b, c, h, w = x.shape
    padded = F.pad(x, (pad,) * 4)
    rows = (torch.arange(h, device=x.device)[None, :] + (dy + pad)[:, None])  # (B, H)
    cols = (torch.arange(w, device=x.device)[None, :] + (dx + pad)[:, None])  # (B, W)
    batch = torch.arange(b, device=x.device)[:, None, None, None]
    chan = torch.arange(c, device=x.device)[None, :, None, None]
    return padded[batch, chan, rows[:, None, :, None], cols[:, None, None, :]]


def rotate_scale(x: torch.Tensor, degrees: float, scale: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Each image turned by a uniform angle in [-degrees, degrees] about its centre and zoomed by a
    uniform factor in [1 - scale, 1 + scale] (above 1 enlarges), in one affine_grid/grid_sample pass:
    bilinear, zeros outside the image."""
    if degrees <= 0 and scale <= 0:
        return x
    b = x.shape[0]
    u = torch.rand(2, b, device=x.device, generator=generator) * 2 - 1  # uniform in [-1, 1)
    angle = u[0] * math.radians(degrees)
    zoom = 1 + u[1] * scale
    cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
    zero = torch.zeros_like(cos)
    # affine_grid maps output coordinates to input ones: the inverse of "rotate by angle, enlarge by zoom".
    theta = torch.stack([torch.stack([cos, -sin, zero], 1), torch.stack([sin, cos, zero], 1)], 1)  # (B, 2, 3)
    src = x if x.is_floating_point() else x.float()
    grid = F.affine_grid(theta.to(src.dtype), list(src.shape), align_corners=False)
    out = F.grid_sample(src, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    if x.is_floating_point():
        return out
    info = torch.iinfo(x.dtype)
    return out.round_().clamp_(info.min, info.max).to(x.dtype)


def random_erase(x: torch.Tensor, p: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """With probability `p` per image, one rectangle (2-33% of the area, aspect 0.3-3.3, anywhere
    inside the image) set to zero, as torchvision's RandomErasing with value 0, for the whole batch."""
    if p <= 0:
        return x
    b, _, h, w = x.shape
    u = torch.rand(5, b, device=x.device, generator=generator)
    area = (ERASE_AREA[0] + u[0] * (ERASE_AREA[1] - ERASE_AREA[0])) * h * w
    log_lo, log_hi = math.log(ERASE_ASPECT[0]), math.log(ERASE_ASPECT[1])
    aspect = torch.exp(log_lo + u[1] * (log_hi - log_lo))
    eh = torch.sqrt(area * aspect).round().clamp(1, h)
    ew = torch.sqrt(area / aspect).round().clamp(1, w)
    top = (u[2] * (h - eh + 1)).floor()
    left = (u[3] * (w - ew + 1)).floor()
    on = u[4] < p
    rows = torch.arange(h, device=x.device)[None, :]
    cols = torch.arange(w, device=x.device)[None, :]
    in_rows = (rows >= top[:, None]) & (rows < (top + eh)[:, None])  # (B, H)
    in_cols = (cols >= left[:, None]) & (cols < (left + ew)[:, None])  # (B, W)
    mask = in_rows[:, :, None] & in_cols[:, None, :] & on[:, None, None]  # (B, H, W)
    return x.masked_fill(mask[:, None], 0)
