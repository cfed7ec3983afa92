"""check_image on the bad inputs people (and attackers) really send, and on every colour mode PIL yields."""

from __future__ import annotations

import hashlib
import io
import time
from pathlib import Path

import pytest
from PIL import Image, ImageFile

from bot.errors import (
    CorruptImage,
    ImageError,
    ImageTooLarge,
    NotAnImage,
    TooManyImages,
    TooManyPixels,
    UserInputError,
)
from bot.images.check import MAX_SIDE, CheckedImage, ImageLimits, check_image, check_images
from tests.fakes.images import encode, noise_image, photo_like, png_header_only, small_samples

LIMITS = ImageLimits()
RED = (255, 0, 0)
GREEN = (0, 255, 0)
BLUE = (0, 0, 255)
WHITE = (255, 255, 255)


def assert_short(err: UserInputError) -> None:
    """A user-facing message is one short line, with nothing of the internals in it."""
    msg = err.user_message
    assert 0 < len(msg) <= 80
    assert "\n" not in msg
    assert "Error" not in msg and "PIL" not in msg and "0x" not in msg


def close_to(actual: tuple[int, ...], expected: tuple[int, ...], tol: int = 12) -> bool:
    return all(abs(a - e) <= tol for a, e in zip(actual, expected, strict=True))


def redecode(checked: CheckedImage) -> Image.Image:
    img = Image.open(io.BytesIO(checked.data))
    img.load()
    return img


# --- bad inputs ---------------------------------------------------------------------------------------


def test_text_file_named_png_is_not_an_image(tmp_path: Path) -> None:
    path = tmp_path / "cat.png"
    path.write_text("this is not a picture of a cat\n" * 10)
    with pytest.raises(NotAnImage) as info:
        check_image(path.read_bytes(), LIMITS)
    assert info.value.user_message == "that file is not an image"
    assert_short(info.value)


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"GIF",  # too short to be anything
        b"%PDF-1.7\n" + b"x" * 100,
        b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"/>',
        b"\x00\x00\x01\x00" + b"\x00" * 60,  # ICO header
    ],
    ids=["empty", "three-bytes", "pdf", "svg", "ico"],
)
def test_other_content_is_not_an_image(data: bytes) -> None:
    with pytest.raises(NotAnImage) as info:
        check_image(data, LIMITS)
    assert info.value.user_message == "that file is not an image"


def test_tiff_is_refused_although_pil_reads_it() -> None:
    # Only the five formats we accept are tried: TIFF (and its many codecs) never reaches a decoder.
    tiff = encode(Image.new("RGB", (8, 8), RED), "TIFF")
    with pytest.raises(NotAnImage):
        check_image(tiff, LIMITS)


@pytest.mark.parametrize("fraction", [0.5, 0.8])
def test_truncated_png_is_corrupt(fraction: float) -> None:
    png = encode(noise_image(64, 64), "PNG")
    with pytest.raises(CorruptImage) as info:
        check_image(png[: int(len(png) * fraction)], LIMITS)
    assert info.value.user_message == "the image file is damaged or incomplete"
    assert_short(info.value)


@pytest.mark.parametrize("keep", [8, 20, 40])
def test_png_cut_inside_its_header_is_corrupt_not_unknown(keep: int) -> None:
    # The signature says PNG: "damaged" is the honest answer, not "not an image".
    png = encode(noise_image(16, 16), "PNG")
    with pytest.raises(CorruptImage):
        check_image(png[:keep], LIMITS)


def test_truncated_jpeg_is_corrupt() -> None:
    jpeg = encode(noise_image(128, 128), "JPEG", quality=95)
    with pytest.raises(CorruptImage):
        check_image(jpeg[: len(jpeg) // 2], LIMITS)


def test_huge_dimensions_refused_from_header_without_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    bomb = png_header_only(30_000, 30_000)
    assert len(bomb) < 100

    # Prove no pixel is decoded: a decode attempt would turn into CorruptImage, not TooManyPixels.
    def no_load(self: ImageFile.ImageFile) -> None:
        raise AssertionError("pixels were decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_load)
    started = time.perf_counter()
    with pytest.raises(TooManyPixels) as info:
        check_image(bomb, LIMITS)
    assert time.perf_counter() - started < 1.0
    assert info.value.user_message == "the image has too many pixels (max 40 megapixels)"
    assert_short(info.value)


def test_dimensions_under_pils_guard_but_over_ours_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    # 8000 x 8000 = 64 M pixels: PIL only warns above ~89 M, our limit (40 M) must refuse it itself.
    def no_load(self: ImageFile.ImageFile) -> None:
        raise AssertionError("pixels were decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_load)
    with pytest.raises(TooManyPixels):
        check_image(png_header_only(8000, 8000), LIMITS)


def test_pixel_limit_is_per_call() -> None:
    small = encode(Image.new("RGB", (100, 100), RED), "PNG")
    with pytest.raises(TooManyPixels) as info:
        check_image(small, ImageLimits(max_pixels=5000))
    assert "max" in info.value.user_message
    assert check_image(small, LIMITS).width == 100


def test_sixty_megabyte_file_refused_before_decoding() -> None:
    data = b"\x89PNG\r\n\x1a\n" + b"\x00" * (60 * 1024 * 1024)
    started = time.perf_counter()
    with pytest.raises(ImageTooLarge) as info:
        check_image(data, LIMITS)
    assert time.perf_counter() - started < 0.5
    assert info.value.user_message == "the image is too large (max 20 MB)"
    assert_short(info.value)


def test_byte_limit_boundary() -> None:
    png = encode(Image.new("RGB", (10, 10), RED), "PNG")
    assert check_image(png, ImageLimits(max_bytes=len(png))).width == 10
    with pytest.raises(ImageTooLarge):
        check_image(png, ImageLimits(max_bytes=len(png) - 1))


# --- frames, orientation, modes -----------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["GIF", "WEBP", "PNG"])
def test_animated_image_uses_first_frame(fmt: str) -> None:
    frames = [Image.new("RGB", (32, 32), colour) for colour in (RED, GREEN, BLUE)]
    data = encode(frames[0], fmt, save_all=True, append_images=frames[1:], duration=100, loop=0)
    with Image.open(io.BytesIO(data)) as probe:
        assert getattr(probe, "n_frames", 1) == 3  # really animated
    checked = check_image(data, LIMITS)
    assert close_to(checked.image.getpixel((16, 16)), RED)
    assert close_to(redecode(checked).convert("RGB").getpixel((16, 16)), RED)


def test_gif_with_transparent_first_frame_is_white_there() -> None:
    frame = Image.new("P", (20, 20), 1)
    frame.putpalette([255, 0, 0, 0, 0, 255] + [0] * (254 * 3))
    frame.paste(0, (0, 0, 10, 20))  # left half index 0 (red), right half index 1 (transparent)
    data = encode(frame, "GIF", transparency=1)
    checked = check_image(data, LIMITS)
    assert checked.image.getpixel((2, 10)) == RED
    assert checked.image.getpixel((15, 10)) == WHITE


def test_cmyk_jpeg_becomes_rgb() -> None:
    cmyk = Image.new("CMYK", (32, 32), (0, 255, 255, 0))  # pure red in CMYK
    checked = check_image(encode(cmyk, "JPEG", quality=95), LIMITS)
    assert checked.image.mode == "RGB"
    assert close_to(checked.image.getpixel((16, 16)), RED, tol=20)


def test_palette_with_transparency_composited_on_white() -> None:
    img = Image.new("P", (20, 20), 0)
    img.putpalette([255, 0, 0, 0, 0, 255] + [0] * (254 * 3))
    img.paste(1, (10, 0, 20, 20))
    checked = check_image(encode(img, "PNG", transparency=1), LIMITS)
    assert checked.image.mode == "RGB"
    assert checked.image.getpixel((5, 5)) == RED
    assert checked.image.getpixel((15, 5)) == WHITE


def test_palette_without_transparency() -> None:
    img = Image.new("P", (8, 8), 1)
    img.putpalette([0, 0, 0, 0, 0, 255] + [0] * (254 * 3))
    assert check_image(encode(img, "PNG"), LIMITS).image.getpixel((1, 1)) == BLUE


def test_rgba_composited_on_white() -> None:
    img = Image.new("RGBA", (30, 10), (0, 0, 0, 0))
    img.paste((0, 0, 255, 255), (10, 0, 20, 10))
    img.paste((255, 0, 0, 128), (20, 0, 30, 10))
    checked = check_image(encode(img, "PNG"), LIMITS)
    assert checked.image.mode == "RGB"
    assert checked.image.getpixel((5, 5)) == WHITE  # fully transparent black is white, not black
    assert checked.image.getpixel((15, 5)) == BLUE
    assert close_to(checked.image.getpixel((25, 5)), (255, 127, 127), tol=2)


def test_la_composited_on_white() -> None:
    img = Image.new("LA", (20, 10), (0, 0))
    img.paste((0, 255), (10, 0, 20, 10))
    checked = check_image(encode(img, "PNG"), LIMITS)
    assert checked.image.getpixel((5, 5)) == WHITE
    assert checked.image.getpixel((15, 5)) == (0, 0, 0)


def test_sixteen_bit_grey_is_scaled_not_clipped() -> None:
    values = [0, 1000, 32768, 65535]
    img = Image.new("I;16", (len(values), 1))
    for x, v in enumerate(values):
        img.putpixel((x, 0), v)
    data = encode(img, "PNG")
    with Image.open(io.BytesIO(data)) as probe:
        assert probe.mode.startswith("I")  # PIL really hands us 16-bit data
    checked = check_image(data, LIMITS)
    got = [checked.image.getpixel((x, 0)) for x in range(len(values))]
    assert all(r == g == b for r, g, b in got)
    grey = [p[0] for p in got]
    assert grey[0] == 0
    assert abs(grey[1] - 4) <= 1
    assert abs(grey[2] - 128) <= 1  # mid-grey stays mid-grey (clipping would make it 255)
    assert grey[3] == 255


def test_one_bit_image_becomes_rgb() -> None:
    img = Image.new("1", (16, 8), 0)
    img.paste(1, (8, 0, 16, 8))
    checked = check_image(encode(img, "PNG"), LIMITS)
    assert checked.image.mode == "RGB"
    assert checked.image.getpixel((2, 2)) == (0, 0, 0)
    assert checked.image.getpixel((12, 2)) == WHITE


def test_grey_jpeg_becomes_rgb() -> None:
    checked = check_image(encode(Image.new("L", (16, 16), 77), "JPEG"), LIMITS)
    assert checked.image.mode == "RGB"
    assert close_to(checked.image.getpixel((8, 8)), (77, 77, 77), tol=2)


def test_exif_rotated_jpeg_is_upright() -> None:
    # Stored as a 40x20 landscape, left half red, right half blue; EXIF orientation 6 means "rotate 90
    # degrees clockwise to display", which puts the left (red) half on top of a 20x40 portrait.
    img = Image.new("RGB", (40, 20), RED)
    img.paste(BLUE, (20, 0, 40, 20))
    exif = Image.Exif()
    exif[0x0112] = 6
    checked = check_image(encode(img, "JPEG", quality=95, exif=exif), LIMITS)
    assert (checked.width, checked.height) == (20, 40)
    assert close_to(checked.image.getpixel((10, 5)), RED, tol=30)
    assert close_to(checked.image.getpixel((10, 35)), BLUE, tol=30)
    # Stored copy carries no EXIF that would rotate it a second time.
    assert redecode(checked).getexif().get(0x0112) in (None, 1)
    assert redecode(checked).size == (20, 40)


@pytest.mark.filterwarnings("ignore:Corrupt EXIF data")
def test_broken_exif_does_not_refuse_the_image() -> None:
    img = Image.new("RGB", (8, 8), RED)
    data = encode(img, "JPEG", exif=b"Exif\x00\x00MM\x00*garbage")
    assert check_image(data, LIMITS).width == 8


# --- re-encoding --------------------------------------------------------------------------------------


def test_large_photo_is_bounded_and_jpeg() -> None:
    data = encode(photo_like(4000, 3000), "JPEG", quality=92)
    checked = check_image(data, LIMITS)
    assert checked.width <= MAX_SIDE and checked.height <= MAX_SIDE
    assert (checked.width, checked.height) == (1536, 1152)
    assert checked.mime == "image/jpeg"
    again = redecode(checked)
    assert again.format == "JPEG"
    assert again.size == (checked.width, checked.height) == checked.image.size
    assert checked.sha256 == hashlib.sha256(checked.data).hexdigest()
    assert len(checked.data) < len(data)


def test_tall_image_bounded_on_its_longest_side() -> None:
    checked = check_image(encode(Image.new("RGB", (400, 4000), GREEN), "PNG"), LIMITS)
    assert (checked.width, checked.height) == (154, 1536)


def test_small_image_stays_png_and_exact() -> None:
    img = noise_image(100, 80)
    checked = check_image(encode(img, "JPEG", quality=90), LIMITS)
    assert checked.mime == "image/png"  # small: lossless either way
    assert redecode(checked).tobytes() == checked.image.tobytes()


def test_large_lossless_graphic_stays_png() -> None:
    img = Image.new("RGB", (2000, 1500), WHITE)
    for i in range(0, 2000, 100):
        img.paste((i % 256, 0, 0), (i, 0, i + 50, 1500))  # sharp-edged stripes, like a chart
    checked = check_image(encode(img, "PNG"), LIMITS)
    assert checked.mime == "image/png"
    assert max(checked.width, checked.height) == MAX_SIDE


def test_large_photo_saved_as_png_is_stored_as_jpeg() -> None:
    checked = check_image(encode(noise_image(1600, 1200), "PNG"), LIMITS)
    assert checked.mime == "image/jpeg"


@pytest.mark.parametrize("fmt", ["png", "jpeg", "gif", "webp", "bmp"])
def test_every_accepted_format(fmt: str) -> None:
    checked = check_image(small_samples()[fmt], LIMITS)
    assert checked.image.mode == "RGB"
    assert redecode(checked).size == (checked.width, checked.height)
    assert checked.mime in ("image/png", "image/jpeg")


def test_output_drops_metadata_and_trailing_bytes() -> None:
    data = small_samples()["png"] + b"<?php system($_GET['c']); ?>"
    checked = check_image(data, LIMITS)
    assert b"php" not in checked.data


def test_checked_image_is_frozen() -> None:
    checked = check_image(small_samples()["png"], LIMITS)
    with pytest.raises(AttributeError):
        checked.width = 1  # type: ignore[misc]


def test_same_pixels_same_hash() -> None:
    img = noise_image(40, 30)
    a = check_image(encode(img, "PNG"), LIMITS)
    b = check_image(encode(img, "BMP"), LIMITS)
    assert a.sha256 == b.sha256


# --- check_images ------------------------------------------------------------------------------------


def test_check_images_in_order() -> None:
    blobs = [encode(Image.new("RGB", (w, 10), RED), "PNG") for w in (10, 20, 30)]
    assert [c.width for c in check_images(blobs, LIMITS)] == [10, 20, 30]


def test_check_images_refuses_too_many_before_decoding() -> None:
    blobs = [b"not even an image"] * 5
    with pytest.raises(TooManyImages) as info:
        check_images(blobs, ImageLimits(max_count=4))
    assert info.value.user_message == "too many images (max 4 per message)"
    assert isinstance(info.value, ImageError)
    assert_short(info.value)


def test_check_images_propagates_the_first_bad_one() -> None:
    with pytest.raises(NotAnImage):
        check_images([small_samples()["png"], b"hello"], LIMITS)
