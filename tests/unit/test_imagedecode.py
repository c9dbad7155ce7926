"""``etl.images.<col>.decode``: ``exact`` is Pillow's own result, ``fast`` stays close to it."""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image, ImageOps

from preprocessing.read.imagedecode import ImageSpec, decode_column, decode_image, draft_size


def _jpeg(pixels: np.ndarray, orientation: int | None = None) -> bytes:
    buf = io.BytesIO()
    exif = Image.Exif()
    if orientation is not None:
        exif[0x0112] = orientation
    Image.fromarray(pixels).save(buf, "JPEG", quality=90, exif=exif.tobytes())
    return buf.getvalue()


def _tiles(side: int) -> list[bytes]:
    """JPEG tiles of ``side`` × ``1.5 side`` cut from scikit-learn's sample photos."""
    from sklearn.datasets import load_sample_images

    out = []
    for photo in load_sample_images().images:
        for i in range(3):
            crop = photo[37 * i : 37 * i + side, 53 * i : 53 * i + side * 3 // 2]
            out.append(_jpeg(np.ascontiguousarray(crop)))
    return out


def _pillow(data: bytes, size: tuple[int, int], policy: str) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as src:
        rgb = ImageOps.exif_transpose(src).convert("RGB")
    if policy == "crop":
        return np.asarray(ImageOps.fit(rgb, size, method=Image.Resampling.BILINEAR))
    return np.asarray(rgb.resize(size, Image.Resampling.BILINEAR))


@pytest.mark.parametrize("policy", ["crop", "stretch"])
def test_fast_decode_is_close_to_exact_which_is_pillows_own(policy: str) -> None:
    exact, fast = (ImageSpec(64, 64, "RGB", resize=policy, decode=d) for d in ("exact", "fast"))
    diffs = []
    for data in _tiles(256):
        want = _pillow(data, (64, 64), policy)
        np.testing.assert_array_equal(decode_image(data, exact), want)
        got = decode_image(data, fast)
        assert got.shape == (64, 64, 3) and got.dtype == np.uint8
        diffs.append(np.abs(got.astype(np.int16) - want).mean())
    # decoded at 1/2 scale (384×256 → at least 96×64 for crop, 64×64 for stretch), so it
    # differs, but by a few levels of 255 (measured 1.6–2.6 on average, at most 3.7)
    assert 0.3 < np.mean(diffs) < 4 and max(diffs) < 6, diffs


def test_fast_decode_never_enlarges_and_follows_the_exif_orientation() -> None:
    spec = ImageSpec(64, 32, "RGB", resize="crop", decode="fast")  # portrait target
    # stored 400×100 landscape, displayed (orientation 6) as 100×400 portrait
    assert draft_size((400, 100), True, spec) == (128, 32)
    assert draft_size((100, 400), False, spec) == (32, 128)
    assert draft_size((400, 100), True, ImageSpec(64, 32, "RGB", resize="stretch")) == (64, 32)
    rng = np.random.default_rng(0)
    base = np.kron(rng.integers(0, 256, (25, 100, 3)), np.ones((4, 4, 1))).astype(np.uint8)
    data = _jpeg(base, orientation=6)
    got = decode_image(data, spec)
    want = _pillow(data, (32, 64), "crop")
    assert got.shape == (64, 32, 3)
    assert np.abs(got.astype(np.int16) - want).mean() < 8


def test_fast_leaves_small_images_and_other_formats_exact() -> None:
    spec = ImageSpec(64, 64, "RGB", decode="fast")
    photo = _tiles(96)[0]  # under twice the target: no reduced scale covers it
    np.testing.assert_array_equal(decode_image(photo, spec), _pillow(photo, (64, 64), "crop"))
    big = np.asarray(Image.open(io.BytesIO(_tiles(256)[1])).convert("RGB"))
    buf = io.BytesIO()
    Image.fromarray(big).save(buf, "PNG")
    png = buf.getvalue()
    np.testing.assert_array_equal(decode_image(png, spec), _pillow(png, (64, 64), "crop"))


@pytest.mark.parametrize("channels", ["RGB", "L"])
def test_a_batch_holds_each_good_rows_pixels_and_its_exact_channel_sums(channels: str) -> None:
    spec = ImageSpec(64, 64, channels)
    tiles = _tiles(256)[:4]
    values = pa.array([tiles[0], None, b"not an image", *tiles[1:]], pa.binary())
    pixels, sums, reasons = decode_column(values, spec)
    assert reasons.to_pylist() == [None, None, "image_invalid", None, None, None]
    good = {0: tiles[0], 3: tiles[1], 4: tiles[2], 5: tiles[3]}
    assert (
        pixels.is_valid().to_pylist()
        == sums.is_valid().to_pylist()
        == [i in good for i in range(6)]
    )
    c = spec.shape[-1]
    for i, data in good.items():
        want = decode_image(data, spec)
        assert pixels[i].as_py() == want.tobytes()
        x = want.reshape(-1, c).astype(np.int64)
        assert sums[i].as_py() == [*x.sum(axis=0), *(x * x).sum(axis=0)]  # exact integers
