"""One TorchServe request -> image bytes and raw parameters (CONTRACT.md, "Request").

TorchServe hands the handler one dict per request. Multipart and form fields and gRPC input-map entries
arrive under their own names (JSON parts already parsed, text parts as str, the rest bytes); a raw body
arrives under "body" (a dict when its content type is application/json and it parses, bytes otherwise).
"""

import base64
import binascii
import re
from dataclasses import dataclass
from typing import Any, Mapping

from style_engine.errors import ImageError, ParamError, TooLargeError
from style_engine.params import parse_json

STYLE_PART = re.compile(r"style(?:_([1-9][0-9]*))?")
JSON_BODY_KEYS = ("content", "style", "params")
USAGE = ('send multipart/form-data with file parts "content" and "style" (and "style_2"...), or a JSON body '
         '{"content": "<base64>", "style": "<base64>" or ["<base64>", ...], "params": {...}}')


@dataclass(frozen=True)
class RawRequest:
    content: bytes
    styles: tuple[bytes, ...]
    params: dict[str, Any]  # not yet validated: style_engine.parse_params does that


def parse_request(row: Mapping[str, Any], max_styles: int) -> RawRequest:
    """Raise ImageError / ParamError (400) or TooLargeError (413) naming the part at fault."""
    if "body" in row:
        return _parse_json_body(row["body"], max_styles)
    return _parse_fields(row, max_styles)


def _parse_fields(row: Mapping[str, Any], max_styles: int) -> RawRequest:
    styles, params = {}, {}
    for name, value in row.items():
        match = STYLE_PART.fullmatch(name)
        if match:
            styles[int(match.group(1) or 1)] = _image_bytes(name, value)
        elif name == "params":
            for key, param in _params_object(value).items():
                params.setdefault(key, param)
        elif name != "content":
            params[name] = value.decode("utf-8", "replace") if isinstance(value, (bytes, bytearray)) else value
    if "content" not in row:
        raise ImageError("content", f"the content image is missing: {USAGE}")
    if not styles:
        raise ImageError("style", f"the style image is missing: {USAGE}")
    _check_style_count(len(styles), max_styles)
    for number in range(1, len(styles) + 1):
        if number not in styles:
            part = _style_part_name(max(styles))
            raise ImageError(part, f"{part} was sent without {_style_part_name(number)}: number style parts "
                                   f"style, style_2, style_3, ... without gaps")
    return RawRequest(_image_bytes("content", row["content"]), tuple(styles[n] for n in sorted(styles)), params)


def _parse_json_body(body: Any, max_styles: int) -> RawRequest:
    if isinstance(body, (bytes, bytearray)):  # TorchServe could not parse it, or it was not sent as JSON
        body = parse_json(body, "body", "the request body", USAGE)
    if not isinstance(body, dict):
        raise ParamError("body", f"the JSON body must be an object; {USAGE}")
    unknown = sorted(set(body) - set(JSON_BODY_KEYS))
    if unknown:
        raise ParamError(unknown[0], f"unknown key {unknown[0]!r} in the JSON body; allowed: "
                                     f"{', '.join(JSON_BODY_KEYS)} (parameters go inside params)")
    for part in ("content", "style"):
        if part not in body:
            raise ImageError(part, f"the {part} image is missing: {USAGE}")
    styles = body["style"] if isinstance(body["style"], list) else [body["style"]]
    if not styles:
        raise ImageError("style", "style must be a base64 string or a non-empty list of them")
    _check_style_count(len(styles), max_styles)
    return RawRequest(
        _base64_image("content", body["content"]),
        tuple(_base64_image(_style_part_name(i + 1), style) for i, style in enumerate(styles)),
        _params_object(body.get("params")),
    )


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


def _style_part_name(number: int) -> str:
    return "style" if number == 1 else f"style_{number}"
