"""Named style images: the presets that scripts/build_mar.py --styles DIR puts into the archive.

A preset's name is its file's stem in lower case (`Starry_Night.JPG` is `starry_night`). The worker loads every
preset once, when it starts; requests name them in `presets` and never reach a file. Importable without torch:
the jobs service checks preset names at submit.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING

from .codec import load_image_file
from .errors import ParamError

if TYPE_CHECKING:
    import torch

ARCHIVE_DIR = "presets"  # where they are inside the archive, and so in the worker's model_dir
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff")  # what codec.py reads
# Names go into JSON lists and comma-separated form fields: no commas, spaces or quotes.
NAME = re.compile(r"[a-z0-9][a-z0-9_.-]*")


def preset_files(directory: Path) -> dict[str, Path]:
    """{name: file} for every image file of `directory` (other files are left out). Raises ValueError for a
    stem that makes no valid name and for two files with the same name."""
    files: dict[str, Path] = {}
    for path in sorted(Path(directory).iterdir()):
        if not path.is_file() or path.suffix.lower() not in IMAGE_SUFFIXES:
            continue
        name = path.stem.lower()
        if not NAME.fullmatch(name):
            raise ValueError(f"{path}: {name!r} is no preset name: letters, digits, '_', '-' and '.' only, "
                             f"beginning with a letter or digit")
        if name in files:
            raise ValueError(f"{path} and {files[name]} would both be the preset {name!r}")
        files[name] = path
    return files


class PresetLibrary:
    """The presets of a directory, decoded: (3, H, W) RGB in [0, 1] by name."""

    def __init__(self, images: dict[str, torch.Tensor]):
        self._images = dict(sorted(images.items()))

    @classmethod
    def load(cls, directory: Path, max_pixels: int = 10**9) -> "PresetLibrary":
        """Every preset of `directory`; none when it does not exist (an archive built without presets)."""
        if not Path(directory).is_dir():
            return cls({})
        return cls({name: load_image_file(str(path), max_pixels=max_pixels)
                    for name, path in preset_files(directory).items()})

    def images(self, names: tuple[str, ...]) -> tuple[torch.Tensor, ...]:
        """The images of `names`, in their order; a ParamError for `presets` names one this library lacks."""
        unknown = [name for name in names if name not in self._images]
        if unknown:
            available = ", ".join(self._images) or "none: this archive was built without presets"
            raise ParamError("presets", f"unknown preset {unknown[0]!r}; this server has: {available}")
        return tuple(self._images[name] for name in names)

    def describe(self) -> list[dict]:
        """Name, width and height of each preset, by name."""
        return [{"name": name, "width": image.shape[-1], "height": image.shape[-2]}
                for name, image in self._images.items()]
