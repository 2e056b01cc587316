"""Image sizes and resampling."""

import torch
import torch.nn.functional as F


def fit_longer_side(height: int, width: int, longer: int) -> tuple[int, int]:
    """(height, width) scaled so that the longer side is `longer`, aspect ratio kept, sides at least 1."""
    if max(height, width) == longer:
        return height, width
    scale = longer / max(height, width)
    return max(1, round(height * scale)), max(1, round(width * scale))


def resample(tensors: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(..., C, H, W) -> (..., C, h, w), antialiased bicubic, values left as they come: for signed data such as
    the change an optimisation made to an image. Returns `tensors` itself when already that size, else a new
    tensor; it never writes into `tensors`."""
    if tuple(tensors.shape[-2:]) == tuple(size):
        return tensors
    batched = tensors.dim() == 4
    out = F.interpolate(tensors if batched else tensors.unsqueeze(0), size=size, mode="bicubic",
                        align_corners=False, antialias=True)
    return out if batched else out.squeeze(0)


def resize(images: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Images in [0, 1] resampled to `size` and clamped back into [0, 1] (bicubic overshoots at edges)."""
    out = resample(images, size)
    return out if out is images else out.clamp(0, 1)
