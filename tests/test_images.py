"""The bad-input corpus through the library: every case loads with the right pixels or is refused
with a message naming the problem."""

from __future__ import annotations

import io
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.corpus import BAD, CASES, GOOD, bomb_png, png_bytes, quadrant_image
from viz.images import NOTES_KEY, ImageError, image_from_array, load_image, sniff


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("corpus")
    for case in CASES.values():
        case.write(folder)
    return folder


@pytest.mark.parametrize("name", GOOD)
def test_good_inputs_give_the_right_pixels(name: str, corpus_dir: Path) -> None:
    case = CASES[name]
    im = load_image(corpus_dir / case.filename)
    assert im.mode == "RGB"
    case.check(im)  # type: ignore[misc]


@pytest.mark.parametrize("name", BAD)
def test_bad_inputs_are_refused_with_a_readable_message(name: str, corpus_dir: Path) -> None:
    case = CASES[name]
    with pytest.raises(ImageError) as info:
        load_image(corpus_dir / case.filename)
    msg = str(info.value)
    assert re.search(case.error, msg), msg  # type: ignore[arg-type]
    assert "\n" not in msg and "Traceback" not in msg
    assert msg.startswith(case.filename + ": "), "the message names the file"


@pytest.mark.parametrize("name", list(CASES))
def test_bytes_and_path_agree(name: str, corpus_dir: Path) -> None:
    case = CASES[name]
    data = (corpus_dir / case.filename).read_bytes()
    if case.check:
        a = np.asarray(load_image(corpus_dir / case.filename))
        b = np.asarray(load_image(data))
        np.testing.assert_array_equal(a, b)
    else:
        with pytest.raises(ImageError, match=case.error):
            load_image(data)


def test_bomb_is_refused_before_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    """Neither Image.load nor any decoder runs: make decoding explode and check we never get there."""

    def boom(self, *a, **k):  # pragma: no cover - must not be called
        raise AssertionError("decoded a decompression bomb")

    monkeypatch.setattr(Image.Image, "load", boom)
    from PIL import ImageFile

    monkeypatch.setattr(ImageFile.ImageFile, "load", boom)
    # 400 MP: above PIL's own 2x MAX_IMAGE_PIXELS, which raises while opening
    with pytest.raises(ImageError, match=r"20000×20000 = 400 MP, above the 40 MP limit"):
        load_image(bomb_png(20000))
    # 48 MP: PIL would only warn, our header check refuses it
    row = bytes(8000)
    data = png_bytes(8000, 6000, bit_depth=8, color_type=0, rows=lambda y: row)
    assert len(data) < 200_000
    with pytest.raises(ImageError, match=r"8000×6000 = 48 MP, above the 40 MP limit"):
        load_image(data)


def test_max_pixels_and_max_bytes_are_configurable(tmp_path: Path) -> None:
    p = tmp_path / "a.png"
    quadrant_image(64, 48).save(p)
    assert load_image(p, max_pixels=64 * 48).size == (64, 48)
    with pytest.raises(ImageError, match=r"64×48 = 0.0 MP, above"):
        load_image(p, max_pixels=64 * 48 - 1)
    with pytest.raises(ImageError, match=r"a.png is 0.0 MB, above the 0 MB limit"):
        load_image(p, max_bytes=100)
    with pytest.raises(ImageError, match="above the 0 MB limit"):
        load_image(p.read_bytes(), max_bytes=100)


@pytest.mark.parametrize(
    "url",
    ["http://169.254.169.254/latest/meta-data", "https://example.com/cat.jpg", "file:///etc/passwd",
     "ftp://host/x.png", "data:image/png;base64,iVBORw0KGgo=", "  HTTPS://EXAMPLE.COM/a.png", "www.example.com/a.jpg"],
)
def test_urls_are_never_fetched(url: str) -> None:
    with pytest.raises(ImageError, match="URLs are not fetched; upload the file"):
        load_image(url)


def test_missing_folder_and_wrong_types(tmp_path: Path) -> None:
    with pytest.raises(ImageError, match="file not found: nope.png"):
        load_image(tmp_path / "nope.png")
    with pytest.raises(ImageError, match="is a folder, not an image file"):
        load_image(tmp_path)
    with pytest.raises(ImageError, match="no image given"):
        load_image(None)  # type: ignore[arg-type]
    with pytest.raises(ImageError, match="cannot load an image from int"):
        load_image(3)  # type: ignore[arg-type]
    with pytest.raises(ImageError, match="empty path"):
        load_image("")


def test_other_pillow_formats_are_not_decoded() -> None:
    """EPS would run Ghostscript; formats outside the allow-list are refused by name."""
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 32 32\n0 0 moveto 32 32 lineto stroke\nshowpage\n"
    with pytest.raises(ImageError, match="unsupported format: EPS"):
        load_image(eps)
    with pytest.raises(ImageError, match="the file is a PDF"):
        load_image(b"%PDF-1.7\n1 0 obj\n<<>>\nendobj\n")
    with pytest.raises(ImageError, match=r"not an image: unrecognised or corrupt file"):
        load_image(bytes(range(256)) * 4)


def test_pil_image_input_goes_through_the_same_path() -> None:
    rgba = Image.new("RGBA", (16, 16), (0, 0, 0, 0))
    out = load_image(rgba)
    assert out.mode == "RGB" and out.getpixel((3, 3)) == (255, 255, 255)
    assert "transparency composited over white" in out.info[NOTES_KEY]
    i16 = Image.fromarray(np.full((16, 16), 0x1234, np.uint16))
    assert load_image(i16).getpixel((0, 0)) == (18, 18, 18)  # round(4660 / 257); clipping would give 255
    src = quadrant_image()
    out = load_image(src)
    assert out is not src and np.array_equal(np.asarray(out), np.asarray(src))


def test_animation_gives_its_first_frame_and_says_so() -> None:
    buf = io.BytesIO()
    frames = [Image.new("RGB", (16, 16), c) for c in ((255, 0, 0), (0, 0, 255))]
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:])
    # a file path/bytes input always gives frame 0
    out = load_image(buf.getvalue())
    assert out.getpixel((0, 0)) == (255, 0, 0)
    assert out.info[NOTES_KEY] == ["first of 2 frames used"]


class TestImageFromArray:
    def test_uint8_rgb_roundtrip(self) -> None:
        a = np.random.default_rng(0).integers(0, 256, (20, 30, 3), np.uint8)
        np.testing.assert_array_equal(np.asarray(image_from_array(a)), a)

    def test_gray_and_single_channel(self) -> None:
        a = np.full((10, 12), 77, np.uint8)
        assert image_from_array(a).getpixel((0, 0)) == (77, 77, 77)
        assert image_from_array(a[..., None]).size == (12, 10)

    def test_rgba_over_white(self) -> None:
        a = np.zeros((10, 10, 4), np.uint8)
        a[..., 3] = 0
        assert image_from_array(a).getpixel((5, 5)) == (255, 255, 255)

    def test_float_ranges(self) -> None:
        one = np.full((10, 10, 3), 0.5)
        assert image_from_array(one).getpixel((0, 0)) == (128, 128, 128)
        full = np.full((10, 10, 3), 200.0, np.float32)
        assert image_from_array(full).getpixel((0, 0)) == (200, 200, 200)
        with pytest.raises(ImageError, match=r"float array values must lie in \[0, 1\] or \[0, 255\]; got \[-1, 1\]"):
            image_from_array(np.linspace(-1, 1, 300).reshape(10, 10, 3))
        bad = np.zeros((10, 10, 3))
        bad[0, 0, 0] = np.nan
        with pytest.raises(ImageError, match="NaN"):
            image_from_array(bad)

    def test_uint16_bool_int(self) -> None:
        assert image_from_array(np.full((10, 10), 40000, np.uint16)).getpixel((0, 0)) == (156, 156, 156)
        assert image_from_array(np.ones((10, 10), bool)).getpixel((0, 0)) == (255, 255, 255)
        assert image_from_array(np.full((10, 10, 3), 9, np.int64)).getpixel((0, 0)) == (9, 9, 9)
        with pytest.raises(ImageError, match=r"integer array values must lie in \[0, 255\]"):
            image_from_array(np.full((10, 10), 300, np.int32))

    @pytest.mark.parametrize(
        ("shape", "pattern"),
        [((3, 20, 20), "looks channel-first"), ((20, 20, 2), "expected H×W, H×W×3 or H×W×4"),
         ((5,), "is not an image"), ((0, 10, 3), "is empty"), ((2, 2, 2, 3), "is not an image")],
    )
    def test_bad_shapes(self, shape: tuple[int, ...], pattern: str) -> None:
        with pytest.raises(ImageError, match=pattern):
            image_from_array(np.zeros(shape, np.uint8))

    def test_geometry_and_size(self) -> None:
        with pytest.raises(ImageError, match=r"aspect ratio of 100:1"):
            image_from_array(np.zeros((8, 800), np.uint8))
        with pytest.raises(ImageError, match=r"at least 8 px"):
            image_from_array(np.zeros((4, 4), np.uint8))
        with pytest.raises(ImageError, match=r"above the 0.0 MP limit"):
            image_from_array(np.zeros((100, 100), np.uint8), max_pixels=100)
        with pytest.raises(ImageError, match="expected a numpy array"):
            image_from_array([[1, 2], [3, 4]])


def test_sniff() -> None:
    assert sniff(b"") == "empty file (0 bytes)"
    assert sniff(b"\xef\xbb\xbf  <svg width='1'/>").startswith("SVG")
    assert sniff(b"<html><body>x</body></html>") == "not an image: the file looks like HTML"
    assert sniff(b"\x89PNG\r\n\x1a\n") is None
