"""Keeping the content's colours (Gatys et al. 2016, "Preserving color in neural artistic style transfer").

`luminance`: the optimisation runs as usual; afterwards the result keeps its own luminance (Y of YIQ) and takes
the content's chrominance (I, Q), as jcjohnson/neural-style's `-original_colors 1` does. Exact up to clamping
to [0, 1] where the combined colour falls outside the RGB cube.
`histogram`: before the optimisation, each style image is recoloured so that its pixels' mean and covariance
match the content's (a linear colour transfer), so the style's textures arrive in the content's palette.
"""

import torch

# NTSC YIQ, the colour space Gatys et al. use for luminance-only transfer.
_RGB_TO_YIQ = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])


def rgb_to_yiq(images: torch.Tensor) -> torch.Tensor:
    """(..., 3, H, W) RGB -> YIQ."""
    return torch.einsum("ij,...jhw->...ihw", _RGB_TO_YIQ.to(images), images)


def yiq_to_rgb(images: torch.Tensor) -> torch.Tensor:
    return torch.einsum("ij,...jhw->...ihw", torch.linalg.inv(_RGB_TO_YIQ).to(images), images)


def keep_content_chroma(result: torch.Tensor, content: torch.Tensor) -> torch.Tensor:
    """result's luminance with content's chrominance; both (3, H, W) in [0, 1] and the same size."""
    yiq = torch.cat([rgb_to_yiq(result)[:1], rgb_to_yiq(content)[1:]])
    return yiq_to_rgb(yiq).clamp(0, 1)


def match_colors(style: torch.Tensor, content: torch.Tensor) -> torch.Tensor:
    """style (3, h, w) recoloured so that its RGB mean and covariance equal content's (3, H, W)."""
    style_pixels, content_pixels = style.flatten(1).double(), content.flatten(1).double()
    style_mean, content_mean = style_pixels.mean(1, keepdim=True), content_pixels.mean(1, keepdim=True)
    # x -> C_c^(1/2) C_s^(-1/2) (x - mu_s) + mu_c maps the style's covariance C_s onto the content's C_c.
    transform = _sqrtm(_covariance(content_pixels)) @ torch.linalg.inv(_sqrtm(_covariance(style_pixels)))
    recoloured = transform @ (style_pixels - style_mean) + content_mean
    return recoloured.reshape(style.shape).to(style.dtype).clamp(0, 1)


def _covariance(pixels: torch.Tensor) -> torch.Tensor:
    # A small ridge keeps flat (e.g. greyscale) images invertible.
    return torch.cov(pixels) + 1e-5 * torch.eye(3, dtype=pixels.dtype, device=pixels.device)


def _sqrtm(matrix: torch.Tensor) -> torch.Tensor:
    values, vectors = torch.linalg.eigh(matrix)
    return vectors @ torch.diag(values.clamp_min(0).sqrt()) @ vectors.T
