"""Augmentation on whole batches, on the device that holds them (no per-image transforms)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def augment_batch(x: torch.Tensor, flip: bool, translate: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Random horizontal flips and random translations of up to `translate` pixels.

    `x` is (B, C, H, W). Translation pads with zeros and crops at a random offset per image
    (the "random crop with padding" of torchvision), done as one gather for the whole batch.
    """
    if flip:
        mask = torch.rand(x.shape[0], device=x.device, generator=generator) < 0.5
        x = torch.where(mask[:, None, None, None], x.flip(3), x)
    if translate > 0:
        b, c, h, w = x.shape
        padded = F.pad(x, (translate,) * 4)
        shifts = torch.randint(0, 2 * translate + 1, (2, b), device=x.device, generator=generator)
        rows = (torch.arange(h, device=x.device)[None, :] + shifts[0][:, None])  # (B, H)
        cols = (torch.arange(w, device=x.device)[None, :] + shifts[1][:, None])  # (B, W)
        batch = torch.arange(b, device=x.device)[:, None, None, None]
        chan = torch.arange(c, device=x.device)[None, :, None, None]
        x = padded[batch, chan, rows[:, None, :, None], cols[:, None, None, :]]
    return x
