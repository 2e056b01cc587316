"""The server's own settings: the `handler:` section of the archive's model-config.yaml, read once and checked.

Settings may differ by the kind of device the worker runs on: `device_overrides: {cpu: {...}, cuda: {...}}`
replaces settings for that kind (key by key inside `defaults` and `maxima`), so that one archive serves
small images within the time budget on CPU hosts and posters on GPUs.
"""

import math
from dataclasses import dataclass, field
from typing import Any, Mapping

from style_engine.layers import LAYER_INDEX
from style_engine.params import validate_server_config


@dataclass(frozen=True)
class ServerConfig:
    weights_file: str = "vgg19_features.pth"  # inside the archive
    weights: str = "imagenet"  # where the weights came from: "imagenet", "random" or a file name
    deepest_layer: str = "relu5_1"  # the extractor is cut here; no request may use a deeper layer
    max_image_pixels: int = 40_000_000  # per uploaded image, checked before decoding (decompression bombs)
    # Pixels one call of the handler decodes, all its requests together: decoding is work no time budget
    # interrupts. A request over it alone is refused (413); one that would take the call past it is answered
    # 503 with Retry-After.
    max_decoded_pixels_per_call: int = 200_000_000
    max_styles: int = 4  # style images per request
    max_style_pixels: int = 2_097_152  # per style image at the output scale, after style_scale (targets.check_job)
    gram_cache_entries: int = 32  # style images whose Grams are kept (about 2.5 MB each with the default layers)
    # Grams of presets, kept apart from the uploads' so that uploads never evict them: an entry per preset and
    # output scale, style_scale, layer set, pooling and precision that requests have used
    preset_gram_cache_entries: int = 64
    # Of TorchServe's responseTimeout, the time one call of the handler keeps back from the optimisation for
    # decoding, encoding and the last iteration: every answer of the call must reach TorchServe before it
    # gives up on the worker and restarts it.
    reply_margin_seconds: float = 30.0
    # TorchServe's max_response_size (config.properties), bytes: the frontend drops the worker's connection, and
    # TorchServe restarts it, when one answer is larger. The handler refuses (413) a request whose answer could
    # be. Keep it equal to config.properties' (tests/test_server_config.py compares every config.properties).
    max_response_size: int = 67_108_864
    response_timeout: float = 120.0  # TorchServe's responseTimeout (s): read from the top level of model-config
    # Memory the worker lets requests use (memory.py estimates each before it runs): this many bytes, or with 0
    # the device's free memory when the worker starts, less memory_margin of it (for the estimate's error, the
    # allocator's slack and, on a CPU host, everything else the host runs).
    memory_budget_bytes: int = 0
    memory_margin: float = 0.25
    # A request that would not fit otherwise runs VGG19's blocks again in each backward pass instead of keeping
    # their activations (a third more time); false refuses it instead.
    save_memory: bool = True
    defaults: Mapping[str, Any] = field(default_factory=dict)  # request parameter defaults
    maxima: Mapping[str, float] = field(default_factory=dict)  # upper bounds of numeric parameters
    # Upper bounds, where larger, for the jobs service's requests, which it runs as segments (each within a
    # request's time, resumed from the last one's checkpoint): a job may ask more than a direct request.
    job_maxima: Mapping[str, float] = field(default_factory=dict)
    device_overrides: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)  # by device type, see above

    @classmethod
    def from_model_yaml(cls, model_yaml: Mapping[str, Any] | None, device_type: str = "cpu") -> "ServerConfig":
        model_yaml = model_yaml or {}
        section = dict(model_yaml.get("handler") or {})
        settings = set(cls.__dataclass_fields__) - {"response_timeout"}  # TorchServe's own key, read below
        _check_keys(section, settings, "handler")
        by_device = dict(section.get("device_overrides") or {})
        for kind, overrides in by_device.items():
            _check_keys(overrides, settings - {"device_overrides"}, f"handler.device_overrides.{kind}")
        section = _with_overrides(section, by_device.get(device_type, {}))
        config = cls(**section, response_timeout=float(model_yaml.get("responseTimeout", cls.response_timeout)))
        if config.deepest_layer not in LAYER_INDEX:
            raise ValueError(f"model-config.yaml handler.deepest_layer: {config.deepest_layer!r} is no VGG19 layer")
        validate_server_config(config.defaults, config.maxima)
        validate_server_config(config.defaults, config.maxima_of_jobs)
        narrower = sorted(name for name, value in config.job_maxima.items() if value < config.maxima.get(name, value))
        if narrower:
            raise ValueError(f"model-config.yaml: handler.job_maxima.{narrower[0]} is below handler.maxima's: a job "
                             f"may ask at least what a direct request may")
        budget_cap = config.maxima.get("max_seconds", math.inf)
        if budget_cap > config.seconds_per_call:
            raise ValueError(f"model-config.yaml: handler.maxima.max_seconds ({budget_cap}) must leave "
                             f"reply_margin_seconds ({config.reply_margin_seconds}) under responseTimeout "
                             f"({config.response_timeout})")
        return config

    @property
    def seconds_per_call(self) -> float:
        """How long one call of the handler may optimise, all its requests together."""
        return self.response_timeout - self.reply_margin_seconds

    @property
    def maxima_of_jobs(self) -> dict[str, float]:
        """The upper bounds of a job's request (run as segments): job_maxima where set, else maxima."""
        return {**self.maxima, **self.job_maxima}

    @property
    def random_weights(self) -> bool:
        return self.weights == "random"

    def limits(self) -> dict[str, Any]:
        """What a request may ask for, as the model description reports it (the jobs service checks submits
        against it)."""
        return {"max_image_pixels": self.max_image_pixels, "max_styles": self.max_styles,
                "max_style_pixels": self.max_style_pixels,
                "max_decoded_pixels_per_call": self.max_decoded_pixels_per_call, "maxima": dict(self.maxima),
                "job_maxima": self.maxima_of_jobs}

def _check_keys(section: Mapping[str, Any], allowed: set[str], where: str) -> None:
    unknown = set(section) - allowed
    if unknown:
        raise ValueError(f"model-config.yaml {where}: unknown keys {sorted(unknown)}")


def _with_overrides(section: dict, overrides: Mapping[str, Any]) -> dict:
    """`section` with `overrides` in place: merged key by key where both are mappings, replaced otherwise."""
    merged = dict(section)
    for key, value in overrides.items():
        merged[key] = {**section.get(key, {}), **value} if isinstance(value, Mapping) else value
    return merged
