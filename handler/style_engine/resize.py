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


MASK_LEVELS = 255  # a mask is an 8-bit grey image (codec.decode_mask)


def resize_mask(masks: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(..., H, W) masks in [0, 1] resampled to `size` with weights that are never negative (bilinear,
    antialiased), so that values stay in [0, 1] and a hard edge comes out soft, never ringing as bicubic
    would; then rounded back to the 1/255 steps of the 8-bit image they came from. The rounding keeps white
    exactly 1 and black exactly 0: a resampling's weights need not sum to exactly 1 in float32, and an
    all-white mask must leave the objective exactly as no mask does. Returns `masks` itself when already
    that size, else a new tensor."""
    if tuple(masks.shape[-2:]) == tuple(size):
        return masks
    flat = masks.reshape(-1, 1, *masks.shape[-2:])
    out = F.interpolate(flat, size=size, mode="bilinear", align_corners=False, antialias=True)
    return out.mul(MASK_LEVELS).round().div(MASK_LEVELS).reshape(*masks.shape[:-2], *size)
