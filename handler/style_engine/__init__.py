"""Neural style transfer by per-request optimisation (Gatys et al.), plain PyTorch, no TorchServe needed.

    extractor = VGGFeatures(load_features_state_dict("imagenet"))
    result = stylize(extractor, content, [style], parse_params({"size": 256})[0])

content and style are RGB tensors (3, H, W) in [0, 1]; result.image is one too.

The names below are imported when first used (PEP 562), so that the modules that need no torch (params, errors,
layers, the header reading of codec) can be imported without it: the jobs service checks requests with them.
"""

import importlib

_MODULES = {
    "optimize": ("Progress", "StyleResult", "batch_key", "stylize", "stylize_batch"),
    "errors": ("ImageError", "NotEnoughMemory", "ParamError", "RequestError", "TooLargeError"),
    "params": ("OutputParams", "StyleParams", "parse_params"),
    "targets": ("StyleJob",),
    "vgg": ("VGGFeatures", "WeightsError", "load_features_state_dict"),
}
_MODULE_OF = {name: module for module, names in _MODULES.items() for name in names}

__all__ = sorted(_MODULE_OF)


def __getattr__(name: str):
    if name not in _MODULE_OF:  # a submodule (`from style_engine import targets`) is imported by Python itself
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_MODULE_OF[name]}", __name__), name)
