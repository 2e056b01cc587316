"""One TorchServe request -> image bytes and raw parameters (docs/api.md), and the pixels its images declare;
decoding.py decodes them.

TorchServe hands the handler one dict per request. Multipart and form fields and gRPC input-map entries
arrive under their own names (JSON parts already parsed, text parts as str, the rest bytes); a raw body
arrives under "body" (a dict when its content type is application/json and it parses, bytes otherwise).
It runs without torch: the jobs service refuses at submit what this refuses (jobs/checks.py).
"""

import base64
import binascii
import re
from dataclasses import dataclass
from typing import Any, Mapping

from style_engine.codec import declared_pixels as image_pixels
from style_engine.errors import ImageError, ParamError, TooLargeError
from style_engine.params import parse_json

STYLE_PART = re.compile(r"style(?:_([1-9][0-9]*))?")
MASK_PART = re.compile(r"mask_([1-9][0-9]*)")
JSON_BODY_KEYS = ("content", "style", "masks", "init_image", "params", "checkpoint")
USAGE = ('send multipart/form-data with the file part "content", style images as "style" (and "style_2"...) '
         'or preset names in "presets", optional "mask_1"... and "init_image"; or a JSON body {"content": '
         '"<base64>", "style": "<base64>" or ["<base64>", ...], "masks": ["<base64>", ...], "init_image": '
         '"<base64>", "params": {...}}')


@dataclass(frozen=True)
class RawRequest:
    content: bytes
    styles: tuple[bytes, ...]
    params: dict[str, Any]  # not yet validated: style_engine.parse_params does that
    masks: tuple[bytes, ...] = ()
    init_image: bytes | None = None
    checkpoint: bytes | None = None  # a segment's, to resume from (style_engine/segments.py)


def parse_request(row: Mapping[str, Any], max_styles: int) -> RawRequest:
    """Raise ImageError / ParamError (400) or TooLargeError (413) naming the part at fault."""
    if "body" in row:
        return _parse_json_body(row["body"], max_styles)
    return _parse_fields(row, max_styles)


def declared_pixels(request: RawRequest, max_pixels: int) -> int:
    """The pixels decoding.decode_job will decode for this request's uploaded images, read from their headers
    only. Raises ImageError / TooLargeError naming the part at fault, as decoding it would."""
    parts = [("content", request.content), *((style_part_name(i + 1), data) for i, data in enumerate(request.styles)),
             *((f"mask_{i + 1}", data) for i, data in enumerate(request.masks)),
             *([("init_image", request.init_image)] if request.init_image is not None else [])]
    return sum(image_pixels(data, part, max_pixels=max_pixels) for part, data in parts)


def _parse_fields(row: Mapping[str, Any], max_styles: int) -> RawRequest:
    styles, masks, params = {}, {}, {}
    for name, value in row.items():
        style, mask = STYLE_PART.fullmatch(name), MASK_PART.fullmatch(name)
        if name == "style_1":  # would silently stand for `style`, or be overwritten by it
            raise ImageError(name, "style_1 is no part name: the first style image is the part style, the next "
                                   "ones style_2, style_3, ...")
        if style:
            styles[int(style.group(1) or 1)] = _image_bytes(name, value)
        elif mask:
            masks[int(mask.group(1))] = _image_bytes(name, value)
        elif name == "params":
            for key, param in _params_object(value).items():
                params.setdefault(key, param)
        elif name not in ("content", "init_image", "checkpoint"):
            params[name] = value.decode("utf-8", "replace") if isinstance(value, (bytes, bytearray)) else value
    if "content" not in row:
        raise ImageError("content", f"the content image is missing: {USAGE}")
    _check_style_count(len(styles), max_styles)
    _check_mask_count(len(masks), max_styles)
    init_image = _image_bytes("init_image", row["init_image"]) if "init_image" in row else None
    checkpoint = _image_bytes("checkpoint", row["checkpoint"]) if "checkpoint" in row else None
    return RawRequest(_image_bytes("content", row["content"]), _numbered(styles, style_part_name), params,
                      _numbered(masks, lambda number: f"mask_{number}"), init_image, checkpoint)


def _numbered(parts: dict[int, bytes], part_name) -> tuple[bytes, ...]:
    """The parts numbered 1, 2, ... in order; an ImageError naming the last when a number is missing."""
    for number in range(1, len(parts) + 1):
        if number not in parts:
            last = part_name(max(parts))
            raise ImageError(last, f"{last} was sent without {part_name(number)}: number the parts {part_name(1)}, "
                                   f"{part_name(2)}, {part_name(3)}, ... without gaps")
    return tuple(parts[number] for number in sorted(parts))


def _parse_json_body(body: Any, max_styles: int) -> RawRequest:
    if isinstance(body, (bytes, bytearray)):  # TorchServe could not parse it, or it was not sent as JSON
        body = parse_json(body, "body", "the request body", USAGE)
    if not isinstance(body, dict):
        raise ParamError("body", f"the JSON body must be an object; {USAGE}")
    unknown = sorted(set(body) - set(JSON_BODY_KEYS))
    if unknown:
        raise ParamError(unknown[0], f"unknown key {unknown[0]!r} in the JSON body; allowed: "
                                     f"{', '.join(JSON_BODY_KEYS)} (parameters go inside params)")
    if "content" not in body:
        raise ImageError("content", f"the content image is missing: {USAGE}")
    styles, masks = _base64_list(body, "style"), _base64_list(body, "masks")
    _check_style_count(len(styles), max_styles)
    _check_mask_count(len(masks), max_styles)
    return RawRequest(
        _base64_image("content", body["content"]),
        tuple(_base64_image(style_part_name(i + 1), style) for i, style in enumerate(styles)),
        _params_object(body.get("params")),
        tuple(_base64_image(f"mask_{i + 1}", mask) for i, mask in enumerate(masks)),
        _base64_image("init_image", body["init_image"]) if "init_image" in body else None,
        _base64_image("checkpoint", body["checkpoint"]) if "checkpoint" in body else None,
    )


def _base64_list(body: dict, key: str) -> list:
    """body[key] as a list: a single base64 string is a list of one, an absent key an empty list."""
    value = body.get(key, [])
    return value if isinstance(value, list) else [value]


def _params_object(value: Any) -> dict[str, Any]:
    if value is None:
        return {}
    if isinstance(value, (bytes, bytearray, str)):
        value = parse_json(value, "params", "params", "it must be a JSON object")
    if not isinstance(value, dict):
        raise ParamError("params", f"params must be a JSON object; got {type(value).__name__}")
    return value


def _image_bytes(part: str, value: Any) -> bytes:
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    if isinstance(value, str):  # TorchServe decoded a part sent as text/*: undo it
        return value.encode("utf-8")
    raise ImageError(part, f"{part} must be an image file part, not {type(value).__name__}")


def _base64_image(part: str, value: Any) -> bytes:
    if not isinstance(value, str):
        raise ImageError(part, f"{part} must be a base64 string of an image file; got {type(value).__name__}")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise ImageError(part, f"{part} is not valid base64") from None


def _check_style_count(count: int, max_styles: int) -> None:
    if count > max_styles:
        raise TooLargeError("style", f"{count} style images sent; at most {max_styles} are allowed")


def _check_mask_count(count: int, max_styles: int) -> None:
    """Before any mask is decoded: no request has more styles than max_styles, so none may have more masks.
    (check_job, once the styles are known, holds the masks to one per style.)"""
    if count > max_styles:
        raise ImageError(f"mask_{max_styles + 1}", f"{count} masks sent: more masks than styles (one mask per "
                                                   f"style at most, and at most {max_styles} styles)")


def style_part_name(number: int) -> str:
    return "style" if number == 1 else f"style_{number}"
