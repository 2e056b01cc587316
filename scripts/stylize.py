#!/usr/bin/env python3
"""Stylise CONTENT with one or more STYLE images and write the result to -o OUT.

    python scripts/stylize.py content.jpg style.jpg -o out.png --local --weights random --set size=64 --json

--local runs the engine in this process. --set key=value sets any request parameter (README, "Parameters");
values are read as JSON where they parse (`--set size=64`, `--set 'style_blend=[1,0]'`) and as text otherwise.
A progress bar goes to stderr; --json prints the result's fields (those of `response=json`, without the image)
to stdout. Exit status 0 on success, 1 when the request is refused, 2 on a usage error.
"""

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "handler"))

from style_engine import RequestError, VGGFeatures, WeightsError, load_features_state_dict, parse_params, stylize  # noqa: E402
from style_engine.api import result_fields  # noqa: E402
from style_engine.codec import encode_image, load_image_file  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    args = _arguments().parse_args(argv)
    try:
        raw_params = _settings(args.set)
        image, fields = _run_local(args, raw_params)
    except (RequestError, WeightsError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    Path(args.output).write_bytes(image)
    if args.json:
        print(json.dumps(fields))
    return 0


def _arguments() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("content", help="content image file")
    parser.add_argument("styles", nargs="+", metavar="style", help="style image file(s), blended by style_blend")
    parser.add_argument("-o", "--output", required=True, help="where to write the stylised image")
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--local", action="store_true", help="run the engine in this process")
    parser.add_argument("--weights", default="imagenet", help="with --local: imagenet, random or a state dict path")
    parser.add_argument("--device", default=None, help="with --local: torch device (default: cuda if available)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a request parameter")
    parser.add_argument("--json", action="store_true", help="print the result's fields as JSON to stdout")
    return parser


def _settings(pairs: list[str]) -> dict:
    """--set key=value pairs as a params object; values are JSON where they parse, text otherwise."""
    params = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise RequestError("params", f"--set takes KEY=VALUE; got {pair!r}")
        try:
            params[key] = json.loads(value)
        except json.JSONDecodeError:
            params[key] = value
    return params


def _run_local(args, raw_params: dict) -> tuple[bytes, dict]:
    import torch
    from tqdm import tqdm

    style_params, output_params = parse_params(raw_params)
    content = load_image_file(args.content)
    styles = [load_image_file(path) for path in args.styles]
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.weights == "random":
        print("warning: random VGG19 weights: for tests only, the result shows no real style", file=sys.stderr)
    extractor = VGGFeatures(load_features_state_dict(args.weights)).to(device)
    with tqdm(total=style_params.steps, unit="step", file=sys.stderr, leave=False) as bar:
        def show(progress):
            bar.update(progress.step - bar.n)
            bar.set_postfix(loss=f"{progress.loss['total']:.4g}", scale=f"{progress.scale}/{progress.scales}")
        result = stylize(extractor, content, styles, style_params, callback=show)
    image = encode_image(result.image, output_params.format, output_params.quality)
    return image, result_fields(result, output_params.format)


if __name__ == "__main__":
    sys.exit(main())
