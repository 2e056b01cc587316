"""What a request's optimisation aims at, computed once per request and scale, never per step."""

import hashlib
import math
from collections import OrderedDict
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from .color import match_colors
from .layers import deepest, poolings_before
from .errors import ImageError, ParamError, TooLargeError
from .localized import LocalizedPass, tiled_grams
from .losses import StyleObjective, gram_matrix
from .params import StyleParams
from .precision import extractor_precision
from .resize import fit_longer_side, resize, resize_mask
from .stages import CONTENT_TARGET, STYLE_TARGETS, mark
from .vgg import VGGFeatures


@dataclass(frozen=True)
class StyleJob:
    """One request: RGB images (3, H, W) in [0, 1] at their own resolution, and its parameters.

    styles: the uploaded style images, then the images of the presets named in params.presets, in that order.
    masks:  grey images (1, H, W) in [0, 1], any size: masks[k] is where styles[k] applies (white fully, black
            not at all); at most one per style, and a style past the last mask applies everywhere, as with an
            all-white mask. With masks, each style has its own guided style term (losses.py).
    init_image: where the optimisation starts with init="image" (stretched to the output's shape).
    """

    content: torch.Tensor
    styles: tuple[torch.Tensor, ...]
    params: StyleParams
    masks: tuple[torch.Tensor, ...] = ()
    init_image: torch.Tensor | None = None


def shrink_to_need(job: StyleJob) -> StyleJob:
    """The job with each image reduced to the largest size the optimisation uses (the content, masks and
    init_image to the output size, a style image to its size at the output scale); smaller style images stay
    as they are.

    A decoded 40 MP photo holds 480 MB as float32; at most a few MB of it can matter for the result.
    """
    output = output_size(job)
    return replace(job, content=resize(job.content, output),
                   styles=tuple(_shrink(style, style_size(style, output, job.params.style_scale))
                                for style in job.styles),
                   masks=tuple(resize_mask(mask, output) for mask in job.masks),
                   init_image=None if job.init_image is None else resize(job.init_image, output))


def _shrink(image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """`image` resized to `size` when that has fewer pixels, else `image` itself."""
    height, width = image.shape[-2:]
    return resize(image, size) if size[0] * size[1] < height * width else image


def output_size(job: StyleJob) -> tuple[int, int]:
    return fit_longer_side(*job.content.shape[-2:], job.params.size)


def style_size(style: torch.Tensor, scale_size: tuple[int, int], style_scale: float) -> tuple[int, int]:
    """A style image keeps its aspect ratio; its longer side is style_scale times the output's at this scale."""
    return fit_longer_side(*style.shape[-2:], max(1, round(max(scale_size) * style_scale)))


def smallest_side(params: StyleParams) -> int:
    """Shorter side an image needs for its activation on the deepest used layer to be at least 1x1."""
    return 2 ** poolings_before(deepest([params.content_layer, *dict(params.style_layers)]))


def style_field(job: StyleJob, index: int) -> str:
    """The request field styles[index] came from: style, style_2, ... for uploads, then presets."""
    if index >= len(job.styles) - len(job.params.presets):
        return "presets"
    return "style" if index == 0 else f"style_{index + 1}"


def is_preset(job: StyleJob, index: int) -> bool:
    return style_field(job, index) == "presets"


def check_job(job: StyleJob, extractor: VGGFeatures, max_style_pixels: int | None = None,
              max_styles: int | None = None) -> None:
    """Raise a RequestError for a request this extractor cannot serve, before any heavy work.

    `max_style_pixels` bounds each style image's pixels at the output scale: the Gram targets are computed
    before the optimisation starts, so no time budget can interrupt them, and style_scale can make a style
    image many times larger than the output. `max_styles` bounds the styles, uploaded and named together."""
    _check_sources(job, max_styles)
    params = job.params
    if extractor.check_layers([params.content_layer]):
        raise ParamError("content_layer", f"content_layer {params.content_layer!r} is deeper than this "
                                          f"model's deepest layer {extractor.deepest_layer}")
    too_deep = extractor.check_layers(dict(params.style_layers))
    if too_deep:
        raise ParamError("style_layers", f"style_layers: {too_deep!r} is deeper than this model's deepest "
                                         f"layer {extractor.deepest_layer}")
    if params.style_blend is not None and len(params.style_blend) != len(job.styles):
        raise ParamError("style_blend", f"style_blend must have one weight per style image: "
                                        f"{len(job.styles)} image(s), {len(params.style_blend)} weight(s)")
    needed, out = smallest_side(params), output_size(job)
    if min(out) < needed:
        raise ImageError("content", f"content image of {job.content.shape[-1]}x{job.content.shape[-2]} px "
                                    f"gives a {out[1]}x{out[0]} px output at size {params.size}; "
                                    f"both sides must be at least {needed} px")
    for i, style in enumerate(job.styles):
        part = style_field(job, i)
        height, width = style_size(style, out, params.style_scale)
        if min(height, width) < needed:
            raise ImageError(part, f"{part} image of {style.shape[-1]}x{style.shape[-2]} px is too narrow at "
                                   f"style_scale {params.style_scale:g}: both sides must reach {needed} px")
        if max_style_pixels is not None and height * width > max_style_pixels:
            largest = largest_style_scale(style, out, max_style_pixels)
            raise TooLargeError("style_scale", f"style_scale {params.style_scale:g} makes {part} {width}x{height} "
                                               f"= {height * width} px at size {params.size}; at most "
                                               f"{max_style_pixels} px are allowed: style_scale at most "
                                               f"{largest:g} for this image")


def _check_sources(job: StyleJob, max_styles: int | None) -> None:
    """At least one style, no more than `max_styles`, at most one mask per style, and an init_image exactly
    when init is "image"."""
    styles, presets = len(job.styles), len(job.params.presets)
    if not styles:
        raise ImageError("style", "no style image: send one as the part style (more as style_2, ...) or name "
                                  "presets (GET /models/style_transfer?customized=true lists them)")
    if max_styles is not None and styles > max_styles:
        raise TooLargeError("presets" if presets else "style",
                            f"{styles - presets} uploaded and {presets} preset style(s): at most {max_styles} "
                            f"styles are allowed")
    if len(job.masks) > styles:
        raise ImageError(f"mask_{styles + 1}", f"{len(job.masks)} masks for {styles} style(s): mask_1, mask_2, "
                                               f"... pair with the styles in order (uploads, then presets), at "
                                               f"most one each")
    if job.params.init == "image" and job.init_image is None:
        raise ImageError("init_image", "init is \"image\" but the image part init_image is missing")
    if job.params.init != "image" and job.init_image is not None:
        raise ImageError("init_image", f"init_image was sent but init is {job.params.init!r}: set init to "
                                       f"\"image\" to start from it")


def largest_style_scale(style: torch.Tensor, output: tuple[int, int], max_pixels: int) -> float:
    """The largest style_scale, in hundredths, at which `style` has at most `max_pixels` px for this output."""
    height, width = style.shape[-2:]
    # pixels grow with the square of the scale; the sides' rounding moves the exact answer a little either way
    estimate = math.sqrt(max_pixels / (height * width)) * max(height, width) / max(output)
    scale = math.ceil(100 * estimate) / 100 + 0.02
    while scale > 0.01 and math.prod(style_size(style, output, scale)) > max_pixels:
        scale = round(scale - 0.01, 2)
    return scale


class GramCache:
    """Least-recently-used style Grams, so that a style image sent again costs no VGG forward pass.

    Keyed by a digest of the style image (and of the content, where the style is recoloured to it), the size
    the extractor sees it at, the layers, pooling, precision and the extractor's weights; an entry holds about
    2.5 MB for the default layers.

    Pinned entries (the server's presets) are kept apart, in a pool of their own: uploads never evict them,
    however many arrive. That pool is bounded too, least recently used first, since every output size,
    style_scale, layer set, pooling and precision a request asks for is an entry of its own.
    """

    def __init__(self, capacity: int = 32, pinned_capacity: int = 64):
        self.hits, self.misses = 0, 0
        self._pools = {False: (OrderedDict(), capacity), True: (OrderedDict(), pinned_capacity)}

    def get(self, key: tuple, compute, pinned: bool = False):
        entries, capacity = self._pools[pinned]
        if key in entries:
            self.hits += 1
            entries.move_to_end(key)
            return entries[key]
        self.misses += 1
        value = entries[key] = compute()
        if len(entries) > capacity:
            entries.popitem(last=False)
        return value


def image_digest(image: torch.Tensor) -> str:
    """A digest of an image's exact values, which identifies it in a GramCache."""
    return hashlib.blake2b(image.detach().float().cpu().contiguous().numpy().tobytes(), digest_size=16).hexdigest()


def style_keys(job: StyleJob) -> tuple[tuple[str, str | None], ...]:
    """What identifies each style image of a job in a GramCache, apart from sizes and settings: its digest and,
    where it is recoloured to the content (preserve_color histogram), the content's."""
    content = image_digest(job.content) if job.params.preserve_color == "histogram" else None
    return tuple((image_digest(style), content) for style in job.styles)


def style_grams(extractor: VGGFeatures, image: torch.Tensor, params: StyleParams, bf16: bool,
                tile: int | None = None) -> dict[str, tuple[torch.Tensor, int]]:
    """{layer: ((C, C) unnormalised Gram, number of positions h*w)} of one style image (3, h, w) as it is; by
    tiles of at most `tile` px a side where they split it (localized.py)."""
    layers, size = dict(params.style_layers), tuple(image.shape[-2:])

    def run_pass(images: torch.Tensor, wanted) -> dict[str, torch.Tensor]:
        return extractor(images, wanted, params.pooling)

    with mark(STYLE_TARGETS, image):
        with torch.no_grad(), extractor_precision(image.device, bf16):
            if LocalizedPass.splits(size, tile, layers):
                grams = tiled_grams(run_pass, image.unsqueeze(0), layers, tile)
            else:
                grams = {layer: gram_matrix(f) for layer, f in run_pass(image.unsqueeze(0), layers).items()}
        return {layer: (gram[0], _positions(layer, size)) for layer, gram in grams.items()}


def build_objective(extractor: VGGFeatures, jobs: list[StyleJob], size: tuple[int, int],
                    output: tuple[int, int], bf16: bool, cache: GramCache | None = None,
                    keys: list[tuple] | None = None, first_images: torch.Tensor | None = None,
                    tile: int | None = None) -> StyleObjective:
    """The objective for a batch of jobs optimised at `size` (H, W) on the way to `output` (H, W).

    With a `cache`, `keys` holds style_keys(job) for each job, taken once per request (hashing an image
    on the device would copy it to the host). `first_images`, the images the objective will evaluate first:
    where they are the content images at `size` (a start from the content), the content target comes from
    that evaluation's pass (StyleObjective.take_content_target) rather than from a pass of its own. With `tile`,
    passes over an image that tiles of at most `tile` px a side split go by tiles (localized.py): the content
    target's then comes from the first localized pass, which assembles it, and the style Grams are summed over
    tiles, so that no pass runs over a whole image of that size."""
    params = jobs[0].params
    contents = torch.stack([resize(job.content, size) for job in jobs])
    content_target = None
    content_by_tiles = LocalizedPass.splits(size, tile, [params.content_layer, *dict(params.style_layers)])
    if not content_by_tiles and (first_images is None or not torch.equal(first_images, contents)):
        with torch.no_grad(), extractor_precision(contents.device, bf16), mark(CONTENT_TARGET, contents):
            content_target = extractor(contents, [params.content_layer], params.pooling)[params.content_layer].float()
    keys = keys or [None] * len(jobs)
    guidance = None
    if jobs[0].masks:  # batch_key: either every job of a batch has masks, and as many styles, or none has
        per_job = [_guided_targets(extractor, job, content, size, bf16, cache, job_keys, tile)
                   for job, content, job_keys in zip(jobs, contents, keys)]
        stacked = {layer: [torch.stack(part) for part in zip(*(guided[layer] for guided in per_job))]
                   for layer in per_job[0]}
        style_targets = {layer: targets for layer, (targets, _, _) in stacked.items()}
        guidance = {layer: (position_weights, term_weights)
                    for layer, (_, position_weights, term_weights) in stacked.items()}
    else:
        per_job = [_blended_grams(extractor, job, content, size, bf16, cache, job_keys, tile)
                   for job, content, job_keys in zip(jobs, contents, keys)]
        style_targets = {layer: torch.stack([grams[layer] for grams in per_job]) for layer in per_job[0]}
    return StyleObjective(
        content_target, style_targets, content_layer=params.content_layer, content_images=contents,
        style_layers=params.style_layers, content_weight=params.content_weight,
        style_weight=params.style_weight, tv_weight=params.tv_weight, guidance=guidance,
        # The seed's style term grows with the number of pixels (unnormalised Grams over d*h*w) while the
        # content term does not: at a coarse scale, scale it up so that the balance is the output's.
        style_factor=(output[0] * output[1]) / (size[0] * size[1]),
    )


def _blended_grams(extractor, job: StyleJob, content: torch.Tensor, size, bf16, cache,
                   keys, tile) -> dict[str, torch.Tensor]:
    """The job's style targets for a target image of `size`: the style images' Grams blended by style_blend.

    An unnormalised Gram sums over positions, so a style image with more or fewer positions than the target
    has its Gram scaled by (target positions / style positions): a factor of exactly 1 when the sizes match,
    as in the seed, which resizes the style image to the content's shape.
    """
    params = job.params
    blend = params.style_blend or (1.0,) * len(job.styles)
    blended: dict[str, torch.Tensor] = {}
    for index, weight in enumerate(blend):
        grams = _style_grams_cached(extractor, job, index, content, size, bf16, cache, keys, tile)
        for layer, (gram, positions) in grams.items():
            term = gram * ((weight / sum(blend)) * (_positions(layer, size) / positions))
            blended[layer] = term if layer not in blended else blended[layer] + term
    return blended


def _guided_targets(extractor, job: StyleJob, content: torch.Tensor, size, bf16, cache,
                    keys, tile) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """With masks, per layer: each style's own target (K, C, C), the square of its mask at the layer's
    resolution (K, h, w: what the guided Gram weighs each position by) and its term weight (K,), for a target
    image of `size` (Gatys et al. 2017, spatial control).

    The mask goes to each layer by area averaging that follows the network's own halvings: each 2x2 pooling
    halves with floor, so a position of a layer after k poolings stands for a 2^k x 2^k block of pixels, the
    rows and columns past the last whole block dropped as the network drops them, and its value is the
    fraction of that block inside the region (for a soft mask, the block's mean). Resampling the mask to the
    layer's size instead would stretch it over those dropped rows and misplace it by up to a position.

    The target: the style image's unnormalised Gram A over its N positions has the second moment A/N per
    position, so a region whose activations have the style's statistics has the guided Gram
    sum_p m(p)^2 * A/N. The term is then normalised by the region's size, sum_p m(p)^2, where the seed has h*w
    (losses.py): each pixel of a region is pulled towards its style as hard as in a whole-image request,
    whatever the region's size; normalised by h*w, a style confined to a tenth of the image would pull a
    tenth as hard, and the content would win there. An all-white mask gives the seed's target and term
    exactly, a black one (no region) no term at all. style_blend weighs each style's term, normalised to a sum
    of 1 as without masks, so that masks never change a request's total style weight: one all-white mask is
    the request without it, whatever its weight, and K styles on the same image pull as hard as one.
    """
    params, count = job.params, len(job.styles)
    blend = params.style_blend or (1.0,) * count
    masks = torch.stack([resize_mask(job.masks[k], size) if k < len(job.masks) else content.new_ones(1, *size)
                         for k in range(count)])  # (K, 1, H, W): a style past the last mask applies everywhere
    grams = [_style_grams_cached(extractor, job, k, content, size, bf16, cache, keys, tile) for k in range(count)]
    guided = {}
    for layer in grams[0]:
        layer_masks = mask_at_layer(masks, layer)[:, 0]  # (K, h, w)
        areas = layer_masks.double().pow(2).sum(dim=(1, 2)).tolist()  # sum_p m(p)^2, exact for a white mask
        positions = layer_masks.shape[-2] * layer_masks.shape[-1]
        targets = torch.stack([style[layer][0] * (area / style[layer][1]) for style, area in zip(grams, areas)])
        weights = [blend[k] / sum(blend) * positions / area if area > 0 else 0.0 for k, area in enumerate(areas)]
        guided[layer] = (targets, layer_masks.square(), torch.tensor(weights, device=content.device))
    return guided


def mask_at_layer(masks: torch.Tensor, layer: str) -> torch.Tensor:
    """Masks (K, 1, H, W) at the resolution of `layer`: each position the mean of the 2^k x 2^k block of
    pixels it stands for, k the poolings before the layer, whole blocks only (floor, as the network halves)."""
    block = 2 ** poolings_before(layer)
    return masks if block == 1 else F.avg_pool2d(masks, kernel_size=block)


def _style_grams_cached(extractor, job: StyleJob, index: int, content, size, bf16: bool, cache, keys, tile):
    """style_grams of job.styles[index] as the optimisation at `size` sees it (recoloured to `content` with
    preserve_color histogram, resized by style_scale), from `cache` under keys[index] when both are given.
    A preset's Grams are pinned in the cache, unless recoloured to this request's content."""
    style, params = job.styles[index], job.params
    target = style_size(style, size, params.style_scale)

    def compute():
        image = match_colors(style, content) if params.preserve_color == "histogram" else style
        return style_grams(extractor, resize(image, target), params, bf16, tile)

    if cache is None or keys is None:
        return compute()
    recoloured_for = size if params.preserve_color == "histogram" else None  # the content is resized to `size`
    return cache.get((keys[index], target, recoloured_for, params.style_layers, params.pooling, bf16,
                      extractor.fingerprint, str(style.device)), compute,
                     pinned=is_preset(job, index) and recoloured_for is None)


def _positions(layer: str, size: tuple[int, int]) -> int:
    """h*w of a layer's activation for an image of `size`: each pooling halves, rounding down."""
    halvings = poolings_before(layer)
    return (size[0] >> halvings) * (size[1] >> halvings)
