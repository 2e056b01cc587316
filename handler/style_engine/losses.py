"""The seed's objective (CONTRACT.md, "The seed's loss"), per image of a batch.

content = content_weight * mean((F_target - F_content)^2) on the content layer
style   = style_weight * sum_l w_l * mean((G_target - G_style)^2) / (d*h*w),  G = F F^T unnormalised
tv      = tv_weight * (mean of squared differences between neighbouring pixels)   (not in the seed; off by default)
"""

from dataclasses import dataclass

import torch
from torch import nn


# Rows (positions) per tile of the Gram computation: 4 MiB of float32 per tile at 64 channels.
GRAM_TILE_BYTES = 4 * 2**20


def gram_matrix(features: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, C, C), F F^T with F of shape (C, H*W), unnormalised, always in float32.

    Under bf16 autocast the activations are bf16, but a Gram sums H*W products: in bf16 its 8-bit mantissa
    would lose most of the style signal, so it is taken in float32. It is taken as P^T P with P = F^T of shape
    (H*W, C), which is a view of channels_last activations (vgg.py): flattening them as (C, H*W) instead copied
    them, and the gradient that came back in that layout made each addition to the convolutions'
    channels_last gradients slow (a step at 256 px cost 17 % more). _TiledGram does the rest.
    """
    b, c, h, w = features.shape
    with torch.autocast(features.device.type, enabled=False):
        return _TiledGram.apply(features.permute(0, 2, 3, 1).reshape(b, h * w, c))


class _TiledGram(torch.autograd.Function):
    """G = P^T P over tiles of positions, and its gradient 2 P sym(dG) the same way.

    Autograd's own version of P^T P keeps a float32 copy of bf16 activations for its backward pass, and its
    backward pass computes two products of P's size and adds them; here only P itself is kept, each tile is
    taken to float32 on its own, and the gradient, linear in P once the Gram is known, is written tile by
    tile into one tensor of P's size and dtype. Same result to float rounding; on 2 CPU cores the Grams of a
    256 px step took a third of the time.
    """

    @staticmethod
    def forward(ctx, positions: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(positions)
        gram = None
        for tile in _tiles(positions):
            tile = tile.float()
            part = tile.transpose(1, 2) @ tile
            gram = part if gram is None else gram.add_(part)
        return gram

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        (positions,) = ctx.saved_tensors
        symmetric = grad + grad.transpose(1, 2)
        result = torch.empty_like(positions)
        for tile, out in zip(_tiles(positions), _tiles(result)):
            out.copy_(tile.float() @ symmetric)
        return result


def _tiles(positions: torch.Tensor):
    """Views of (B, N, C) positions, consecutive rows of about GRAM_TILE_BYTES in float32."""
    rows = max(1, GRAM_TILE_BYTES // (4 * positions.shape[2]))
    return (positions[:, start:start + rows] for start in range(0, positions.shape[1], rows))


def total_variation(images: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) -> (B,): mean squared difference of vertically plus horizontally neighbouring pixels."""
    dy = (images[:, :, 1:, :] - images[:, :, :-1, :]).pow(2).mean(dim=(1, 2, 3))
    dx = (images[:, :, :, 1:] - images[:, :, :, :-1]).pow(2).mean(dim=(1, 2, 3))
    return dy + dx


@dataclass(frozen=True)
class Losses:
    """Weighted loss terms, each of shape (B,): what is reported, and `total` is what is minimised."""

    content: torch.Tensor
    style: torch.Tensor
    tv: torch.Tensor

    def terms(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.content, self.style, self.tv

    @property
    def total(self) -> torch.Tensor:
        return self.content + self.style + self.tv

    def as_floats(self, item: int = 0) -> dict[str, float]:
        terms = torch.stack([self.content[item], self.style[item], self.tv[item], self.total[item]]).tolist()
        return dict(zip(("content", "style", "tv", "total"), terms))


class StyleObjective(nn.Module):
    """The loss of a batch of target images against fixed targets, held as buffers.

    content_target: (B, C, h, w) activations of the content images on `content_layer`.
    style_targets:  {layer: (B, C, C)} Gram matrices the targets' Grams should match (already blended,
                    and scaled to the target's number of positions; see targets.py).
    style_factor:   multiplies the style term; 1 at the output size (see targets.py for coarse scales).
    """

    def __init__(self, content_target, style_targets, *, content_layer, style_layers, content_weight,
                 style_weight, tv_weight, style_factor: float = 1.0):
        super().__init__()
        self.content_layer = content_layer
        self.style_layer_weights = dict(style_layers)
        self.register_buffer("content_target", content_target)
        for layer, gram in style_targets.items():
            self.register_buffer(f"gram_{layer}", gram)
        self.content_weight = content_weight
        self.style_weight = style_weight * style_factor
        self.tv_weight = tv_weight

    @property
    def layers(self) -> set[str]:
        """The layers the extractor must return for this objective."""
        return {self.content_layer, *self.style_layer_weights}

    def forward(self, features: dict[str, torch.Tensor], images: torch.Tensor) -> Losses:
        content = (features[self.content_layer].float() - self.content_target).pow(2).mean(dim=(1, 2, 3))
        style = torch.zeros_like(content)
        for layer, weight in self.style_layer_weights.items():
            if weight == 0:
                continue
            _, d, h, w = features[layer].shape
            difference = gram_matrix(features[layer]) - getattr(self, f"gram_{layer}")
            style = style + weight * difference.pow(2).mean(dim=(1, 2)) / (d * h * w)
        tv = total_variation(images) if self.tv_weight else torch.zeros_like(content)
        return Losses(self.content_weight * content, self.style_weight * style, self.tv_weight * tv)
