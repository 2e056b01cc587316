"""Neural style transfer by per-request optimisation (Gatys et al.), plain PyTorch, no TorchServe needed.

    extractor = VGGFeatures(load_features_state_dict("imagenet"))
    result = stylize(extractor, content, [style], parse_params({"size": 256})[0])

content and style are RGB tensors (3, H, W) in [0, 1]; result.image is one too.
"""

from .optimize import Progress, StyleResult, batch_key, stylize, stylize_batch
from .errors import ImageError, NotEnoughMemory, ParamError, RequestError, TooLargeError
from .params import OutputParams, StyleParams, parse_params
from .targets import StyleJob
from .vgg import VGGFeatures, WeightsError, load_features_state_dict

__all__ = [
    "ImageError", "NotEnoughMemory", "OutputParams", "ParamError", "Progress", "RequestError", "StyleJob",
    "StyleParams", "StyleResult", "TooLargeError", "VGGFeatures", "WeightsError", "batch_key",
    "load_features_state_dict", "parse_params", "stylize", "stylize_batch",
]
