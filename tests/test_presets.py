"""Presets: named style images from a directory, packed into the archive by scripts/build_mar.py --styles."""

import pytest
from PIL import Image

import build_mar
from conftest import STYLES
from style_engine import ParamError
from style_engine.presets import PresetLibrary, preset_files


def test_every_image_of_the_directory_is_a_preset_named_after_its_file_in_lower_case(tmp_path):
    Image.new("RGB", (40, 30), "red").save(tmp_path / "Red_Square.PNG")
    Image.new("RGB", (20, 50), "blue").save(tmp_path / "blue.jpg")
    (tmp_path / "CREDITS.md").write_text("not an image")
    library = PresetLibrary.load(tmp_path)
    assert library.describe() == [{"name": "blue", "width": 20, "height": 50},
                                  {"name": "red_square", "width": 40, "height": 30}]
    red, blue = library.images(("red_square", "blue"))
    assert red.shape == (3, 30, 40) and blue.shape == (3, 50, 20)


def test_the_projects_paintings_are_the_default_presets():
    assert list(preset_files(STYLES)) == ["shipwreck", "starry_night", "woman-with-hat-matisse"]
    assert build_mar.DEFAULT_STYLES == STYLES


def test_an_unknown_name_is_refused_naming_the_field_and_what_there_is():
    with pytest.raises(ParamError) as error:
        PresetLibrary.load(STYLES).images(("starry_night", "mona_lisa"))
    assert error.value.field == "presets"
    assert str(error.value) == ("unknown preset 'mona_lisa'; this server has: shipwreck, starry_night, "
                                "woman-with-hat-matisse")


@pytest.mark.parametrize("files, says", [
    (["a.png", "A.jpg"], "would both be the preset 'a'"),
    (["two words.png"], "'two words' is no preset name"),
    (["x,y.png"], "'x,y' is no preset name"),
])
def test_build_mar_refuses_names_a_request_could_not_use_before_loading_weights(tmp_path, capsys, files, says):
    for name in files:
        Image.new("RGB", (20, 20)).save(tmp_path / name)
    assert build_mar.main(["--weights", "random", "--styles", str(tmp_path), "--export-path",
                           str(tmp_path / "store")]) == 1
    assert says in capsys.readouterr().err and not (tmp_path / "store").exists()


def test_build_mar_refuses_a_missing_directory_and_a_file_that_is_no_image(tmp_path, capsys):
    missing = build_mar.main(["--weights", "random", "--styles", str(tmp_path / "nowhere")])
    assert missing == 1 and "--styles: no directory" in capsys.readouterr().err
    (tmp_path / "fake.png").write_bytes(b"not a png")
    assert build_mar.main(["--weights", "random", "--styles", str(tmp_path)]) == 1
    assert "is not an image in a supported format" in capsys.readouterr().err
