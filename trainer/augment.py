"""Augmentations on batches of preprocessed tensors (N, C, H, W), on whatever device they live.

Weak: a small random shift (and a flip where the classes allow it). Strong, for FixMatch and
SimCLR: a larger random affine warp, contrast and brightness jitter, and a cut-out square.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def weak(
    images: torch.Tensor, flip: bool, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Shift by up to 1/8 of the side (reflected borders), flip half the batch if `flip`."""
    return _warp(images, shift=0.125, rotate=0.0, scale=0.0, flip=flip, generator=generator)


def strong(
    images: torch.Tensor, flip: bool, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Affine warp, contrast/brightness jitter and a cut-out: hard to tell apart, same class."""
    warped = _warp(images, shift=0.2, rotate=math.radians(20), scale=0.2, flip=flip,
                   generator=generator)
    n = images.shape[0]
    contrast = _uniform((n, 1, 1, 1), 0.6, 1.4, images, generator)
    brightness = _uniform((n, 1, 1, 1), -0.4, 0.4, images, generator)
    mean = warped.mean(dim=(1, 2, 3), keepdim=True)
    jittered = (warped - mean) * contrast + mean + brightness
    return _cut_out(jittered, fraction=0.4, generator=generator)


def _uniform(
    shape: tuple[int, ...], low: float, high: float, like: torch.Tensor,
    generator: torch.Generator | None,
) -> torch.Tensor:
    sample = torch.rand(shape, generator=generator)  # sampled on the CPU: same draws anywhere
    return (low + (high - low) * sample).to(like.device, like.dtype)


def _warp(
    images: torch.Tensor, *, shift: float, rotate: float, scale: float, flip: bool,
    generator: torch.Generator | None,
) -> torch.Tensor:
    n = images.shape[0]
    angle = _uniform((n,), -rotate, rotate, images, generator)
    zoom = _uniform((n,), 1 - scale, 1 + scale, images, generator)
    mirror = torch.ones(n, device=images.device, dtype=images.dtype)
    if flip:
        mirror = torch.where(_uniform((n,), 0, 1, images, generator) < 0.5, -mirror, mirror)
    cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
    offset = _uniform((n, 2), -2 * shift, 2 * shift, images, generator)  # grid spans -1..1
    theta = torch.stack(
        [torch.stack([cos * mirror, -sin, offset[:, 0]], 1),
         torch.stack([sin * mirror, cos, offset[:, 1]], 1)], 1
    )
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, padding_mode="reflection", align_corners=False)


def _cut_out(
    images: torch.Tensor, fraction: float, generator: torch.Generator | None
) -> torch.Tensor:
    n, _, height, width = images.shape
    side_h, side_w = max(1, int(height * fraction)), max(1, int(width * fraction))
    top = (_uniform((n,), 0, 1, images, generator) * (height - side_h + 1)).long()
    left = (_uniform((n,), 0, 1, images, generator) * (width - side_w + 1)).long()
    rows = torch.arange(height, device=images.device)
    cols = torch.arange(width, device=images.device)
    in_rows = (rows[None] >= top[:, None]) & (rows[None] < (top + side_h)[:, None])
    in_cols = (cols[None] >= left[:, None]) & (cols[None] < (left + side_w)[:, None])
    hole = (in_rows[:, :, None] & in_cols[:, None, :])[:, None]
    return images.masked_fill(hole, 0.0)
