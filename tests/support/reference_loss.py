"""The seed's loss written straight from its definition (docs/method.md), independently of the engine, to
check it against.

Uses torchvision's own vgg19().features built right after torch.manual_seed(0) (`--weights random`),
with its in-place ReLUs, exactly as the seed's notebook runs it.
"""

import functools

import torch
import torchvision

# Module index in vgg19().features of each relu the default objective uses (after in-place ReLU the
# seed's convX_Y outputs hold these values).
RELU_INDEX = {"relu1_1": 1, "relu2_1": 6, "relu3_1": 11, "relu4_1": 20, "relu4_2": 22, "relu5_1": 29}
STYLE_WEIGHTS = {"relu1_1": 1.0, "relu2_1": 0.75, "relu3_1": 0.2, "relu4_1": 0.2, "relu5_1": 0.2}
MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


@functools.cache  # read only: built once per test session (building VGG19 takes seconds)
def random_vgg19_features():
    torch.manual_seed(0)
    return torchvision.models.vgg19(weights=None).features.eval()


def activations(model, image):
    x, out = (image.unsqueeze(0) - MEAN) / STD, {}
    for index, module in enumerate(model):
        x = module(x)
        for name, relu_index in RELU_INDEX.items():
            if index == relu_index:
                out[name] = x.clone()
    return out


def gram(feature):
    _, d, h, w = feature.shape
    flat = feature.view(d, h * w)
    return flat @ flat.t()


@torch.no_grad()
def contract_losses(model, target, content, style, content_weight=1.0, style_weight=1e6):
    """Reported losses (content, style, total) of `target` for same-size images (3, H, W) in [0, 1]."""
    t, c, s = activations(model, target), activations(model, content), activations(model, style)
    content_term = torch.mean((t["relu4_2"] - c["relu4_2"]) ** 2).item()
    style_term = 0.0
    for layer, weight in STYLE_WEIGHTS.items():
        _, d, h, w = t[layer].shape
        style_term += weight * torch.mean((gram(t[layer]) - gram(s[layer])) ** 2).item() / (d * h * w)
    content_loss, style_loss = content_weight * content_term, style_weight * style_term
    return {"content": content_loss, "style": style_loss, "total": content_loss + style_loss}
