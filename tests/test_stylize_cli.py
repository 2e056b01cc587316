"""scripts/stylize.py --local: the command of CONTRACT.md's "Local client", run as users run it."""

import json
import subprocess
import sys

import pytest
from PIL import Image

from conftest import ROOT, SAMPLES, STYLES, sample
from reference_loss import contract_losses, random_vgg19_features
from style_engine.resize import resize

CLI = [sys.executable, str(ROOT / "scripts" / "stylize.py")]


@pytest.fixture
def same_shape_style(tmp_path):
    """starry_night cropped to tubingen's 4:3, so that at any size both have the same shape as in the seed."""
    path = tmp_path / "style.png"
    Image.open(STYLES / "starry_night.jpg").crop((0, 0, 424, 318)).save(path)
    return path


def test_local_run_prints_losses_that_match_the_contract(tmp_path, same_shape_style):
    out = tmp_path / "out.png"
    run = subprocess.run([*CLI, str(SAMPLES / "tubingen.jpg"), str(same_shape_style), "-o", str(out), "--local",
                          "--weights", "random", "--set", "size=64", "--set", "steps=30", "--json"],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    fields = json.loads(run.stdout)
    assert (fields["width"], fields["height"], fields["format"]) == (64, 48, "png")
    assert 0 < fields["steps"] <= 30 and fields["seconds"] > 0
    assert Image.open(out).size == (64, 48)
    assert "random VGG19 weights" in run.stderr  # says so loudly

    content = resize(sample("tubingen.jpg"), (48, 64))
    style = resize(sample(str(same_shape_style)), (48, 64))
    expected = contract_losses(random_vgg19_features(), content, content, style)  # init = content
    initial = fields["loss"]["initial"]
    for term in ("content", "style", "total"):
        assert initial[term] == pytest.approx(expected[term], rel=1e-4, abs=1e-12)
    assert fields["loss"]["final"]["total"] < 0.5 * initial["total"]


def test_a_refused_request_exits_1_with_the_message(tmp_path):
    run = subprocess.run([*CLI, str(SAMPLES / "tubingen.jpg"), str(STYLES / "starry_night.jpg"), "-o",
                          str(tmp_path / "out.png"), "--local", "--weights", "random", "--set", "steps=0"],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 1
    assert "steps must be an integer at least 1" in run.stderr
    assert not (tmp_path / "out.png").exists()
