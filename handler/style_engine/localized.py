"""Localized passes: the objective and its exact gradient with respect to the image, one tile at a time, so that
the memory of the forward and backward passes is one tile's, whatever the image's size (Galerne et al., "Scaling
Painting Style Transfer", CGF 2024).

Every statistic the objective needs is a sum over positions (StyleObjective.statistics: the content term's
squared differences, each style layer's Gram). A tile owns a rectangle of the image; it is run through VGG19
with a margin around it wide enough that the activations at the positions it owns are the whole image's
(the margin covers the part of the receptive field that the tile's own zero padding would corrupt, and every
tile starts at a multiple of the deepest layer's stride, so its poolings pair the same pixels as the whole
image's). Then:

- pass 1, without gradients: the sum over tiles of each tile's statistics on the positions it owns is the
  whole image's; the loss follows from them (and from the image itself, for the total variation);
- pass 2, with gradients: the loss's gradient with respect to each statistic is computed once (the statistics
  are small: a number per image, a C x C Gram per layer); each tile's share of the image's gradient is the
  gradient of sum_s <dL/ds, s_tile>, its statistics weighted by those, and the shares add up to the gradient.

The total variation, a function of the image alone, is differentiated on the whole image, as in a full pass.
"""

import math
from dataclasses import dataclass

import torch

from .layers import LAYER_INDEX, LAYER_NAMES, deepest, poolings_before
from .losses import Losses, StyleObjective, gram_matrix


@dataclass(frozen=True)
class Tile:
    """A rectangle of the image a tile owns, (top, bottom) x (left, right) in pixels, and the larger one it
    runs VGG19 on: the owned one with the margin, within the image."""

    owned: tuple[int, int, int, int]  # top, bottom, left, right
    run: tuple[int, int, int, int]

    def pixels(self) -> tuple[slice, slice]:
        """The slices of the image this tile runs on."""
        top, bottom, left, right = self.run
        return slice(top, bottom), slice(left, right)

    def owned_at(self, layer: str, whole: bool) -> tuple[slice, slice]:
        """The positions this tile owns at `layer`: in the whole image's activation (`whole`), else in the tile's."""
        halvings = poolings_before(layer)
        top, bottom, left, right = (edge >> halvings for edge in self.owned)
        if whole:
            return slice(top, bottom), slice(left, right)
        run_top, run_left = self.run[0] >> halvings, self.run[2] >> halvings
        return slice(top - run_top, bottom - run_top), slice(left - run_left, right - run_left)


def alignment(layers) -> int:
    """What a tile's edges must be multiples of: the stride of the deepest layer."""
    return 2 ** poolings_before(deepest(layers))


def margin(layers) -> int:
    """The pixels around a tile whose activations at `layers` are the whole image's on the positions it owns.

    A tile's edge, padded with zeros where the image goes on, corrupts one more position inward with each 3x3
    convolution, and a pooling halves the corrupted band (rounding up); the margin is the widest band, in
    pixels, over the layers used, rounded up to the alignment. (For conv5_1, 5 positions of 16 px: 80 px.)"""
    corrupted, widest = 0, 0
    for name in LAYER_NAMES[: LAYER_INDEX[deepest(layers)] + 1]:
        if name.startswith("conv"):
            corrupted += 1
        elif name.startswith("pool"):
            corrupted = math.ceil(corrupted / 2)
        if name in layers:
            widest = max(widest, corrupted << poolings_before(name))
    step = alignment(layers)
    return math.ceil(widest / step) * step


def tiles(size: tuple[int, int], tile: int, layers) -> list[Tile]:
    """The tiles of an image of `size` (H, W), each owning at most `tile` x `tile` pixels: as few as that allows,
    of even sizes, their edges multiples of the alignment (the last one ends with the image)."""
    step, pad = alignment(layers), margin(layers)
    rows, cols = (_cuts(side, tile, step) for side in size)
    return [Tile((top, bottom, left, right),
                 (max(0, top - pad), min(size[0], bottom + pad), max(0, left - pad), min(size[1], right + pad)))
            for top, bottom in rows for left, right in cols]


def _cuts(side: int, tile: int, step: int) -> list[tuple[int, int]]:
    """[start, end) intervals covering 0..side, starting at multiples of `step`, as few as intervals of at most
    `tile` (rounded down to a multiple of `step`) allow, of even lengths. A last interval shorter than `step`
    joins the one before it: it would own no position at the deepest layer."""
    tile = max(step, tile // step * step)
    length = math.ceil(side / math.ceil(side / tile) / step) * step
    edges = list(range(0, side, length))
    while len(edges) > 1 and side - edges[-1] < step:
        edges.pop()
    return list(zip(edges, edges[1:] + [side]))


class LocalizedPass:
    """The objective's losses and gradient for images x by tiles of at most `tile` px a side; the same numbers
    as a full pass through `extractor` (to float rounding). `run_pass(images, layers)` runs the extractor in the
    pass's precision and grad mode (optimize._Run supplies it), returning {layer: activation}."""

    @staticmethod
    def splits(size: tuple[int, int], tile: int | None, layers) -> bool:
        """Whether tiles of at most `tile` px split an image of `size`: where one tile covers it, a full pass is
        the same work without the first pass."""
        return tile is not None and len(tiles(size, tile, layers)) > 1

    def __init__(self, objective: StyleObjective, run_pass, tile: int):
        self.objective, self.run_pass, self.tile = objective, run_pass, tile
        self.layers = sorted(objective.layers, key=LAYER_INDEX.__getitem__)

    def evaluate(self, x: torch.Tensor, grad: bool) -> Losses:
        """The losses of images x (B, 3, H, W); with grad, x.grad holds their gradient (added to any there)."""
        images, parts = x.detach(), tiles(tuple(x.shape[-2:]), self.tile, self.layers)
        if self.objective.content_target is None:
            self._take_content_target(parts)
        statistics, held = self._first_pass(images, parts, grad)
        positions = {layer: (x.shape[-2] >> poolings_before(layer)) * (x.shape[-1] >> poolings_before(layer))
                     for layer in self.layers}
        if not grad:
            return self.objective.losses_from(statistics, images, positions).detached()
        leaves = {name: value.requires_grad_(True) for name, value in statistics.items()}
        image = images.detach().requires_grad_(True)
        with torch.enable_grad():
            losses = self.objective.losses_from(leaves, image, positions)
            losses.total.sum().backward()  # a sum keeps each image's gradient its own
        gradient = torch.zeros_like(image) if image.grad is None else image.grad  # None without a TV term
        self._second_pass(images, gradient, parts, leaves, held)
        x.grad = gradient if x.grad is None else x.grad + gradient
        return losses.detached()

    def _first_pass(self, images: torch.Tensor, parts: list[Tile], grad: bool) -> tuple[dict, tuple]:
        """Pass 1: the whole image's statistics, summed over the tiles. The last tile's pass runs with gradients
        where `grad` and is held, (its pixels, its statistics with their graph): its backward pass is that tile's
        pass 2, one tile's forward pass fewer per iteration, in no more memory (no other pass is alive then)."""
        *others, last = parts
        with torch.no_grad():
            statistics = self._statistics(images, others)
        held = images[(..., *last.pixels())].clone().requires_grad_(grad)
        with torch.set_grad_enabled(grad):
            held_statistics = self._tile_statistics(held, last, whole=False)
        statistics = _added(statistics, {name: value.detach() for name, value in held_statistics.items()})
        return statistics, (held, held_statistics)

    def _second_pass(self, images: torch.Tensor, gradient: torch.Tensor, parts: list[Tile],
                     leaves: dict[str, torch.Tensor], held: tuple) -> None:
        """Pass 2: each tile's share of the gradient added into `gradient`, the held last tile's first."""
        *others, last = parts
        gradient[(..., *last.pixels())] += _share(*held, leaves)
        for part in others:
            gradient[(..., *part.pixels())] += self._share(images, part, leaves)

    def _statistics(self, images: torch.Tensor, parts: list[Tile]) -> dict[str, torch.Tensor] | None:
        """Pass 1: the sums over tiles of the statistics of the positions each owns (None for no tiles)."""
        total = None
        for part in parts:
            total = _added(total, self._tile_statistics(images, part))
        return total

    def _share(self, images: torch.Tensor, part: Tile, leaves: dict[str, torch.Tensor]) -> torch.Tensor:
        """Pass 2 for one tile: its share of the gradient, on the pixels it runs on."""
        crop = images[(..., *part.pixels())].clone().requires_grad_(True)
        with torch.enable_grad():
            return _share(crop, self._tile_statistics(crop, part, whole=False), leaves)

    def _tile_statistics(self, images: torch.Tensor, part: Tile, whole: bool = True) -> dict[str, torch.Tensor]:
        """The statistics of the positions `part` owns, from a pass over its pixels: `images` are the whole
        images (whole=True) or already cut to the part."""
        owned = owned_features(self.run_pass, images, part, self.layers, whole)
        return self.objective.statistics(owned, crop=lambda layer: part.owned_at(layer, whole=True))

    def _take_content_target(self, parts: list[Tile]) -> None:
        """The content target assembled tile by tile from the content images, where a full pass would take it
        from its first pass over them."""
        contents, layer = self.objective.content_images, self.objective.content_layer
        assembled = None
        with torch.no_grad():
            for part in parts:
                owned = owned_features(self.run_pass, contents, part, [layer])[layer]
                if assembled is None:
                    halvings = poolings_before(layer)
                    shape = (*owned.shape[:2], contents.shape[-2] >> halvings, contents.shape[-1] >> halvings)
                    assembled = owned.new_empty(shape)
                assembled[(..., *part.owned_at(layer, whole=True))] = owned
        self.objective.take_content_target(contents, {layer: assembled})


def _added(total: dict | None, statistics: dict) -> dict:
    return statistics if total is None else {name: total[name] + value for name, value in statistics.items()}


def _share(crop: torch.Tensor, statistics: dict[str, torch.Tensor], leaves: dict[str, torch.Tensor]) -> torch.Tensor:
    """The gradient, with respect to a tile's pixels `crop`, of its `statistics` (with their graph) weighted by
    the loss's gradient with respect to the whole image's (`leaves`' gradients): the tile's share."""
    with torch.enable_grad():
        surrogate = sum((leaves[name].grad * value).sum() for name, value in statistics.items()
                        if leaves[name].grad is not None)
        surrogate.backward()
    return crop.grad


def owned_features(run_pass, images: torch.Tensor, part: Tile, layers, whole: bool = True) -> dict[str, torch.Tensor]:
    """{layer: the activation at the positions `part` owns} from a pass over its pixels of `images`, the whole
    images (whole=True) or already cut to the part."""
    features = run_pass(images[(..., *part.pixels())] if whole else images, layers)
    return {layer: activation[(..., *part.owned_at(layer, whole=False))] for layer, activation in features.items()}


def tiled_grams(run_pass, images: torch.Tensor, layers, tile: int) -> dict[str, torch.Tensor]:
    """{layer: Gram (B, C, C)} of images (B, 3, H, W), summed over the tiles of at most `tile` px that split them:
    the whole images' Grams, one tile's pass at a time (the style targets of an image too large for one pass)."""
    total: dict[str, torch.Tensor] = {}
    for part in tiles(tuple(images.shape[-2:]), tile, layers):
        for layer, owned in owned_features(run_pass, images, part, layers).items():
            gram = gram_matrix(owned)
            total[layer] = gram if layer not in total else total[layer] + gram
    return total
