#!/usr/bin/env python3
"""The picture of masks of docs/creative-controls.md: content, the two masks and the result, side by side.

    .venv/bin/python scripts/masks_figure.py [--weights random] [--size 256] [--steps 100]

Makes two complementary masks of samples/tubingen.jpg, its sky (the blue pixels of its upper half, edges
softened) and the rest, writes them to samples/masks/ (the requests of docs/creative-controls.md use them),
stylises the photo with starry_night in the sky and shipwreck elsewhere through the engine in this process, and writes
docs/masks.png. With --weights random (the default: the ImageNet weights cannot be downloaded everywhere)
the result shows where each style went, not what real weights would paint.
"""

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFilter

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "handler"))

from style_engine import VGGFeatures, load_features_state_dict, parse_params, stylize  # noqa: E402
from style_engine.codec import load_image_file, load_mask_file  # noqa: E402
from style_engine.presets import PresetLibrary  # noqa: E402

CONTENT = ROOT / "samples" / "tubingen.jpg"
MASKS = ROOT / "samples" / "masks"
STYLES = ("starry_night", "shipwreck")  # in the sky, elsewhere
PANEL_HEIGHT = 192
LABEL_HEIGHT = 16


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", default="random", help="imagenet, random or a VGG19 state dict")
    parser.add_argument("--size", type=int, default=256, help="output size, px")
    parser.add_argument("--steps", type=int, default=100, help="L-BFGS iterations")
    parser.add_argument("--output", default=str(ROOT / "docs" / "masks.png"))
    args = parser.parse_args(argv)
    mask_files = write_masks(Image.open(CONTENT).convert("RGB"))
    extractor = VGGFeatures(load_features_state_dict(args.weights))
    styles = PresetLibrary.load(ROOT / "samples" / "styles").images(STYLES)
    params, _ = parse_params({"size": args.size, "steps": args.steps, "precision": "fp32"})
    result = stylize(extractor, load_image_file(str(CONTENT)), styles, params,
                     masks=[load_mask_file(str(path)) for path in mask_files])
    panels = [("content", Image.open(CONTENT)), *((f"mask_{i + 1}: {name}", Image.open(path))
                                                   for i, (name, path) in enumerate(zip(STYLES, mask_files))),
              (f"result ({args.weights} weights)", _to_image(result.image))]
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    side_by_side(panels).save(args.output, optimize=True)
    print(f"masks_figure: wrote {args.output} and {', '.join(str(path) for path in mask_files)}")
    return 0


def write_masks(content: Image.Image) -> list[Path]:
    """The sky of the photo (blue clearly above red, in the upper half) and the rest, as 8-bit PNGs."""
    pixels = np.asarray(content, dtype=np.int16)
    blue = pixels[..., 2] - pixels[..., 0] > 50
    upper = np.arange(content.height)[:, None] < content.height * 0.55
    sky = Image.fromarray(((blue & upper) * 255).astype(np.uint8)).filter(ImageFilter.GaussianBlur(2))
    rest = sky.point(lambda value: 255 - value)
    MASKS.mkdir(exist_ok=True)
    paths = [MASKS / "tubingen-sky.png", MASKS / "tubingen-rest.png"]
    for mask, path in zip((sky, rest), paths):
        mask.save(path, optimize=True)
    return paths


def side_by_side(panels: list[tuple[str, Image.Image]]) -> Image.Image:
    """The images at one height, left to right, each with its label underneath."""
    scaled = [image.convert("RGB").resize((round(image.width * PANEL_HEIGHT / image.height), PANEL_HEIGHT))
              for _, image in panels]
    figure = Image.new("RGB", (sum(image.width for image in scaled) + 4 * (len(scaled) - 1),
                               PANEL_HEIGHT + LABEL_HEIGHT), "white")
    draw, left = ImageDraw.Draw(figure), 0
    for (label, _), image in zip(panels, scaled):
        figure.paste(image, (left, 0))
        draw.text((left + 4, PANEL_HEIGHT + 3), label, fill="black")
        left += image.width + 4
    return figure


def _to_image(image: torch.Tensor) -> Image.Image:
    return Image.fromarray(image.mul(255).round().byte().permute(1, 2, 0).numpy())


if __name__ == "__main__":
    sys.exit(main())
