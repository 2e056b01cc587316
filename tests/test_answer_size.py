"""The most bytes an answer can take (answers.answer_bytes_bound), known before any work: never less than
what encoding gives for the hardest image to compress, uniform noise at quality 100, and not far above it for
PNG, whose bound is exact but for deflate's framing."""

import base64
import json
import math

import pytest
import torch

from answers import answer_bytes_bound
from style_engine.codec import encode_image, encoded_bytes_bound
from style_engine.params import parse_params


@pytest.mark.parametrize("height, width", [(32, 32), (48, 64), (300, 401)])
@pytest.mark.parametrize("fmt", ["png", "jpeg", "webp"])
def test_noise_at_the_highest_quality_encodes_within_the_bound(fmt, height, width):
    noise = torch.rand(3, height, width, generator=torch.Generator().manual_seed(height))
    encoded = len(encode_image(noise, fmt, 100))
    assert encoded <= encoded_bytes_bound(height, width, fmt)
    if fmt == "png":
        assert encoded_bytes_bound(height, width, fmt) <= 1.03 * encoded + 1024


def test_a_json_answer_is_bounded_with_its_base64_and_fields():
    output = parse_params({"response": "json"})[1]
    noise = torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(0))
    image = encode_image(noise, "png")
    answer = json.dumps({"image": base64.b64encode(image).decode(), "format": "png", "width": 64, "height": 64,
                         "loss": {"initial": {"total": math.pi}, "final": {"total": math.e}}})
    assert len(answer) <= answer_bytes_bound(64, 64, output)
    assert answer_bytes_bound(64, 64, output) >= 4 / 3 * encoded_bytes_bound(64, 64, "png")
    streamed = parse_params({"stream": True, "preview": True})[1]
    assert answer_bytes_bound(64, 64, streamed) >= answer_bytes_bound(64, 64, output)
