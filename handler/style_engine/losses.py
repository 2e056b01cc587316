"""The seed's objective (docs/method.md), per image of a batch.

content = content_weight * mean((F_target - F_content)^2) on the content layer
style   = style_weight * sum_l w_l * mean((G_target - G_style)^2) / (d*h*w),  G = F F^T unnormalised
tv      = tv_weight * (mean of squared differences between neighbouring pixels)   (not in the seed; off by default)

With masks (spatial control, Gatys et al. 2017), each style k has a term of its own, from the guided Gram
G_k = sum_p m_k(p)^2 F_p F_p^T, its mask m_k taken to the layer's resolution (targets.py says how and what G_k
is compared with):

style   = style_weight * sum_l w_l * sum_k blend_k * mean((G_k - T_k)^2) / (d * sum_p m_k(p)^2)

which is the seed's term with the region's size, sum_p m_k(p)^2, in place of h*w: an all-white mask is the seed's
term exactly; blend_k is style k's style_blend weight over their sum, so the weights of the terms sum to 1, as
they do without masks. It is computed as the seed's / (d*h*w), times blend_k * h*w / sum_p m_k(p)^2
(`term_weights`), so that with one all-white mask every operation is the seed's but a multiplication by 1.0.
"""

from dataclasses import dataclass

import torch
from torch import nn


# Rows (positions) per tile of the Gram computation: 4 MiB of float32 per tile at 64 channels.
GRAM_TILE_BYTES = 4 * 2**20
# Relative margin by which a sum of some of the loss terms must exceed a bound to tell that the total does: more
# than the rounding of summing a few terms in another order (about 1e-7), far less than a loss ever differs by.
ROUNDING = 1e-4


def gram_matrix(features: torch.Tensor, position_weights: torch.Tensor | None = None) -> torch.Tensor:
    """(B, C, H, W) -> (B, C, C), F F^T with F of shape (C, H*W), unnormalised, always in float32. With
    `position_weights` (B, K, H, W), the squares of K masks: (B, K, C, C), each mask's guided Gram
    F_k F_k^T = sum_p m_k(p)^2 F_p F_p^T with F_k = F * m_k (Gatys et al. 2017).

    Under bf16 autocast the activations are bf16, but a Gram sums H*W products: in bf16 its 8-bit mantissa
    would lose most of the style signal, so it is taken in float32. It is taken as P^T P with P = F^T of shape
    (H*W, C), which is a view of channels_last activations (vgg.py): flattening them as (C, H*W) instead copied
    them, and the gradient that came back in that layout made each addition to the convolutions'
    channels_last gradients slow (a step at 256 px cost 17 % more). _TiledGram does the rest.
    """
    b, c, h, w = features.shape
    with torch.autocast(features.device.type, enabled=False):
        positions = features.permute(0, 2, 3, 1).reshape(b, h * w, c)
        weights = None if position_weights is None else position_weights.reshape(b, -1, h * w)
        return _TiledGram.apply(positions, weights)


class _TiledGram(torch.autograd.Function):
    """G = P^T P over tiles of positions, and its gradient 2 P sym(dG) the same way; with weights W (B, K, N)
    G_k = P^T diag(W_k) P for each k, and the gradient sum_k diag(W_k) P sym(dG_k).

    Autograd's own version of P^T P keeps a float32 copy of bf16 activations for its backward pass, and its
    backward pass computes two products of P's size and adds them; here only P itself is kept (and the
    weights, which are the objective's), each tile is taken to float32 on its own, and the gradient, linear in
    P once the Gram is known, is written tile by tile into one tensor of P's size and dtype. Same result to
    float rounding; on 2 CPU cores the Grams of a 256 px step took a third of the time. The weights multiply
    each float32 tile: weighted, a tile is K float32 tiles, never a copy of all the activations per mask.
    """

    @staticmethod
    def forward(ctx, positions: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(positions, weights)
        gram = None
        for tile, tile_weights in _tiles(positions, weights):
            tile = tile.float()
            if tile_weights is None:
                part = tile.transpose(1, 2) @ tile
            else:
                part = _weighted(tile, tile_weights).transpose(-2, -1) @ tile.unsqueeze(1)
            gram = part if gram is None else gram.add_(part)
        return gram

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        positions, weights = ctx.saved_tensors
        symmetric = grad + grad.transpose(-2, -1)
        result = torch.empty_like(positions)
        for (tile, tile_weights), (out, _) in zip(_tiles(positions, weights), _tiles(result, None)):
            tile = tile.float()
            out.copy_(tile @ symmetric if tile_weights is None else (_weighted(tile, tile_weights) @ symmetric).sum(1))
        return result, None


def _weighted(tile: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """(B, n, C) float32 positions times (B, K, n) weights: (B, K, n, C)."""
    return tile.unsqueeze(1) * weights.unsqueeze(-1)


def _tiles(positions: torch.Tensor, weights: torch.Tensor | None):
    """Views of (B, N, C) positions, consecutive rows of about GRAM_TILE_BYTES in float32, each with the
    views of the same rows of (B, K, N) weights (None without)."""
    rows = max(1, GRAM_TILE_BYTES // (4 * positions.shape[2]))
    return ((positions[:, start:start + rows], None if weights is None else weights[..., start:start + rows])
            for start in range(0, positions.shape[1], rows))


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

    def detached(self) -> "Losses":
        return Losses(*(term.detach() for term in self.terms()))

    def as_floats(self, item: int = 0) -> dict[str, float]:
        terms = torch.stack([self.content[item], self.style[item], self.tv[item], self.total[item]]).tolist()
        return dict(zip(("content", "style", "tv", "total"), terms))


class StyleObjective(nn.Module):
    """The loss of a batch of target images against fixed targets, held as buffers.

    content_target: (B, C, h, w) activations of the content images on `content_layer`; None until
                    take_content_target is given the first pass over the content images (targets.py).
    style_targets:  {layer: (B, C, C)} Gram matrices the targets' Grams should match (already blended,
                    and scaled to the target's number of positions; see targets.py); with `guidance`,
                    {layer: (B, K, C, C)}, one per style.
    guidance:       None, or with masks {layer: (position_weights (B, K, h, w), the squares of the masks at
                    the layer's resolution, term_weights (B, K))}: each style's guided Gram is compared with its
                    own target (module docstring).
    style_factor:   multiplies the style term; 1 at the output size (see targets.py for coarse scales).
    content_images: with no content_target, the content images (B, 3, H, W) whose pass gives it.
    """

    def __init__(self, content_target, style_targets, *, content_layer, style_layers, content_weight,
                 style_weight, tv_weight, style_factor: float = 1.0, guidance: dict | None = None,
                 content_images: torch.Tensor | None = None):
        super().__init__()
        self.content_layer = content_layer
        self.style_layer_weights = dict(style_layers)
        self.guided = guidance is not None
        self.register_buffer("content_target", content_target)
        self.content_images = None if content_target is not None else content_images
        for layer, gram in style_targets.items():
            self.register_buffer(f"gram_{layer}", gram)
        for layer, (position_weights, term_weights) in (guidance or {}).items():
            self.register_buffer(f"position_weights_{layer}", position_weights)
            self.register_buffer(f"term_weights_{layer}", term_weights)
        self.content_weight = content_weight
        self.style_weight = style_weight * style_factor
        self.tv_weight = tv_weight

    def take_content_target(self, images: torch.Tensor, features: dict[str, torch.Tensor]) -> None:
        """Where the content target is still to come, take it from `features`, a pass over `images`, which
        must be the content images (`content_images`): their activations are the target."""
        if self.content_target is None:
            if not torch.equal(images, self.content_images):
                raise ValueError("the content target is taken from the first pass over the content images, "
                                 "but the images evaluated first are others")
            self.content_target = features[self.content_layer].detach().float()
            self.content_images = None

    @property
    def layers(self) -> set[str]:
        """The layers the extractor must return for this objective."""
        return {self.content_layer, *self.style_layer_weights}

    def forward(self, features: dict[str, torch.Tensor], images: torch.Tensor) -> Losses:
        positions = {layer: activation.shape[-2] * activation.shape[-1] for layer, activation in features.items()}
        return self.losses_from(self.statistics(features), images, positions)

    def statistics(self, features: dict[str, torch.Tensor], crop=None) -> dict[str, torch.Tensor]:
        """What the loss needs of a pass, as sums over positions: "content", the content layer's squared
        difference from its target (B,), and per weighted style layer its Gram (guided: one per style).

        `crop`, for a pass over part of the image (localized.py), maps a layer to the (rows, columns) slices of
        the whole image's activation that `features` hold: the target and masks are cut to them. The sums of
        the parts' statistics are the whole image's, which is what makes localized passes exact."""
        window = (lambda layer: (slice(None), slice(None))) if crop is None else crop
        content = features[self.content_layer].float() - self.content_target[(..., *window(self.content_layer))]
        grams = {layer: self._gram(layer, features[layer], window(layer)) for layer in self._weighted()}
        return {"content": content.pow(2).sum(dim=(1, 2, 3)), **grams}

    def losses_from(self, statistics: dict[str, torch.Tensor], images: torch.Tensor,
                    positions: dict[str, int]) -> Losses:
        """The losses of `images` (B, 3, H, W), the whole images, whose pass gave `statistics` (summed over
        parts, where the pass was by parts), `positions` the whole activation's h*w on each layer."""
        style_terms = {layer: self.style_layer_weights[layer] * self._gram_error(layer, statistics[layer])
                       / (statistics[layer].shape[-1] * positions[layer]) for layer in self._weighted()}
        return self._losses(statistics["content"] / self.content_target[0].numel(), style_terms, images)

    def total_unless_above(self, stream, images: torch.Tensor, bound: torch.Tensor) -> torch.Tensor:
        """The total loss (B,) of `images`, whose pass `stream` yields (layer, activation) in the network's
        order (VGGFeatures.stream), or, once for every image the terms so far exceed `bound` (B,) by more than
        rounding (every term is at least 0), their sum so far, without the rest of the pass: either compares
        with `bound` as the total would."""
        weighted, content, terms = set(self._weighted()), None, {}
        tv = self.tv_weight * total_variation(images) if self.tv_weight else torch.zeros_like(bound)
        for layer, activation in stream:
            if layer == self.content_layer:
                content = self._content_term(activation)
            if layer in weighted:
                terms[layer] = self._style_term(layer, activation)
            so_far = self.style_weight * sum(terms.values(), torch.zeros_like(bound)) + tv
            so_far = so_far if content is None else so_far + self.content_weight * content
            if len(terms) < len(weighted) or content is None:
                if bool((so_far > bound * (1 + ROUNDING)).all()):
                    return so_far
        return self._losses(content, terms, images).total

    def _weighted(self) -> list[str]:
        return [layer for layer, weight in self.style_layer_weights.items() if weight != 0]

    def _content_term(self, activation: torch.Tensor) -> torch.Tensor:
        return (activation.float() - self.content_target).pow(2).mean(dim=(1, 2, 3))

    def _style_term(self, layer: str, activation: torch.Tensor) -> torch.Tensor:
        _, d, h, w = activation.shape
        gram = self._gram(layer, activation, (slice(None), slice(None)))
        return self.style_layer_weights[layer] * self._gram_error(layer, gram) / (d * h * w)

    def _losses(self, content: torch.Tensor, style_terms: dict[str, torch.Tensor], images: torch.Tensor) -> Losses:
        """The weighted terms, each layer's style term added in the order of style_layers."""
        style = torch.zeros_like(content)
        for layer in self._weighted():
            style = style + style_terms[layer]
        tv = total_variation(images) if self.tv_weight else torch.zeros_like(content)
        return Losses(self.content_weight * content, self.style_weight * style, self.tv_weight * tv)

    def _gram(self, layer: str, features: torch.Tensor, window: tuple[slice, slice]) -> torch.Tensor:
        """The Gram of `features` on `layer` (guided: one per style, with the masks cut to `window`)."""
        if not self.guided:
            return gram_matrix(features)
        return gram_matrix(features, getattr(self, f"position_weights_{layer}")[(..., *window)])

    def _gram_error(self, layer: str, gram: torch.Tensor) -> torch.Tensor:
        """(B,): mean((G - G_style)^2) of each image on `layer`; guided, the sum over its styles of that of
        each style's guided Gram, times the style's term weight."""
        target = getattr(self, f"gram_{layer}")
        if not self.guided:
            return (gram - target).pow(2).mean(dim=(1, 2))
        return ((gram - target).pow(2).mean(dim=(2, 3)) * getattr(self, f"term_weights_{layer}")).sum(1)
