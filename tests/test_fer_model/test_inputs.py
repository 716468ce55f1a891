"""Real photos in, safely: every Pillow mode to the right grey levels, and bounded decoding."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from fer_model import inputs
from fer_model.inputs import MAX_PIXELS, ImageError, ImageTooLarge, image_array, image_batch, open_image

TOP, BOTTOM = slice(0, 24), slice(24, 48)


def encode(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def two_level(mode: str, top, bottom, size=(48, 48)) -> Image.Image:
    """An image of `mode` whose top half is pixel value `top` and bottom half `bottom`."""
    image = Image.new(mode, size, top)
    image.paste(Image.new(mode, (size[0], size[1] // 2), bottom), (0, size[1] // 2))
    return image


def palette_image(transparent: bool) -> Image.Image:
    image = Image.new("P", (48, 48), 0)
    image.putpalette([90, 90, 90, 255, 255, 255] + [0] * 762)
    image.paste(1, (0, 24, 48, 48))
    if transparent:
        image.info["transparency"] = 0
    return image


def rgb_luma(r: int, g: int, b: int) -> int:
    return round(0.299 * r + 0.587 * g + 0.114 * b)


# (what, image, format it is stored in, expected grey of the top half, of the bottom half)
I32_MAX = 2 ** 31 - 1  # Pillow stores mode I in TIFF as signed 32-bit
CASES = [
    ("1", two_level("1", 0, 1), "PNG", 0, 255),
    ("L", two_level("L", 30, 200), "PNG", 30, 200),
    ("LA on black", two_level("LA", (200, 51), (100, 255)), "PNG", 40, 100),  # 200 x 51/255 opacity = 40
    ("P", palette_image(False), "PNG", 90, 255),
    ("P, index 0 transparent", palette_image(True), "PNG", 0, 255),
    ("RGB", two_level("RGB", (120, 120, 120), (0, 0, 255)), "PNG", 120, rgb_luma(0, 0, 255)),
    ("RGBA on black", two_level("RGBA", (200, 200, 200, 51), (255, 0, 0, 255)), "PNG", 40, rgb_luma(255, 0, 0)),
    ("CMYK", two_level("CMYK", (0, 0, 0, 0), (0, 0, 0, 255)), "TIFF", 255, 0),
    ("I;16 by 16 bits", two_level("I;16", 257 * 40, 65535), "PNG", 40, 255),  # was all white: clipped at 255
    ("I;16 TIFF", two_level("I;16", 0, 257 * 200), "TIFF", 0, 200),
    ("I by 31 bits", two_level("I", round(I32_MAX * 40 / 255), I32_MAX), "TIFF", 40, 255),
    ("I negative", two_level("I", -5, 0), "TIFF", 0, 0),
    ("F as 0..255", two_level("F", 40.4, 300.0), "TIFF", 40, 255),  # clipped like array input
    ("F negative", two_level("F", -3.0, 254.6), "TIFF", 0, 255),
]


@pytest.mark.parametrize("what, image, fmt, top, bottom", CASES, ids=[c[0] for c in CASES])
def test_every_mode_becomes_the_right_grey(what, image, fmt, top, bottom):
    data = encode(image, fmt)
    decoded = open_image(data)
    assert decoded.mode.split(";")[0] == image.mode.split(";")[0], "the file keeps its mode"
    gray = image_array(data)
    assert gray.dtype == np.uint8 and gray.shape == (48, 48)
    assert (gray[TOP] == top).all() and (gray[BOTTOM] == bottom).all(), (what, np.unique(gray[TOP]), np.unique(gray[BOTTOM]))


@pytest.mark.parametrize("mode, value, fmt, expected", [
    ("I;16", 257 * 77, "PNG", 77), ("I", round(I32_MAX * 0.5), "TIFF", 128), ("F", 63.0, "TIFF", 63),
    ("LA", (250, 102), "PNG", 100), ("RGB", (10, 200, 30), "JPEG", rgb_luma(10, 200, 30)),
])
def test_resized_modes_keep_their_grey(mode, value, fmt, expected):
    gray = image_array(encode(Image.new(mode, (100, 70), value), fmt))
    assert np.abs(gray.astype(int) - expected).max() <= (2 if fmt == "JPEG" else 0)


def png_header(width: int, height: int) -> bytes:
    """A PNG that declares width x height 8-bit grey pixels and holds none (IHDR, empty IDAT, IEND)."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b""))


@pytest.mark.parametrize("width, height, shown", [
    (7000, 7000, "image of 7000 x 7000 = 49.0 Mpx"),  # below Pillow's own limit: ours refuses it
    (10000, 10000, "image of 10000 x 10000 = 100.0 Mpx"),  # past Pillow's warning (89.5 Mpx): ours refuses it
    (20000, 20000, "image of 400.0 Mpx"),  # Pillow's DecompressionBombError
])
def test_an_image_beyond_the_limit_is_refused_from_its_header(width, height, shown):
    assert MAX_PIXELS == 40_000_000
    with pytest.raises(ImageTooLarge, match=f"{shown} exceeds the limit of 40 Mpx"):
        image_array(png_header(width, height))
    with pytest.raises(ImageError, match=f"^row 1: {shown} exceeds the limit of 40 Mpx"):
        image_batch([encode(Image.new("L", (48, 48)), "PNG"), png_header(width, height)])


def test_the_limit_is_inclusive_and_applies_to_arrays():
    side = int(MAX_PIXELS ** 0.5)
    assert side * side <= MAX_PIXELS
    with pytest.raises(ImageError, match="not a readable image"):  # within the limit: decoding is tried
        open_image(png_header(side, side))
    with pytest.raises(ImageTooLarge, match="image of 8000 x 5001 = 40.0 Mpx exceeds the limit of 40 Mpx"):
        image_array(np.zeros((5001, 8000), np.uint8))


def test_a_raw_2304_byte_value_that_declares_a_huge_image_is_not_read_as_raw():
    data = png_header(20000, 20000)
    data += b"\0" * (48 * 48 - len(data))
    assert len(data) == 48 * 48
    with pytest.raises(ImageTooLarge):
        image_array(data)


def test_a_large_jpeg_is_decoded_at_a_reduced_size():
    data = encode(Image.new("RGB", (2000, 1500), (100, 100, 100)), "JPEG")
    image = open_image(data)
    assert inputs.DRAFT_SIZE <= min(image.size) and image.size[0] < 2000  # DCT-scaled, not full size
    assert np.abs(image_array(data).astype(int) - 100).max() <= 1
    small = encode(Image.new("L", (48, 48), 77), "JPEG")
    assert open_image(small).size == (48, 48)


def test_an_unsupported_mode_is_an_image_error():
    with pytest.raises(ImageError, match="cannot read a LAB image as grayscale"):
        inputs.to_gray48(Image.new("LAB", (60, 60)))


def test_a_photo_stored_sideways_is_read_upright():
    """Phones store a portrait photo as landscape pixels with an EXIF orientation; it is turned upright."""
    image = Image.new("L", (60, 40), 0)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to view"
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", exif=exif)
    assert open_image(buffer.getvalue()).size == (40, 60)
    plain = io.BytesIO()
    image.save(plain, format="JPEG")
    assert open_image(plain.getvalue()).size == (60, 40)
