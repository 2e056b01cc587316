"""scripts/stylize.py --local, run as users run it, and its options: a flag for every request parameter."""

import json
import subprocess
import sys

import pytest
from PIL import Image

from conftest import ROOT, SAMPLES, STYLES, sample
from reference_loss import contract_losses, random_vgg19_features
from style_engine.params import describe_params
from style_engine.resize import resize
from stylize import SET_BY_THE_CLIENT, _arguments, _request_params

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


def test_local_presets_masks_and_a_start_image(tmp_path):
    """A preset is the painting of --styles; an all-white --mask changes nothing; --init-image of the content
    starts where init=content does: the same losses as the plain request."""
    white = tmp_path / "white.png"
    Image.new("L", (10, 10), 255).save(white)
    common = ["-o", str(tmp_path / "out.png"), "--local", "--weights", "random", "--set", "size=64", "--set",
              "steps=3", "--json"]
    plain = subprocess.run([*CLI, str(SAMPLES / "tubingen.jpg"), str(STYLES / "starry_night.jpg"), *common],
                           capture_output=True, text=True, timeout=300)
    creative = subprocess.run([*CLI, str(SAMPLES / "tubingen.jpg"), "--preset", "starry_night", "--mask", str(white),
                               "--init-image", str(SAMPLES / "tubingen.jpg"), *common],
                              capture_output=True, text=True, timeout=300)
    assert plain.returncode == creative.returncode == 0, creative.stderr
    for when in ("initial", "final"):
        assert json.loads(creative.stdout)["loss"][when] == pytest.approx(json.loads(plain.stdout)["loss"][when],
                                                                         rel=1e-5)


def test_list_presets_of_a_directory(tmp_path):
    Image.new("RGB", (40, 30)).save(tmp_path / "Dots.png")
    run = subprocess.run([*CLI, "--list-presets", "--local", "--styles", str(tmp_path)], capture_output=True,
                         text=True, timeout=60)
    assert (run.returncode, run.stdout) == (0, "dots\t40x30\n")


@pytest.mark.parametrize("arguments, says", [
    (["CONTENT", "-o", "out.png", "--local"], "give at least one style"),
    (["CONTENT", "STYLE", "--local"], "CONTENT, -o OUT and one of --url, --grpc or --local are required"),
    (["--list-presets", "--url", "http://127.0.0.1:8080"], "--list-presets asks the management API"),
    (["CONTENT", "STYLE", "-o", "out.png", "--local", "--size", "64", "--set", "size=96"],
     "size is given twice: by --size and by --set"),
])
def test_usage_errors_exit_2(arguments, says):
    run = subprocess.run([*CLI, *arguments], capture_output=True, text=True, timeout=60)
    assert run.returncode == 2 and says in run.stderr


def test_every_request_parameter_has_a_flag_or_an_option_that_sets_it():
    options = {option for action in _arguments()._actions for option in action.option_strings}
    for param in describe_params():
        flag = "--" + param["name"].replace("_", "-")
        assert flag in options or SET_BY_THE_CLIENT.get(param["name"]) in options, param["name"]
    assert set(SET_BY_THE_CLIENT) <= {param["name"] for param in describe_params()}


def test_parameter_flags_and_set_make_the_request_parameters():
    args = _arguments().parse_args(["content.jpg", "style.jpg", "-o", "out.png", "--local", "--size", "512",
                                    "--steps", "300", "--style-weight", "1e5", "--style-blend", "[2, 1]",
                                    "--preserve-color", "luminance", "--preview", "--set", "seed=3",
                                    "--set", "init=noise"])
    assert _request_params(args) == {"size": 512, "steps": 300, "style_weight": 1e5, "style_blend": [2, 1],
                                     "preserve_color": "luminance", "preview": True, "seed": 3, "init": "noise"}


def test_parameter_flags_reach_the_engine(tmp_path):
    run = subprocess.run([*CLI, str(SAMPLES / "tubingen.jpg"), str(STYLES / "starry_night.jpg"), "-o",
                          str(tmp_path / "out.jpg"), "--local", "--weights", "random", "--size", "48", "--steps", "2",
                          "--format", "jpeg", "--json"], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    fields = json.loads(run.stdout)
    assert (fields["width"], fields["format"]) == (48, "jpeg") and fields["steps"] <= 2
    assert Image.open(tmp_path / "out.jpg").format == "JPEG"
