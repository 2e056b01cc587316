"""Uploaded bytes to RGB tensors and back, with Pillow, refusing what could hurt the worker.

Decoding: only the header is read before the declared size is checked against `max_pixels` (decompression
bombs are refused without decoding a pixel); animated images give their first frame; EXIF orientation is
applied; transparency is composited over white in the image's own colour space, then an embedded ICC profile
converts it to sRGB; 16-bit and float images are scaled from their full range.

torch is imported where a tensor is made, not with the module: the header reading (declared_pixels) also serves
the jobs service's checks at submit, which run without torch.
"""

from __future__ import annotations

import io
import warnings
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageCms, ImageOps, UnidentifiedImageError

from .errors import ImageError, TooLargeError

if TYPE_CHECKING:
    import torch

FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")
ALLOWED = "JPEG, PNG, WebP, GIF, BMP or TIFF"
_SRGB = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB"))
# Modes whose pixels are not 8-bit: the value that maps to white. "I" is how 16-bit grey images come from
# some decoders; "F" (TIFF floats) is taken to be in [0, 1].
_HIGH_BIT_DEPTH = {"I;16": 65535, "I;16L": 65535, "I;16B": 65535, "I;16N": 65535, "I": 65535, "F": 1.0}
# Modes with an alpha band -> the same pixels without it (premultiplied and palette modes included).
_ALPHA_MODES = {"RGBA": "RGB", "RGBa": "RGB", "PA": "RGB", "LA": "L", "La": "L"}
# Modes where info["transparency"] marks transparent pixels (a colour or palette entries) -> a mode with alpha.
_KEYED_TRANSPARENCY = {"1": "LA", "L": "LA", "RGB": "RGBA", "P": "RGBA"}


def decode_image(data: bytes, part: str, *, max_pixels: int) -> torch.Tensor:
    """Image file bytes -> (3, H, W) float32 RGB in [0, 1]. Raises ImageError (400) or TooLargeError (413)."""
    return _to_tensor(_decode(data, part, max_pixels))


def decode_mask(data: bytes, part: str, *, max_pixels: int) -> torch.Tensor:
    """Image file bytes -> (1, H, W) float32 grey in [0, 1]: white 1, black 0, exactly. Decoded as any image
    (transparency over white, colours to sRGB), then reduced to its luma as Pillow's "L" mode does."""
    return _to_tensor(_decode(data, part, max_pixels).convert("L"))


def declared_pixels(data: bytes, part: str, *, max_pixels: int) -> int:
    """Width x height as the image's header declares it, nothing decoded; raises as decode_image would for a
    file that is not an image or declares more than `max_pixels`. What decoding it will cost, told beforehand."""
    if not data:
        raise ImageError(part, f"{part} is empty (0 bytes); send an image file: {ALLOWED}")
    with _open_header(data, part, max_pixels) as image:
        return image.width * image.height


def _to_tensor(image: Image.Image) -> torch.Tensor:
    import torch

    pixels = torch.from_numpy(np.array(image))
    return (pixels.permute(2, 0, 1) if pixels.dim() == 3 else pixels[None]).float().div_(255)


def _decode(data: bytes, part: str, max_pixels: int) -> Image.Image:
    """The decoded image in sRGB, its declared size checked before any pixel is decoded."""
    if not data:
        raise ImageError(part, f"{part} is empty (0 bytes); send an image file: {ALLOWED}")
    image = _open_header(data, part, max_pixels)
    try:
        image = ImageOps.exif_transpose(image)  # decodes the pixels (the first frame of an animation)
    except MemoryError:
        raise
    except Exception as error:  # Pillow's decoders raise many types on damaged data (OSError, SyntaxError,
        # struct.error, EOFError, ...): every one of them means this file cannot be used
        raise ImageError(part, f"{part} is a damaged or truncated {image.format} file ({error}); "
                               f"send a complete image file: {ALLOWED}") from None
    try:
        rgb = _to_srgb(image)
    except ValueError as error:  # a colour mode Pillow cannot convert to RGB
        raise ImageError(part, f"{part} has colour mode {image.mode}, which cannot be converted to RGB "
                               f"({error}); send an RGB, greyscale or CMYK image") from None
    return rgb


def _open_header(data: bytes, part: str, max_pixels: int) -> Image.Image:
    """The opened image, its pixels not yet decoded, after checking its declared size against max_pixels."""
    try:
        with warnings.catch_warnings():  # our own max_pixels check below replaces Pillow's bomb warning
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=FORMATS)
    except Image.DecompressionBombError:  # over twice Pillow's own limit: Pillow refuses it before we can look
        raise TooLargeError(part, f"{part} declares more than {2 * Image.MAX_IMAGE_PIXELS} pixels; at most "
                                  f"{max_pixels} pixels are allowed") from None
    except UnidentifiedImageError:
        raise ImageError(part, f"{part} is not an image in a supported format; send {ALLOWED}") from None
    except MemoryError:
        raise
    except Exception as error:  # recognised, but its header is damaged or cut short
        raise ImageError(part, f"{part} has a damaged or truncated header ({error}); send a complete image "
                               f"file: {ALLOWED}") from None
    width, height = image.size
    if width * height > max_pixels:
        raise TooLargeError(part, f"{part} is {width}x{height} = {width * height} pixels; at most "
                                  f"{max_pixels} pixels are allowed")
    return image


def _to_srgb(image: Image.Image) -> Image.Image:
    icc_profile = image.info.get("icc_profile")
    image = _over_white(_to_8_bit(image))
    if icc_profile:
        try:
            source = ImageCms.ImageCmsProfile(io.BytesIO(icc_profile))
            return ImageCms.profileToProfile(image, source, _SRGB, outputMode="RGB")
        except (ImageCms.PyCMSError, OSError):
            pass  # an unreadable profile, or one for another colour space: take the pixels as sRGB, as browsers do
    return image.convert("RGB")


def _to_8_bit(image: Image.Image) -> Image.Image:
    """16-bit, 32-bit and float greyscale scaled from their full range to 8-bit L (Pillow would clip them)."""
    if image.mode not in _HIGH_BIT_DEPTH:
        return image
    pixels = np.asarray(image, dtype=np.float64) / _HIGH_BIT_DEPTH[image.mode]
    return Image.fromarray((pixels.clip(0, 1) * 255).round().astype(np.uint8))


def _over_white(image: Image.Image) -> Image.Image:
    """L, RGB or CMYK, any transparency composited over white in the image's own colour space, so that an
    ICC profile still applies to the result."""
    if "transparency" in image.info and image.mode in _KEYED_TRANSPARENCY:
        image = image.convert(_KEYED_TRANSPARENCY[image.mode])
    if image.mode in _ALPHA_MODES:
        opaque_mode = _ALPHA_MODES[image.mode]
        straight = image.convert(opaque_mode + "A")  # un-premultiplied, palette expanded
        flat = Image.new(opaque_mode, image.size, "white")
        flat.paste(straight.convert(opaque_mode), mask=straight.getchannel("A"))
        return flat
    if image.mode in ("L", "RGB", "CMYK"):
        return image
    return image.convert("L" if image.mode == "1" else "RGB")


def encode_image(image: torch.Tensor, fmt: str = "png", quality: int = 92) -> bytes:
    """(3, H, W) in [0, 1] -> PNG, JPEG or WebP bytes."""
    pixels = image.detach().float().clamp(0, 1).mul(255).round().byte().permute(1, 2, 0).cpu().numpy()
    buffer = io.BytesIO()
    options = {"png": {}, "jpeg": {"quality": quality}, "webp": {"quality": quality}}[fmt]
    Image.fromarray(pixels).save(buffer, format=fmt.upper(), **options)
    return buffer.getvalue()


# The most bytes an encoded image can take, per pixel and on top: PNG stores every row with a filter byte and
# deflate can only add to incompressible rows (5 bytes a block, plus chunk framing), so its bound is exact but
# for that 1 %; JPEG and WebP have no such bound, these hold with a wide margin over uniform noise at quality
# 100, the largest any image made here has encoded to (tests/test_answer_size.py).
ENCODED_BYTES_PER_PIXEL = {"png": 3.0 * 1.01, "jpeg": 4.0, "webp": 3.0}
ENCODED_OVERHEAD_BYTES = {"png": 1024, "jpeg": 2048, "webp": 2048}


def encoded_bytes_bound(height: int, width: int, fmt: str) -> int:
    """The most bytes encode_image can return for an image of height x width in `fmt`, at any quality."""
    rows = height if fmt == "png" else 0  # PNG's filter byte per row
    return int(ENCODED_BYTES_PER_PIXEL[fmt] * (height * width + rows)) + ENCODED_OVERHEAD_BYTES[fmt]


def load_image_file(path: str, *, max_pixels: int = 10**9) -> torch.Tensor:
    """An image file from disk as (3, H, W) in [0, 1]."""
    with open(path, "rb") as file:
        return decode_image(file.read(), path, max_pixels=max_pixels)


def load_mask_file(path: str, *, max_pixels: int = 10**9) -> torch.Tensor:
    """A mask image file from disk as (1, H, W) in [0, 1] (decode_mask)."""
    with open(path, "rb") as file:
        return decode_mask(file.read(), path, max_pixels=max_pixels)
