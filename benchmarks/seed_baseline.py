"""The seed's optimisation loop (the Udacity notebook), kept only as the benchmarks' yardstick.

Faithful to the notebook: the whole `vgg19.features` runs at every step (all 37 modules, past conv5_1),
torchvision's in-place ReLUs overwrite the stored conv outputs (so "conv4_2" is relu4_2), the target is
optimised in ImageNet-normalised space without clamping, Adam(lr=0.003), style Grams computed once, the
seed's layers and weights, and the style image resized to the content's shape by the caller.
"""

import time

import torch
from torch import nn

# Module index in vgg19().features -> the notebook's name for it.
SEED_LAYERS = {"0": "conv1_1", "5": "conv2_1", "10": "conv3_1", "19": "conv4_1", "21": "conv4_2", "28": "conv5_1"}
SEED_STYLE_WEIGHTS = {"conv1_1": 1.0, "conv2_1": 0.75, "conv3_1": 0.2, "conv4_1": 0.2, "conv5_1": 0.2}
MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


def seed_vgg(features_state_dict: dict[str, torch.Tensor]) -> nn.Sequential:
    """torchvision's full vgg19().features with the given weights, frozen, as the notebook holds it. Built as
    torchvision builds it (configuration "E"), without the classifier that vgg19() would also make and fill with
    random numbers, seconds of work for weights the features never use."""
    from torchvision.models.vgg import cfgs, make_layers

    features = make_layers(cfgs["E"])
    features.load_state_dict(features_state_dict, strict=False)  # our state dicts stop at relu5_1
    for parameter in features.parameters():
        parameter.requires_grad_(False)
    return features


def get_features(image, model):
    features, x = {}, image
    for name, layer in model._modules.items():
        x = layer(x)
        if name in SEED_LAYERS:
            features[SEED_LAYERS[name]] = x
    return features


def gram_matrix(tensor):
    _, d, h, w = tensor.size()
    tensor = tensor.view(d, h * w)
    return torch.mm(tensor, tensor.t())


def run_seed(model, content, style, steps, *, lr=0.003, content_weight=1.0, style_weight=1e6, on_step=None):
    """content, style: (3, H, W) in [0, 1], same shape. Returns (final image in [0, 1], final total loss).

    on_step(step, total_loss_tensor) is called after each step (for loss-against-time curves).
    """
    content_n = ((content.unsqueeze(0) - MEAN) / STD)
    style_n = ((style.unsqueeze(0) - MEAN) / STD)
    content_features = get_features(content_n, model)
    style_features = get_features(style_n, model)
    style_grams = {layer: gram_matrix(style_features[layer]) for layer in style_features}
    target = content_n.clone().requires_grad_(True)
    optimizer = torch.optim.Adam([target], lr=lr)
    total_loss = None
    for step in range(1, steps + 1):
        target_features = get_features(target, model)
        content_loss = torch.mean((target_features["conv4_2"] - content_features["conv4_2"]) ** 2)
        style_loss = 0
        for layer in SEED_STYLE_WEIGHTS:
            target_feature = target_features[layer]
            target_gram = gram_matrix(target_feature)
            _, d, h, w = target_feature.shape
            layer_style_loss = SEED_STYLE_WEIGHTS[layer] * torch.mean((target_gram - style_grams[layer]) ** 2)
            style_loss += layer_style_loss / (d * h * w)
        total_loss = content_weight * content_loss + style_weight * style_loss
        optimizer.zero_grad()
        total_loss.backward()
        optimizer.step()
        if on_step is not None:
            on_step(step, total_loss.detach())
    image = (target.detach() * STD + MEAN).clamp(0, 1)[0]
    return image, float(total_loss.detach())


def time_seed(model, content, style, steps, **kwargs):
    start = time.perf_counter()
    image, loss = run_seed(model, content, style, steps, **kwargs)
    return time.perf_counter() - start, image, loss
