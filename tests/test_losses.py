"""The loss terms against hand computations and against the method's definition (docs/method.md)."""

import pytest
import torch

from reference_loss import contract_losses, random_vgg19_features
from style_engine import parse_params
from style_engine.losses import StyleObjective, gram_matrix, total_variation
from style_engine.targets import StyleJob, build_objective


def test_gram_of_a_hand_made_tensor():
    # One image, 2 channels, 1x2 positions: F = [[1, 2], [3, 4]], F F^T = [[5, 11], [11, 25]].
    features = torch.tensor([[1.0, 2.0], [3.0, 4.0]]).view(1, 2, 1, 2)
    assert gram_matrix(features).tolist() == [[[5.0, 11.0], [11.0, 25.0]]]


def test_gram_is_batched_and_float32_under_bf16_autocast():
    features = torch.randn(3, 4, 5, 6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        grams = gram_matrix(features.bfloat16())
    assert grams.dtype == torch.float32 and grams.shape == (3, 4, 4)
    expected = torch.stack([f.reshape(4, 30).bfloat16().float() @ f.reshape(4, 30).bfloat16().float().T
                            for f in features])
    torch.testing.assert_close(grams, expected)


def test_total_variation_by_hand():
    image = torch.tensor([[0.0, 1.0], [1.0, 1.0]]).expand(1, 3, 2, 2)
    # vertical differences: (1-0), (1-1) -> squares 1, 0; horizontal: (1-0), (1-1) -> 1, 0; means 0.5 + 0.5
    assert total_variation(image).tolist() == [1.0]


def test_each_term_against_a_hand_computation():
    torch.manual_seed(1)
    target = {"relu4_2": torch.randn(2, 3, 2, 2), "relu1_1": torch.randn(2, 2, 3, 3)}
    content_target, gram_target = torch.randn(2, 3, 2, 2), torch.randn(2, 2, 2)
    objective = StyleObjective(content_target, {"relu1_1": gram_target}, content_layer="relu4_2",
                               style_layers=(("relu1_1", 0.5),), content_weight=2.0, style_weight=10.0,
                               tv_weight=3.0)
    images = torch.rand(2, 3, 4, 4)
    losses = objective(target, images)
    for i in range(2):
        content = ((target["relu4_2"][i] - content_target[i]) ** 2).sum() / 12
        f = target["relu1_1"][i].reshape(2, 9)
        style = 0.5 * ((f @ f.T - gram_target[i]) ** 2).sum() / 4 / (2 * 3 * 3)
        dy = ((images[i, :, 1:] - images[i, :, :-1]) ** 2).sum() / (3 * 3 * 4)
        dx = ((images[i, :, :, 1:] - images[i, :, :, :-1]) ** 2).sum() / (3 * 4 * 3)
        assert losses.content[i].item() == pytest.approx(2.0 * content.item(), rel=1e-6)
        assert losses.style[i].item() == pytest.approx(10.0 * style.item(), rel=1e-6)
        assert losses.tv[i].item() == pytest.approx(3.0 * (dx + dy).item(), rel=1e-6)
        assert losses.total[i].item() == pytest.approx((2 * content + 10 * style + 3 * (dx + dy)).item(), rel=1e-6)


def test_objective_matches_the_contract_definition(extractor, content, style):
    """Our targets and objective at one scale equal the seed's loss computed the seed's way."""
    style_same_shape = torch.nn.functional.interpolate(style[None], size=content.shape[-2:], mode="bilinear")[0]
    params, _ = parse_params({"size": max(content.shape[-2:]), "precision": "fp32"})
    job = StyleJob(content, (style_same_shape,), params)
    objective = build_objective(extractor, [job], tuple(content.shape[-2:]), tuple(content.shape[-2:]), bf16=False)
    target = torch.rand_like(content)
    with torch.no_grad():
        ours = objective(extractor(target[None], objective.layers), target[None]).as_floats()
    reference = contract_losses(random_vgg19_features(), target, content, style_same_shape)
    for term in ("content", "style", "total"):
        assert ours[term] == pytest.approx(reference[term], rel=1e-4)
