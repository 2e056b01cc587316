"""The seed's objective (CONTRACT.md, "The seed's loss"), per image of a batch.

content = content_weight * mean((F_target - F_content)^2) on the content layer
style   = style_weight * sum_l w_l * mean((G_target - G_style)^2) / (d*h*w),  G = F F^T unnormalised
tv      = tv_weight * (mean of squared differences between neighbouring pixels)   (not in the seed; off by default)

With masks (spatial control, Gatys et al. 2017), each style k has a term of its own, from the guided Gram
G_k = sum_p m_k(p)^2 F_p F_p^T, its mask m_k taken to the layer's resolution (targets.py says how and what G_k
is compared with):

style   = style_weight * sum_l w_l * sum_k blend_k * mean((G_k - T_k)^2) / (d * sum_p m_k(p)^2)

which is the seed's term with the region's size, sum_p m_k(p)^2, in place of h*w: an all-white mask is the seed's
term exactly. It is computed as the seed's / (d*h*w), times blend_k * h*w / sum_p m_k(p)^2 (`term_weights`), so
that with an all-white mask every operation is the seed's but a multiplication by 1.0.
"""

from dataclasses import dataclass

import torch
from torch import nn


def gram_matrix(features: torch.Tensor, masks: torch.Tensor | None = None) -> torch.Tensor:
    """(B, C, H, W) -> (B, C, C), F F^T with F of shape (C, H*W), unnormalised, always computed in float32.
    With `masks` (B, K, H, W): (B, K, C, C), the guided Gram of each mask, F_k F_k^T with F_k = F * m_k.

    Under bf16 autocast the activations are bf16, but a Gram sums H*W products: in bf16 its 8-bit mantissa
    would lose most of the style signal, so autocast is switched off and the product taken in fp32.
    It is taken as P^T P with P = F^T of shape (H*W, C), which is a view of channels_last activations
    (vgg.py): flattening them as (C, H*W) instead copied them, and the gradient that came back in that layout
    made each addition to the convolutions' channels_last gradients slow: a step at 256 px cost 17 % more.
    """
    b, c, h, w = features.shape
    with torch.autocast(features.device.type, enabled=False):
        positions = features.permute(0, 2, 3, 1).reshape(b, h * w, c).float()  # (B, H*W, C)
        if masks is not None:  # float32 masks on float32 activations: bf16 would round the products
            positions = positions.unsqueeze(1) * masks.reshape(b, -1, h * w, 1)  # (B, K, H*W, C)
        return positions.transpose(-2, -1) @ positions


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
                    and scaled to the target's number of positions; see targets.py); with `guidance`,
                    {layer: (B, K, C, C)}, one per style.
    guidance:       None, or with masks {layer: (masks (B, K, h, w) at the layer's resolution, term_weights
                    (B, K))}: each style's guided Gram is compared with its own target (module docstring).
    style_factor:   multiplies the style term; 1 at the output size (see targets.py for coarse scales).
    """

    def __init__(self, content_target, style_targets, *, content_layer, style_layers, content_weight,
                 style_weight, tv_weight, style_factor: float = 1.0, guidance: dict | None = None):
        super().__init__()
        self.content_layer = content_layer
        self.style_layer_weights = dict(style_layers)
        self.guided = guidance is not None
        self.register_buffer("content_target", content_target)
        for layer, gram in style_targets.items():
            self.register_buffer(f"gram_{layer}", gram)
        for layer, (masks, term_weights) in (guidance or {}).items():
            self.register_buffer(f"masks_{layer}", masks)
            self.register_buffer(f"term_weights_{layer}", term_weights)
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
            style = style + weight * self._squared_error(layer, features[layer]) / (d * h * w)
        tv = total_variation(images) if self.tv_weight else torch.zeros_like(content)
        return Losses(self.content_weight * content, self.style_weight * style, self.tv_weight * tv)

    def _squared_error(self, layer: str, features: torch.Tensor) -> torch.Tensor:
        """(B,): mean((G - G_style)^2) of each image on `layer`; guided, the sum over its styles of that of
        each style's guided Gram, times the style's term weight."""
        target = getattr(self, f"gram_{layer}")
        if not self.guided:
            return (gram_matrix(features) - target).pow(2).mean(dim=(1, 2))
        masks, term_weights = getattr(self, f"masks_{layer}"), getattr(self, f"term_weights_{layer}")
        return ((gram_matrix(features, masks) - target).pow(2).mean(dim=(2, 3)) * term_weights).sum(1)
