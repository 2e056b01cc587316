"""Request parameters: two frozen dataclasses with their defaults and bounds, and the one parser that REST,
gRPC and the local client all use, so that defaults and error messages are the same everywhere.

The defaults written here are the engine's own; a server may override defaults and lower the upper bounds
(`model-config.yaml`, `handler:` section), never widen them.
"""

import json
import math
from dataclasses import dataclass, field, fields
from typing import Any, Mapping

from .errors import ParamError
from .layers import LAYER_INDEX, LAYER_NAMES


# --- how each kind of value is read and checked ---------------------------------------------------------------


@dataclass(frozen=True)
class Number:
    """An int or float in [lo, hi] (or (lo, hi] when `lo_open`); numeric strings from form fields are accepted."""

    lo: float
    hi: float
    integer: bool = False
    lo_open: bool = False
    optional: bool = False  # null / None means "not set" (the engine then picks a value)
    # For a limit such as a time budget, null means "no limit of my own": the server's maximum, where it sets
    # one, still applies. Without this, null would slip past the maximum.
    null_is_maximum: bool = False

    def parse(self, name: str, value: Any, hi: float | None = None) -> Any:
        # a plain form field spells null as JSON does, as it spells objects, lists and booleans
        if self.optional and (value is None or value == "null"):
            return hi if self.null_is_maximum else None  # hi: the server's maximum, None where it sets none
        hi = self.hi if hi is None else hi
        number = _to_number(value)
        if number is not None and self.integer and number != int(number):
            number = None
        low_ok = number is not None and (number > self.lo if self.lo_open else number >= self.lo)
        if number is None or not low_ok or number > hi:
            raise ParamError(name, f"{name} must be {self.allowed(hi)}; got {value!r}")
        return int(number) if self.integer else float(number)

    def allowed(self, hi: float | None = None) -> str:
        show = (lambda v: str(int(v))) if self.integer else (lambda v: f"{v:g}")
        kind = "an integer" if self.integer else "a number"
        low = f"greater than {show(self.lo)}" if self.lo_open else f"at least {show(self.lo)}"
        high = show(self.hi if hi is None else hi)
        return f"{kind} {low} and at most {high}" + (" or null" if self.optional else "")

    def schema(self, hi: float | None = None) -> dict[str, Any]:
        kind = "integer" if self.integer else "number"
        number = int if self.integer else float
        low = {"exclusiveMinimum" if self.lo_open else "minimum": number(self.lo)}
        high = number(self.hi if hi is None else hi)
        return {"type": [kind, "null"] if self.optional else kind, **low, "maximum": high}


def _to_number(value: Any) -> float | None:
    """A finite int or float from a number or a numeric string; None for anything else (bools included).

    JSON integers have no size limit (but 4300 digits), and math.isfinite cannot convert one beyond a float's
    range: every int is finite, only floats are asked."""
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return value if isinstance(value, int) or math.isfinite(value) else None


@dataclass(frozen=True)
class Choice:
    """One of a few strings; `aliases` maps other accepted values (such as booleans) onto them."""

    options: tuple[str, ...]
    aliases: tuple[tuple[Any, str], ...] = ()

    def parse(self, name: str, value: Any, hi: float | None = None) -> str:
        for alias, option in self.aliases:
            if value is alias or (isinstance(value, str) and value.lower() == str(alias).lower()):
                return option
        if isinstance(value, str) and value.lower() in self.options:
            return value.lower()
        raise ParamError(name, f"{name} must be {self.allowed()}; got {value!r}")

    def allowed(self, hi: float | None = None) -> str:
        extra = [json.dumps(alias) for alias, _ in self.aliases]
        return "one of " + ", ".join([*(f'"{o}"' for o in self.options), *extra])

    def schema(self, hi: float | None = None) -> dict[str, Any]:
        return {"enum": [*self.options, *(alias for alias, _ in self.aliases)]}


@dataclass(frozen=True)
class Flag:
    """A boolean; "true"/"false"/"1"/"0" strings from form fields are accepted."""

    def parse(self, name: str, value: Any, hi: float | None = None) -> bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in ("true", "1", "false", "0"):
            return value.strip().lower() in ("true", "1")
        raise ParamError(name, f"{name} must be {self.allowed()}; got {value!r}")

    def allowed(self, hi: float | None = None) -> str:
        return "true or false"

    def schema(self, hi: float | None = None) -> dict[str, Any]:
        return {"type": "boolean"}


@dataclass(frozen=True)
class Layer:
    """A VGG19 layer name up to the deepest layer the server's extractor holds."""

    def parse(self, name: str, value: Any, hi: float | None = None) -> str:
        if isinstance(value, str) and value in LAYER_INDEX:
            return value
        raise ParamError(name, f"{name} must be {self.allowed()}; got {value!r}")

    def allowed(self, hi: float | None = None) -> str:
        return f"a VGG19 layer name such as relu4_2 (one of {', '.join(LAYER_NAMES)})"

    def schema(self, hi: float | None = None) -> dict[str, Any]:
        return {"type": "string", "enum": list(LAYER_NAMES)}


@dataclass(frozen=True)
class LayerWeights:
    """A non-empty object {layer name: weight}, weights finite and >= 0 with at least one > 0."""

    def parse(self, name: str, value: Any, hi: float | None = None) -> tuple[tuple[str, float], ...]:
        value = _json_if_string(name, value, self.allowed())
        if isinstance(value, tuple):  # the parsed form, (("relu1_1", 1.0), ...), read back
            value = dict(value)
        if not isinstance(value, Mapping) or not value:
            raise ParamError(name, f"{name} must be {self.allowed()}; got {value!r}")
        parsed = []
        for layer, weight in value.items():
            Layer().parse(f"{name}.{layer}", layer)
            parsed.append((layer, _WEIGHT.parse(f"{name}.{layer}", weight)))
        if not any(weight > 0 for _, weight in parsed):
            raise ParamError(name, f"{name} must give at least one layer a weight above 0; got {value!r}")
        return tuple(sorted(parsed, key=lambda item: LAYER_INDEX[item[0]]))

    def allowed(self, hi: float | None = None) -> str:
        return 'an object of VGG19 layer names to weights >= 0, e.g. {"relu1_1": 1.0, "relu2_1": 0.75}'

    def schema(self, hi: float | None = None) -> dict[str, Any]:
        return {"type": "object", "minProperties": 1, "propertyNames": Layer().schema(),
                "additionalProperties": _WEIGHT.schema()}


@dataclass(frozen=True)
class Weights:
    """A non-empty list of weights >= 0 with a positive sum, or null (equal weights)."""

    def parse(self, name: str, value: Any, hi: float | None = None) -> tuple[float, ...] | None:
        value = _json_if_string(name, value, self.allowed())
        if value is None:
            return None
        if not isinstance(value, (list, tuple)) or not value:
            raise ParamError(name, f"{name} must be {self.allowed()}; got {value!r}")
        weights = tuple(_WEIGHT.parse(f"{name}[{i}]", w) for i, w in enumerate(value))
        if sum(weights) <= 0:
            raise ParamError(name, f"{name} must have a positive sum; got {value!r}")
        return weights

    def allowed(self, hi: float | None = None) -> str:
        return "a list with one weight >= 0 per style image (positive sum), or null for equal weights"

    def schema(self, hi: float | None = None) -> dict[str, Any]:
        return {"type": ["array", "null"], "minItems": 1, "items": _WEIGHT.schema()}


_WEIGHT = Number(0.0, 1e12)


@dataclass(frozen=True)
class Names:
    """A list of names, lower case; a string is a JSON list or names separated by commas ("a, b"), as a plain
    form field carries them. Which names exist is the server's to say (presets.PresetLibrary)."""

    def parse(self, name: str, value: Any, hi: float | None = None) -> tuple[str, ...]:
        if isinstance(value, str):
            value = _json_if_string(name, value, self.allowed()) if value.lstrip().startswith("[") else [
                part for part in value.split(",") if part.strip()]
        if not isinstance(value, (list, tuple)) or not all(isinstance(item, str) and item.strip() for item in value):
            raise ParamError(name, f"{name} must be {self.allowed()}; got {value!r}")
        return tuple(item.strip().lower() for item in value)

    def allowed(self, hi: float | None = None) -> str:
        return 'a list of names such as ["starry_night"], or in a form field "starry_night,shipwreck"'

    def schema(self, hi: float | None = None) -> dict[str, Any]:
        # a form field sends the names as one comma-separated string
        return {"anyOf": [{"type": "array", "items": {"type": "string", "pattern": "\\S"}}, {"type": "string"}]}


def _json_if_string(name: str, value: Any, allowed: str) -> Any:
    """Form fields carry objects and lists as JSON text."""
    return parse_json(value, name, name, f"it must be {allowed}") if isinstance(value, str) else value


def parse_json(text: str | bytes, field: str, subject: str, expected: str) -> Any:
    """Parsed JSON, or a ParamError for `field` saying why `subject` is not JSON and what is `expected`.

    json.loads refuses more than syntax: bytes that are not UTF-8, nesting deeper than Python's recursion
    limit (RecursionError) and integers of more than 4300 digits (ValueError). A client can send any of them.
    """
    try:
        return json.loads(text)
    except RecursionError:
        reason = "nested too deeply"
    except ValueError as error:  # JSONDecodeError and UnicodeDecodeError included
        reason = str(error)
    raise ParamError(field, f"{subject} is not valid JSON ({reason}); {expected}")


def _param(default, check, doc: str = ""):
    return field(default=default, metadata={"check": check, "doc": doc})


# --- the parameters ------------------------------------------------------------------------------------------

# The seed's style layers and their weights (docs/method.md): early layers weigh more, giving finer texture.
# The largest side of an output, a scale or a tile the engine accepts: 8192 px (a print at 300 dpi, 69 cm wide).
# What fits a worker's memory and time is the server's to bound (model-config.yaml's maxima, memory.py).
MAX_SIDE = 8192

SEED_STYLE_LAYERS = (("relu1_1", 1.0), ("relu2_1", 0.75), ("relu3_1", 0.2), ("relu4_1", 0.2), ("relu5_1", 0.2))


@dataclass(frozen=True)
class StyleParams:
    """What the optimisation does. Defaults are the seed's objective with our faster optimiser and schedule."""

    size: int = _param(256, Number(32, MAX_SIDE, integer=True), "longer side of the output, px")
    # Total optimiser iterations over all scales; early stopping usually ends well before.
    steps: int = _param(200, Number(1, 10000, integer=True), "optimiser iterations over all scales")
    # L-BFGS reaches a given loss in far fewer evaluations than Adam on this smooth, well-scaled problem
    # (benchmarks/): one VGG forward+backward per iteration, so iterations are what cost time.
    optimizer: str = _param("lbfgs", Choice(("lbfgs", "adam")), "lbfgs or adam")
    # null: the optimiser's default, 1.0 for L-BFGS (its curvature estimate sets the step) and 0.02 for Adam
    # (pixels in [0,1]; the seed's 0.003 was in ImageNet-normalised units, about 0.0007 here, and slow).
    lr: float | None = _param(None, Number(0.0, 100.0, lo_open=True, optional=True), "step size")
    content_weight: float = _param(1.0, Number(0.0, 1e12), "alpha: weight of the content term")
    style_weight: float = _param(1e6, Number(0.0, 1e12), "beta: weight of the style term")
    tv_weight: float = _param(0.0, Number(0.0, 1e12), "weight of the total-variation smoothness term")
    # The seed's notebook reads conv4_2 after torchvision's in-place ReLU has overwritten it: relu4_2.
    content_layer: str = _param("relu4_2", Layer(), "layer whose activations the content term compares")
    style_layers: tuple[tuple[str, float], ...] = _param(SEED_STYLE_LAYERS, LayerWeights(), "layer -> weight")
    # Normalised to a sum of 1: without masks it blends the styles' Gram targets; with masks each style has a
    # term of its own, which its weight multiplies (null: equal weights). See targets.py.
    style_blend: tuple[float, ...] | None = _param(None, Weights(), "one weight per style (uploads, then presets)")
    # Styles stored in the archive, after the uploaded ones (GET /models/style_transfer?customized=true).
    presets: tuple[str, ...] = _param((), Names(), "names of the server's preset styles to use")
    # Style image's longer side relative to `size`: smaller gives coarser, larger finer brush strokes.
    style_scale: float = _param(1.0, Number(0.05, 4.0), "style image size relative to the output")
    # image: the image part init_image, e.g. an earlier result to refine, or a smaller one to enlarge
    init: str = _param("content", Choice(("content", "noise", "style", "image")), "starting image")
    seed: int = _param(0, Number(0, 2**31 - 1, integer=True), "seed of the noise initialisation")
    preserve_color: str = _param(
        "none",
        Choice(("none", "luminance", "histogram"), aliases=((True, "luminance"), (False, "none"))),
        "keep the content's colours",
    )
    # Gatys et al. found average pooling gives slightly smoother results; the seed uses max.
    pooling: str = _param("max", Choice(("max", "avg")), "VGG pooling")
    # Coarse-to-fine: optimise first at min_scale (longer side, px), then double up to `size`.
    # min_scale >= size turns it off.
    min_scale: int = _param(128, Number(16, MAX_SIDE, integer=True), "longer side of the coarsest scale, px")
    # Stop a scale when the best total loss improved by less than this fraction over the last window.
    early_stop_tol: float = _param(1e-3, Number(0.0, 1.0), "relative improvement that counts as progress")
    early_stop_window: int = _param(20, Number(1, 10000, integer=True), "iterations the tolerance spans")
    # Wall-clock budget of the optimisation; when it runs out the best image so far is returned. null: none
    # of the request's own, the server's maximum still applies.
    max_seconds: float | None = _param(
        None, Number(0.0, 86400.0, lo_open=True, optional=True, null_is_maximum=True), "time budget, s")
    # auto: bfloat16 activations where the hardware runs them natively (see precision.py), else float32.
    precision: str = _param("auto", Choice(("auto", "fp32", "bf16")), "activation precision")
    # How each forward and backward pass covers the image: whole (full), or by tiles with the margin VGG19's
    # receptive field needs (localized: the same loss and gradient, the memory of a tile, in more time); auto:
    # full where it fits the worker's memory, else localized (style_engine/localized.py, memory.py).
    passes: str = _param("auto", Choice(("auto", "full", "localized")), "whole-image or tiled passes")
    # null: the largest tile that fits the worker's memory (the fewest tiles); rounded down to a multiple of 16.
    tile: int | None = _param(None, Number(64, MAX_SIDE, integer=True, optional=True),
                              "localized passes: side of the image each tile owns, px")


@dataclass(frozen=True)
class OutputParams:
    """How the result is returned; the engine never sees these."""

    format: str = _param("png", Choice(("png", "jpeg", "webp")), "image format")
    quality: int = _param(92, Number(1, 100, integer=True), "jpeg/webp quality")
    response: str = _param("image", Choice(("image", "json")), "image bytes or a JSON object")
    stream: bool = _param(False, Flag(), "stream progress as JSON lines")
    preview: bool = _param(False, Flag(), "add small preview images to streamed progress")


PARAM_CLASSES = (StyleParams, OutputParams)
PARAM_FIELDS = {f.name: f for cls in PARAM_CLASSES for f in fields(cls)}


def parse_params(
    raw: Mapping[str, Any] | None,
    *,
    defaults: Mapping[str, Any] | None = None,
    maxima: Mapping[str, float] | None = None,
) -> tuple[StyleParams, OutputParams]:
    """Validate a request's parameters. `defaults` and `maxima` come from the server's configuration."""
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        raise ParamError("params", f"params must be a JSON object; got {type(raw).__name__}")
    maxima = maxima or {}
    unknown = sorted(set(raw) - set(PARAM_FIELDS))
    if unknown:
        raise ParamError(unknown[0], f"unknown parameter {unknown[0]!r}; allowed: {', '.join(PARAM_FIELDS)}")
    values = {**(defaults or {}), **raw}
    parsed = [cls(**{f.name: _check(f, values, maxima) for f in fields(cls)}) for cls in PARAM_CLASSES]
    return parsed[0], parsed[1]


def _check(spec, values: Mapping[str, Any], maxima: Mapping[str, float]) -> Any:
    if spec.name not in values:
        return spec.default
    return spec.metadata["check"].parse(spec.name, values[spec.name], maxima.get(spec.name))


def validate_server_config(defaults: Mapping[str, Any], maxima: Mapping[str, float]) -> None:
    """Check a server's configured defaults and maxima: maxima may only narrow the built-in bounds."""
    for name, value in maxima.items():
        check = PARAM_FIELDS[name].metadata["check"] if name in PARAM_FIELDS else None
        if not isinstance(check, Number):
            raise ParamError(name, f"maximum for {name!r}: only numeric parameters have maxima")
        check.parse(f"maximum of {name}", value)
    parse_params(defaults, maxima=maxima)


def describe_params(defaults: Mapping[str, Any] | None = None,
                    maxima: Mapping[str, float] | None = None) -> list[dict[str, Any]]:
    """Name, default (a JSON value), allowed values and meaning of every parameter, with a server's `defaults`
    and `maxima` applied where given (the table of docs/parameters.md, and the model description of a running server).
    `allowed` says it in words, for people; `schema` as JSON Schema, for programs such as the playground page
    (a form field's value is its text: a number or a boolean as written, an object or a list as JSON)."""
    maxima = maxima or {}
    parsed = parse_params({}, defaults=defaults, maxima=maxima)
    return [
        {"name": f.name, "default": _json_value(getattr(parsed[PARAM_CLASSES.index(cls)], f.name)),
         "allowed": f.metadata["check"].allowed(maxima.get(f.name)),
         "schema": f.metadata["check"].schema(maxima.get(f.name)), "doc": f.metadata["doc"]}
        for cls in PARAM_CLASSES for f in fields(cls)
    ]


def _json_value(value: Any) -> Any:
    """A parsed parameter as JSON writes it: style_layers' pairs as an object, other tuples as lists."""
    if isinstance(value, tuple):
        pairs = all(isinstance(item, tuple) for item in value) and value
        return dict(value) if pairs else list(value)
    return value

