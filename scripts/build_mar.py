#!/usr/bin/env python3
"""Build the TorchServe archive DIR/style_transfer.mar (docs/deployment.md, "The image").

    scripts/build_mar.py --weights {imagenet|random|PATH} [--export-path DIR] [--styles DIR]

Keeps only VGG19's `features` weights up to the deepest layer the server allows, and packs them with the
handler, the engine, model-config.yaml (its `handler.weights` set to where the weights came from) and the
presets: every image of --styles (default samples/styles/, the project's paintings), named after its file
(stem, lower case), which requests can name in `presets` instead of uploading a style image.
"""

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parent.parent
HANDLER_DIR = ROOT / "handler"
sys.path.insert(0, str(HANDLER_DIR))

from style_engine import RequestError, WeightsError, load_features_state_dict  # noqa: E402
from style_engine.presets import ARCHIVE_DIR, PresetLibrary, preset_files  # noqa: E402

MODEL_NAME = "style_transfer"
MODEL_VERSION = "1.0"
DEFAULT_STYLES = ROOT / "samples" / "styles"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", default="imagenet", help="imagenet, random, or the path of a VGG19 state dict")
    parser.add_argument("--export-path", default=str(ROOT / "model_store"), help="where to write the archive")
    parser.add_argument("--styles", default=str(DEFAULT_STYLES), help="directory of preset style images")
    args = parser.parse_args(argv)
    try:
        archive = build(args.weights, Path(args.export_path), styles=Path(args.styles))
    except (WeightsError, RequestError, ValueError, OSError) as error:  # weights, a preset's image or name
        print(f"build_mar: {error}", file=sys.stderr)
        return 1
    print(f"build_mar: wrote {archive} ({archive.stat().st_size / 2**20:.1f} MiB)")
    return 0


def build(weights: str, export_path: Path, *, styles: Path = DEFAULT_STYLES,
          handler: Path = HANDLER_DIR / "style_transfer_handler.py", settings: dict | None = None) -> Path:
    """The archive; `styles` is the directory of its presets, `handler` its entry module (importing the
    handler/ files beside it), `settings` replace top-level keys of model-config.yaml (tests build archives
    with short time limits)."""
    model_config = {**yaml.safe_load((HANDLER_DIR / "model-config.yaml").read_text()), **(settings or {})}
    handler_config = model_config["handler"] = dict(model_config["handler"])  # never the caller's dict
    handler_config["weights"] = weights if weights in ("imagenet", "random") else Path(weights).name
    if weights == "random":
        print("build_mar: WARNING: RANDOM VGG19 weights: this archive is for tests only, its results show no "
              "real style (responses carry an X-Style-Weights header saying so)", file=sys.stderr)
    if not styles.is_dir():
        raise ValueError(f"--styles: no directory {styles}")
    PresetLibrary.load(styles, handler_config["max_image_pixels"])  # each must decode as the worker will
    state_dict = load_features_state_dict(weights, handler_config["deepest_layer"])
    export_path.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="build_mar-") as staging:
        files = Path(staging) / "files"  # its contents become the archive's top level
        shutil.copytree(HANDLER_DIR, files, ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.yaml"))
        torch.save(state_dict, files / handler_config["weights_file"])
        names = stage_presets(styles, files)
        print(f"build_mar: presets from {styles}: {', '.join(names) or 'none'}", file=sys.stderr)
        config_file = Path(staging) / "model-config.yaml"
        config_file.write_text(yaml.safe_dump(model_config, sort_keys=False))
        _archive(handler, files, config_file, export_path, Path(staging))
    return export_path / f"{MODEL_NAME}.mar"


def stage_presets(styles: Path, files: Path) -> list[str]:
    """Copy the images of `styles` into `files`/presets/ (the worker's model_dir once unpacked), each file
    named after its preset; returns the names."""
    (files / ARCHIVE_DIR).mkdir()
    presets = preset_files(styles)
    for name, path in presets.items():
        shutil.copyfile(path, files / ARCHIVE_DIR / f"{name}{path.suffix.lower()}")
    return list(presets)


def _archive(handler: Path, files: Path, config_file: Path, export_path: Path, staging: Path) -> None:
    from model_archiver.model_archiver_config import ModelArchiverConfig
    from model_archiver.model_packaging import generate_model_archive

    config = ModelArchiverConfig(
        model_name=MODEL_NAME, version=MODEL_VERSION, handler=str(handler),
        extra_files=str(files), config_file=str(config_file), export_path=str(export_path), force=True,
    )
    # The archiver stages in gettempdir()/<model name>: a private temp dir keeps concurrent builds apart.
    previous, tempfile.tempdir = tempfile.tempdir, str(staging)
    try:
        generate_model_archive(config)
    finally:
        tempfile.tempdir = previous


if __name__ == "__main__":
    sys.exit(main())
