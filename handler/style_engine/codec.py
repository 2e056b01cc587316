"""Uploaded bytes to RGB tensors and back, with Pillow, refusing what could hurt the worker.

Decoding: the declared size is checked against `max_pixels` before any pixel is decoded (decompression
bombs); animated images give their first frame; EXIF orientation is applied; an embedded ICC profile is
converted to sRGB; transparent pixels are composited over white; 16-bit images keep their full range.
"""

import io
import warnings

import numpy as np
import torch
from PIL import Image, ImageCms, ImageOps, UnidentifiedImageError

from .errors import ImageError, TooLargeError

FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")
_SRGB = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB"))
_HIGH_BIT_DEPTH = {"I;16": 65535, "I;16L": 65535, "I;16B": 65535, "I;16N": 65535, "I": 65535, "F": 1.0}


def decode_image(data: bytes, part: str, *, max_pixels: int) -> torch.Tensor:
    """Image file bytes -> (3, H, W) float32 RGB in [0, 1]. Raises ImageError (400) or TooLargeError (413)."""
    if not data:
        raise ImageError(part, f"{part} is empty; send an image file ({', '.join(FORMATS)})")
    try:
        with warnings.catch_warnings():  # our own max_pixels check below replaces Pillow's bomb warning
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=FORMATS)
    except UnidentifiedImageError:
        raise ImageError(part, f"{part} is not an image in a supported format ({', '.join(FORMATS)})") from None
    except Image.DecompressionBombError:
        raise TooLargeError(part, f"{part} declares more pixels than allowed ({max_pixels})") from None
    width, height = image.size
    if width * height > max_pixels:
        raise TooLargeError(part, f"{part} is {width}x{height} = {width * height} pixels; at most "
                                  f"{max_pixels} pixels are allowed")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            rgb = _to_srgb(ImageOps.exif_transpose(image))
    except (OSError, ValueError, SyntaxError, EOFError, IndexError, TypeError) as error:
        raise ImageError(part, f"{part} could not be decoded ({image.format}): {error}") from None
    return torch.from_numpy(np.array(rgb)).permute(2, 0, 1).float().div_(255)


def _to_srgb(image: Image.Image) -> Image.Image:
    icc_profile = image.info.get("icc_profile")
    if image.mode in _HIGH_BIT_DEPTH:
        pixels = np.asarray(image, dtype=np.float64) / _HIGH_BIT_DEPTH[image.mode]
        image = Image.fromarray((pixels.clip(0, 1) * 255).round().astype(np.uint8))
    if image.mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        image = Image.alpha_composite(Image.new("RGBA", rgba.size, "white"), rgba).convert("RGB")
    elif image.mode not in ("RGB", "L", "CMYK"):
        image = image.convert("RGB")
    if icc_profile:
        try:
            source = ImageCms.ImageCmsProfile(io.BytesIO(icc_profile))
            return ImageCms.profileToProfile(image, source, _SRGB, outputMode="RGB")
        except (ImageCms.PyCMSError, OSError):
            pass  # an unreadable or mismatched profile: treat the pixels as sRGB, as browsers do
    return image.convert("RGB")


def encode_image(image: torch.Tensor, fmt: str = "png", quality: int = 92) -> bytes:
    """(3, H, W) in [0, 1] -> PNG, JPEG or WebP bytes."""
    pixels = image.detach().float().clamp(0, 1).mul(255).round().byte().permute(1, 2, 0).cpu().numpy()
    buffer = io.BytesIO()
    options = {"png": {}, "jpeg": {"quality": quality}, "webp": {"quality": quality}}[fmt]
    Image.fromarray(pixels).save(buffer, format=fmt.upper(), **options)
    return buffer.getvalue()


def load_image_file(path: str, *, max_pixels: int = 10**9) -> torch.Tensor:
    """An image file from disk as (3, H, W) in [0, 1]."""
    with open(path, "rb") as file:
        return decode_image(file.read(), path, max_pixels=max_pixels)
