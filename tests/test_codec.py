"""Image decoding of hostile and unusual files: each is refused with the right error, or decoded to the exact
sRGB pixels a browser would show."""

import io
import struct
import subprocess
import sys
import warnings
import zlib

import numpy as np
import pytest
from PIL import Image

from conftest import ROOT
from image_files import black_png_bomb, encode, gif_declaring, jpeg_declaring, png, png_rows
from style_engine.codec import decode_image
from style_engine.errors import ImageError, TooLargeError

LIMIT = 40_000_000  # the archive's max_image_pixels


def pixels(data: bytes) -> np.ndarray:
    """Decoded (H, W, 3) sRGB values 0..255."""
    return (decode_image(data, "content", max_pixels=LIMIT) * 255).round().to(int).permute(1, 2, 0).numpy()


# --- refused --------------------------------------------------------------------------------------------------

NOISE = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)  # incompressible: long scans
NOISY = {fmt: encode(Image.fromarray(NOISE), fmt) for fmt in ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")}


@pytest.mark.parametrize("data, says", [
    (b"", "is empty (0 bytes)"),
    (b"hello, this is text", "not an image in a supported format"),
    (b'<svg xmlns="http://www.w3.org/2000/svg" width="64" height="64"><rect width="64" height="64"/></svg>',
     "not an image in a supported format"),
    (b"%PDF-1.4\n1 0 obj <<>> endobj\ntrailer <<>>\n%%EOF\n", "not an image in a supported format"),
    (encode(Image.new("RGB", (32, 32), "red"), "ICO"), "not an image in a supported format"),
    (NOISY["JPEG"][:400], "damaged or truncated header"),  # cut inside the JPEG's tables
    *((NOISY[fmt][:len(NOISY[fmt]) // 2], f"damaged or truncated {fmt} file")
      for fmt in ("JPEG", "PNG", "GIF", "BMP", "TIFF")),
    (NOISY["WEBP"][:len(NOISY["WEBP"]) // 2], "damaged or truncated header"),  # libwebp checks the length first
    (NOISY["PNG"][:100] + bytes(64) + NOISY["PNG"][164:], "damaged or truncated PNG file"),  # zeroed IDAT bytes
], ids=["zero bytes", "text", "svg", "pdf", "ico", "jpeg cut in header",
        *(f"{fmt.lower()} cut" for fmt in ("JPEG", "PNG", "GIF", "BMP", "TIFF", "WEBP")), "png corrupt"])
def test_unusable_files_are_a_400_naming_the_part_and_the_formats(data, says):
    with pytest.raises(ImageError) as error:
        decode_image(data, "style_2", max_pixels=LIMIT)
    assert error.value.to_json()["code"] == 400 and error.value.field == "style_2"
    assert says in str(error.value) and str(error.value).startswith("style_2 ")
    assert "JPEG, PNG, WebP, GIF, BMP or TIFF" in str(error.value)


def damaged_copies(data: bytes, count: int, seed: int):
    """`count` copies of `data`, each with a few bytes overwritten, cut short, or with random bytes inserted."""
    rng = np.random.default_rng(seed)
    for _ in range(count):
        damaged, where = bytearray(data), int(rng.integers(len(data)))
        kind = rng.integers(3)
        if kind == 0:
            for position in rng.integers(len(data), size=int(rng.integers(1, 9))):
                damaged[position] = int(rng.integers(256))
        elif kind == 1:
            del damaged[where:]
        else:
            damaged[where:where] = rng.bytes(int(rng.integers(1, 65)))
        yield bytes(damaged)


@pytest.mark.parametrize("fmt", sorted(NOISY))
def test_randomly_damaged_files_are_decoded_or_refused_nothing_else(fmt):
    # Pillow's decoders raise many exception types on damaged data; none may escape as anything but a 400
    # (or a 413 where the damage enlarged the declared size).
    outcomes = {"decoded": 0, "ImageError": 0, "TooLargeError": 0}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Pillow warns about the damage it tolerates
        for data in damaged_copies(NOISY[fmt], 300, seed=len(fmt)):
            try:
                decode_image(data, "content", max_pixels=1_000_000)
                outcomes["decoded"] += 1
            except (ImageError, TooLargeError) as error:
                outcomes[type(error).__name__] += 1
    assert outcomes["ImageError"] > 0 and sum(outcomes.values()) == 300


@pytest.mark.parametrize("data, says", [
    (png(100_000, 100_000, 8, 2, png_rows(b"\x00" * 3)), "at most 40000000 pixels"),
    (png(8000, 5001, 8, 2, png_rows(b"\x00" * 3)), "8000x5001 = 40008000 pixels; at most 40000000"),
    (jpeg_declaring(60_000, 60_000), "at most 40000000 pixels"),
    (gif_declaring(65535, 65535), "at most 40000000 pixels"),
], ids=["png 100000x100000", "png just over", "jpeg 60000x60000", "gif 65535x65535"])
def test_declared_sizes_over_the_limit_are_a_413(data, says):
    with pytest.raises(TooLargeError) as error:
        decode_image(data, "content", max_pixels=LIMIT)
    assert error.value.to_json() == {"code": 413, "type": "TooLarge", "field": "content", "message": str(error.value)}
    assert says in str(error.value)


def test_a_decompression_bomb_is_refused_before_a_pixel_is_decoded(tmp_path):
    # A fresh process, so that its peak memory measures this decode alone: decoding the 8000x8000 bomb would
    # take 192 MB; the header check takes almost nothing.
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(black_png_bomb(8000))
    script = f"""
import resource, sys, time
sys.path.insert(0, {str(ROOT / "handler")!r})
from style_engine.codec import decode_image
from style_engine.errors import TooLargeError
data = open({str(bomb)!r}, "rb").read()
before, start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, time.perf_counter()
try:
    decode_image(data, "content", max_pixels={LIMIT})
except TooLargeError as error:
    refused = time.perf_counter() - start
    grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    import io
    from PIL import Image
    Image.MAX_IMAGE_PIXELS, start = None, time.perf_counter()
    Image.open(io.BytesIO(data)).load()  # what decoding its pixels would cost, on this machine, now
    print(error.status, refused, time.perf_counter() - start, grown)
"""
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    status, seconds, decoding_seconds, grown_kib = run.stdout.split()
    assert len(bomb.read_bytes()) < 300_000 and status == "413"
    assert float(seconds) < 0.1 * float(decoding_seconds), "the header alone decides"
    assert int(grown_kib) < 10_000, "no pixel buffer was allocated"


def test_the_bomb_is_a_real_8000x8000_image():
    # The control for the test above: its refusal is the size check's, not a broken file's. Inflated in pieces,
    # the pixel data is 8000 rows of 1 filter byte and 3x8000 bytes, without ever being held at once.
    bomb = black_png_bomb(8000)
    image = Image.open(io.BytesIO(bomb))
    assert (image.format, image.mode, image.size) == ("PNG", "RGB", (8000, 8000))
    idat_length = struct.unpack(">I", bomb[33:37])[0]
    inflater, inflated, pending = zlib.decompressobj(), 0, bomb[41:41 + idat_length]
    while pending:
        inflated += len(inflater.decompress(pending, 1 << 20))
        pending = inflater.unconsumed_tail
    assert inflated == 8000 * (1 + 3 * 8000) and inflater.eof


# --- decoded --------------------------------------------------------------------------------------------------


def test_animated_gif_and_webp_give_their_first_frame():
    frames = [Image.new("RGB", (32, 32), colour) for colour in ((255, 0, 0), (0, 0, 255))]
    for fmt, options in (("GIF", {}), ("WEBP", {"lossless": True})):
        data = encode(frames[0], fmt, save_all=True, append_images=frames[1:], duration=100, loop=0, **options)
        assert Image.open(io.BytesIO(data)).n_frames == 2
        assert (pixels(data) == (255, 0, 0)).all(), fmt


@pytest.mark.parametrize("mode, value, fmt, expected", [
    ("1", 1, "PNG", (255, 255, 255)),
    ("L", 77, "PNG", (77, 77, 77)),
    ("RGB", (10, 200, 30), "PNG", (10, 200, 30)),
    ("RGB", (10, 200, 30), "BMP", (10, 200, 30)),
    ("RGB", (10, 200, 30), "TIFF", (10, 200, 30)),
    ("RGBA", (10, 200, 30, 255), "PNG", (10, 200, 30)),
    ("RGBA", (0, 0, 0, 0), "PNG", (255, 255, 255)),  # fully transparent: the white background
    ("RGBA", (0, 0, 0, 51), "PNG", (204, 204, 204)),  # 20 % black over white
    ("LA", (0, 153), "PNG", (102, 102, 102)),  # 60 % black over white
    ("PA", (0, 0), "TIFF", (255, 255, 255)),
    ("CMYK", (255, 0, 0, 0), "TIFF", (0, 255, 255)),  # cyan
    ("CMYK", (0, 255, 255, 0), "JPEG", (255, 0, 0)),  # magenta and yellow ink: red
    ("CMYK", (0, 0, 0, 255), "JPEG", (0, 0, 0)),
    ("I;16", 0x4000, "PNG", (64, 64, 64)),  # 16384 / 65535 of white
    ("I;16", 0x4000, "TIFF", (64, 64, 64)),
    ("I;16B", 0xFFFF, "TIFF", (255, 255, 255)),
    ("I", 1000, "TIFF", (4, 4, 4)),  # read as 16-bit: 1000 / 65535 of white
    ("F", 0.25, "TIFF", (64, 64, 64)),  # floats span 0 .. 1
    ("F", 7.5, "TIFF", (255, 255, 255)),  # and are clipped to it
])
def test_every_colour_mode_gives_its_srgb_values(mode, value, fmt, expected):
    data = encode(Image.new(mode, (4, 3), value), fmt)
    assert Image.open(io.BytesIO(data)).mode == mode  # the file really holds that mode
    assert pixels(data).shape == (3, 4, 3)
    assert (pixels(data) == expected).all(), pixels(data)[0, 0]


def test_palette_images_with_and_without_a_transparent_entry():
    image = Image.new("P", (2, 1))
    image.putpalette([200, 100, 50, 0, 0, 0])
    image.putdata([0, 1])
    assert pixels(encode(image, "PNG")).tolist() == [[[200, 100, 50], [0, 0, 0]]]
    assert pixels(encode(image, "PNG", transparency=1)).tolist() == [[[200, 100, 50], [255, 255, 255]]]
    assert pixels(encode(image, "GIF", transparency=1)).tolist() == [[[200, 100, 50], [255, 255, 255]]]


@pytest.mark.parametrize("mode, colours, key", [
    ("L", [0, 100], 100), ("RGB", [(10, 20, 30), (1, 2, 3)], (1, 2, 3)), ("1", [0, 255], 255),
])
def test_a_transparent_colour_key_shows_white(mode, colours, key):
    image = Image.new(mode, (2, 1))
    image.putdata(colours)
    first = colours[0] if isinstance(colours[0], tuple) else (colours[0],) * 3
    assert pixels(encode(image, "PNG", transparency=key)).tolist() == [[list(first), [255, 255, 255]]]


def test_16_bit_colour_png_keeps_its_full_range():
    # Pillow reduces 16-bit colour to 8 bits by keeping the high byte
    row = struct.pack(">6H", 0xFFFF, 0x8000, 0x0000, 0x1234, 0x7F80, 0x00FF)
    assert pixels(png(2, 1, 16, 2, png_rows(row))).tolist() == [[[255, 128, 0], [0x12, 0x7F, 0]]]
    grey_alpha = struct.pack(">4H", 0x0000, 0x8000, 0xFFFF, 0xFFFF)  # black at half alpha, opaque white
    assert pixels(png(2, 1, 16, 4, png_rows(grey_alpha))).tolist() == [[[127, 127, 127], [255, 255, 255]]]


# EXIF orientation: how the stored pixels relate to the picture as shown (numpy, independent of Pillow).
STORED_FOR_ORIENTATION = {
    1: lambda shown: shown,
    2: np.fliplr,
    3: lambda shown: np.rot90(shown, 2),
    4: np.flipud,
    5: lambda shown: shown.transpose(1, 0, 2),
    6: lambda shown: np.rot90(shown, 1),  # the camera was turned: stored row 0 is the picture's right column
    7: lambda shown: np.rot90(shown, 2).transpose(1, 0, 2),
    8: lambda shown: np.rot90(shown, -1),
}
SHOWN = np.array([[[255, 0, 0], [0, 255, 0], [0, 0, 255]],
                  [[255, 255, 0], [0, 255, 255], [255, 0, 255]]], dtype=np.uint8)  # 3 wide, 2 high


@pytest.mark.parametrize("orientation", sorted(STORED_FOR_ORIENTATION))
def test_exif_orientation_is_applied(orientation):
    stored = Image.fromarray(np.ascontiguousarray(STORED_FOR_ORIENTATION[orientation](SHOWN)))
    exif = Image.Exif()
    exif[0x0112] = orientation
    assert (pixels(encode(stored, "PNG", exif=exif)) == SHOWN).all()


def test_exif_orientation_in_a_jpeg():
    shown = np.kron(SHOWN, np.ones((16, 16, 1), dtype=np.uint8))  # 16 px blocks survive JPEG's 8x8 DCT
    exif = Image.Exif()
    exif[0x0112] = 6
    data = encode(Image.fromarray(np.ascontiguousarray(np.rot90(shown, 1))), "JPEG", exif=exif, quality=100,
                  subsampling=0)  # full-resolution colour: no chroma bleeding across the blocks' edges
    assert np.abs(pixels(data) - shown).max() <= 2


# ICC profiles, built here byte by byte (Pillow can only create sRGB and Lab ones): matrix/TRC profiles
# as cameras and editors embed them.
D50 = np.array([0.9642, 1.0, 0.8249])
D65_XY = (0.3127, 0.3290)
BRADFORD = np.array([[0.8951, 0.2664, -0.1614], [-0.7502, 1.7135, 0.0367], [0.0389, -0.0685, 1.0296]])
SRGB_PRIMARIES = ((0.64, 0.33), (0.30, 0.60), (0.15, 0.06))
ADOBE_RGB_PRIMARIES = ((0.64, 0.33), (0.21, 0.71), (0.15, 0.06))
ADOBE_RGB_GAMMA = 563 / 256


def xyz_of(x: float, y: float) -> np.ndarray:
    return np.array([x / y, 1.0, (1 - x - y) / y])


def rgb_to_xyz(primaries) -> np.ndarray:
    """Linear RGB -> XYZ for these primaries and a D65 white."""
    columns = np.stack([xyz_of(*p) for p in primaries], axis=1)
    return columns * np.linalg.solve(columns, xyz_of(*D65_XY))


def icc_profile(colour_space: bytes, tags: dict[bytes, bytes]) -> bytes:
    def s15(values):
        return b"".join(struct.pack(">i", round(v * 65536)) for v in values)

    table, body, start = b"", b"", 128 + 4 + 12 * len(tags)
    for signature, data in tags.items():
        data += b"\0" * (-len(data) % 4)
        table += signature + struct.pack(">II", start + len(body), len(data))
        body += data
    header = (struct.pack(">I4sI4s4s4s", start + len(body), b"\0" * 4, 0x02100000, b"mntr", colour_space, b"XYZ ")
              + b"\0" * 12 + b"acsp" + b"\0" * 28 + s15(D50) + b"\0" * 48)
    return header + struct.pack(">I", len(tags)) + table + body


def xyz_tag(xyz) -> bytes:
    return b"XYZ \0\0\0\0" + b"".join(struct.pack(">i", round(v * 65536)) for v in xyz)


def gamma_tag(gamma: float) -> bytes:
    return b"curv\0\0\0\0" + struct.pack(">IH", 1, round(gamma * 256))


def description_tag(text: str) -> bytes:
    ascii_text = text.encode() + b"\0"
    return b"desc\0\0\0\0" + struct.pack(">I", len(ascii_text)) + ascii_text + b"\0" * 78


def rgb_profile(primaries, gamma: float) -> bytes:
    # ICC colorants are adapted to the D50 connection space (Bradford, as LittleCMS's own sRGB is)
    source, target = BRADFORD @ xyz_of(*D65_XY), BRADFORD @ D50
    colorants = np.linalg.inv(BRADFORD) @ np.diag(target / source) @ BRADFORD @ rgb_to_xyz(primaries)
    return icc_profile(b"RGB ", {
        b"desc": description_tag("test RGB"), b"wtpt": xyz_tag(D50),
        **{channel + b"XYZ": xyz_tag(colorants[:, i]) for i, channel in enumerate((b"r", b"g", b"b"))},
        **{channel + b"TRC": gamma_tag(gamma) for channel in (b"r", b"g", b"b")}})


def grey_profile(gamma: float) -> bytes:
    return icc_profile(b"GRAY", {b"desc": description_tag("test grey"), b"wtpt": xyz_tag(D50),
                                 b"kTRC": gamma_tag(gamma)})


def srgb_encoded(linear) -> np.ndarray:
    linear = np.clip(linear, 0, 1)
    return 255 * np.where(linear <= 0.0031308, 12.92 * linear, 1.055 * linear ** (1 / 2.4) - 0.055)


ADOBE_RGB = rgb_profile(ADOBE_RGB_PRIMARIES, ADOBE_RGB_GAMMA)


@pytest.mark.parametrize("fmt, options", [("PNG", {}), ("JPEG", {"quality": 100}), ("TIFF", {}),
                                          ("WEBP", {"lossless": True})])
def test_an_adobe_rgb_profile_is_converted_to_srgb(fmt, options):
    colour = np.array([100, 150, 200])
    linear_srgb = np.linalg.solve(rgb_to_xyz(SRGB_PRIMARIES),
                                  rgb_to_xyz(ADOBE_RGB_PRIMARIES) @ (colour / 255) ** ADOBE_RGB_GAMMA)
    expected = srgb_encoded(linear_srgb)  # about (66, 151, 203): the same numbers look duller in sRGB
    data = encode(Image.new("RGB", (8, 8), tuple(colour)), fmt, icc_profile=ADOBE_RGB, **options)
    assert np.abs(pixels(data)[0, 0] - expected).max() <= 1.5


def test_a_grey_profile_applies_to_grey_images_with_alpha_too():
    linear_grey = grey_profile(1.0)  # 128 means half the light: sRGB's 188
    expected = round(float(srgb_encoded(128 / 255)))
    for image in (Image.new("L", (4, 4), 128), Image.new("LA", (4, 4), (128, 255))):
        assert (pixels(encode(image, "PNG", icc_profile=linear_grey)) == expected).all(), image.mode


def test_a_profile_that_does_not_fit_the_pixels_is_ignored():
    for profile in (grey_profile(1.0), b"not an ICC profile" * 10):
        data = encode(Image.new("RGB", (4, 4), (128, 64, 32)), "PNG", icc_profile=profile)
        assert (pixels(data) == (128, 64, 32)).all()


def test_exif_orientation_and_icc_profile_together():
    shown = np.full((2, 3, 3), (100, 150, 200), dtype=np.uint8)
    shown[0, 0] = (0, 0, 0)
    exif = Image.Exif()
    exif[0x0112] = 8
    data = encode(Image.fromarray(np.ascontiguousarray(np.rot90(shown, -1))), "PNG", exif=exif,
                  icc_profile=ADOBE_RGB)
    decoded = pixels(data)
    assert decoded.shape == (2, 3, 3) and (decoded[0, 0] == 0).all()
    assert np.abs(decoded[1, 2] - (66, 151, 203)).max() <= 1
