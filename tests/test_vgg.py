"""The frozen extractor and its weights."""

import pytest
import torch
import torchvision

from style_engine import VGGFeatures, WeightsError, load_features_state_dict
from style_engine.layers import LAYER_INDEX, LAYER_NAMES


def test_layer_names_follow_torchvision_vgg19_features():
    features = torchvision.models.vgg19(weights=None).features
    assert len(LAYER_NAMES) == len(features)
    for name, module in zip(LAYER_NAMES, features):
        kind = {"conv": torch.nn.Conv2d, "relu": torch.nn.ReLU, "pool": torch.nn.MaxPool2d}[name[:4]]
        assert isinstance(module, kind), name
    assert LAYER_INDEX["relu4_2"] == 22 and LAYER_INDEX["relu5_1"] == 29


def test_no_parameter_requires_grad_and_eval_mode(extractor):
    assert all(not p.requires_grad for p in extractor.parameters())
    assert not extractor.training
    assert len(extractor.layers) == LAYER_INDEX["relu5_1"] + 1  # cut right after relu5_1


def test_layers_past_the_deepest_requested_are_never_run(extractor):
    ran = []
    hooks = [m.register_forward_hook(lambda m, i, o, n=n: ran.append(n))
             for n, m in zip(LAYER_NAMES, extractor.layers)]
    try:
        out = extractor(torch.rand(1, 3, 32, 32), ["relu2_1", "conv1_2"])
    finally:
        for hook in hooks:
            hook.remove()
    assert set(out) == {"relu2_1", "conv1_2"}
    assert ran == list(LAYER_NAMES[: LAYER_INDEX["relu2_1"] + 1])


def test_conv_outputs_are_not_overwritten_by_relu(extractor):
    out = extractor(torch.rand(1, 3, 32, 32), ["conv1_1", "relu1_1"])
    assert (out["conv1_1"] < 0).any()
    torch.testing.assert_close(out["relu1_1"], out["conv1_1"].clamp_min(0))


def test_random_weights_are_torchvisions_after_manual_seed_0(random_state_dict):
    torch.manual_seed(0)
    reference = torchvision.models.vgg19(weights=None).features.state_dict()
    assert set(random_state_dict) == {k for k in reference if int(k.split(".")[0]) <= LAYER_INDEX["relu5_1"]}
    for key, tensor in random_state_dict.items():
        assert torch.equal(tensor, reference[key]), key


def test_loading_random_weights_leaves_the_callers_random_state_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    load_features_state_dict("random", deepest_layer="relu1_1")
    assert torch.equal(torch.rand(3), expected)


@pytest.mark.parametrize("layout", ["whole", "features"])
def test_weights_from_a_file(tmp_path, random_state_dict, layout):
    path = tmp_path / "vgg.pth"
    state = {f"features.{k}": v for k, v in random_state_dict.items()} if layout == "whole" else random_state_dict
    if layout == "whole":
        state["classifier.0.weight"] = torch.zeros(2, 2)  # a whole vgg19 dict has more than features
    torch.save(state, path)
    loaded = load_features_state_dict(str(path))
    assert loaded.keys() == random_state_dict.keys()
    assert all(torch.equal(loaded[k], random_state_dict[k]) for k in loaded)


def test_a_file_that_is_not_a_vgg19_state_dict(tmp_path):
    resnet = tmp_path / "resnet.pth"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), resnet)
    with pytest.raises(WeightsError, match=r"not a VGG19 state dict: 0.weight \(conv1_1\)"):
        load_features_state_dict(str(resnet))
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsError, match="not a PyTorch state dict"):
        load_features_state_dict(str(garbage))
    with pytest.raises(WeightsError, match="no file at"):
        load_features_state_dict(str(tmp_path / "missing.pth"))


def test_imagenet_without_network_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # an empty hub cache
    for proxy in ("https_proxy", "HTTPS_PROXY"):  # a closed local port: no download, whatever the network
        monkeypatch.setenv(proxy, "http://127.0.0.1:9")
    with pytest.raises(WeightsError, match="--weights PATH"):
        load_features_state_dict("imagenet")


def test_extractor_cut_at_a_shallower_layer(random_state_dict):
    kept = {k: v for k, v in random_state_dict.items() if int(k.split(".")[0]) <= LAYER_INDEX["relu3_1"]}
    shallow = VGGFeatures(kept, deepest_layer="relu3_1")
    assert shallow.check_layers(["relu2_1", "relu4_2"]) == "relu4_2"
    assert shallow.check_layers(["relu3_1"]) is None
