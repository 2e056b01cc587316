"""Image sizes and resampling for tensors in [0, 1]."""

import torch
import torch.nn.functional as F


def fit_longer_side(height: int, width: int, longer: int) -> tuple[int, int]:
    """(height, width) scaled so that the longer side is `longer`, aspect ratio kept, sides at least 1."""
    if max(height, width) == longer:
        return height, width
    scale = longer / max(height, width)
    return max(1, round(height * scale)), max(1, round(width * scale))


def resize(images: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(..., 3, H, W) -> (..., 3, h, w), antialiased bicubic, clamped to [0, 1]; unchanged when already that size.

    Returns a new tensor or `images` itself; it never writes into `images`.
    """
    if tuple(images.shape[-2:]) == tuple(size):
        return images
    batched = images.dim() == 4
    out = F.interpolate(images if batched else images.unsqueeze(0), size=size, mode="bicubic",
                        align_corners=False, antialias=True).clamp(0, 1)
    return out if batched else out.squeeze(0)
