"""The server's own settings: the `handler:` section of the archive's model-config.yaml, read once and checked."""

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
    max_styles: int = 4  # style images per request
    max_style_pixels: int = 2_097_152  # per style image at the output scale, after style_scale (targets.check_job)
    max_batch_pixels: int = 1_048_576  # output pixels optimised together in one batch (memory grows with them)
    gram_cache_entries: int = 32  # style images whose Grams are kept (about 2.5 MB each with the default layers)
    defaults: Mapping[str, Any] = field(default_factory=dict)  # request parameter defaults
    maxima: Mapping[str, float] = field(default_factory=dict)  # upper bounds of numeric parameters

    @classmethod
    def from_model_yaml(cls, model_yaml: Mapping[str, Any] | None) -> "ServerConfig":
        section = dict((model_yaml or {}).get("handler") or {})
        unknown = set(section) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"model-config.yaml handler section: unknown keys {sorted(unknown)}")
        config = cls(**section)
        if config.deepest_layer not in LAYER_INDEX:
            raise ValueError(f"model-config.yaml handler.deepest_layer: {config.deepest_layer!r} is no VGG19 layer")
        validate_server_config(config.defaults, config.maxima)
        return config

    @property
    def random_weights(self) -> bool:
        return self.weights == "random"
