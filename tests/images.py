"""Image test data written as real files: scikit-learn digits, photo tiles, a hostile corpus.

Nothing is downloaded: ``load_digits`` and ``load_sample_images`` ship with scikit-learn.
"""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

__all__ = [
    "HOSTILE_REASONS",
    "digits_pixels",
    "write_digits",
    "write_hostile",
    "write_photo_tiles",
]

HOSTILE_REASONS: dict[str, str | None] = {
    "empty.png": "image_invalid",
    "truncated.png": "image_invalid",
    "truncated.jpg": "image_invalid",
    "text.png": "image_invalid",
    "bomb.png": "image_too_large",
    "big.png": "image_too_large",
    "gray16.png": None,
    "palette.png": None,
    "rgba.png": None,
    "cmyk.jpg": None,
    "rotated.jpg": None,
    "plain.png": None,
}
"""File name in the hostile corpus → the reason the ETL must give it (None: a good image)."""

BIG_SIDE = 300
"""``big.png`` is ``BIG_SIDE`` × ``BIG_SIDE``: over a ``max_pixels`` of 50 000."""


def digits_pixels() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 1,797 digits as uint8 ``[N, 8, 8]`` (0-16 scaled to 0-255) and labels."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.rint(digits.images * (255.0 / 16.0)).astype(np.uint8)
    return images, digits.target.astype(np.int64)


def write_digits(root: Path, limit: int | None = None) -> dict[str, tuple[int, np.ndarray]]:
    """``root/<digit>/<i>.png`` (8-bit grayscale); returns ``{relative path: (label, pixels)}``."""
    images, labels = digits_pixels()
    out: dict[str, tuple[int, np.ndarray]] = {}
    for i, (img, label) in enumerate(zip(images, labels, strict=True)):
        if limit is not None and i >= limit:
            break
        rel = f"{int(label)}/{i:04d}.png"
        (root / str(int(label))).mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(root / rel)
        out[rel] = (int(label), img)
    return out


def write_photo_tiles(root: Path, tile: int = 48, per_photo: int = 6) -> dict[str, int]:
    """Tiles cut from scikit-learn's sample photos as JPEG, in ``root/<photo>/<i>.jpg``.

    Tiles are ``tile`` × ``tile * 3 // 2`` (landscape, so that ``resize: crop`` crops).
    Returns ``{relative path: photo index}``.
    """
    from sklearn.datasets import load_sample_images

    out: dict[str, int] = {}
    for p, photo in enumerate(load_sample_images().images):
        (root / f"photo{p}").mkdir(parents=True, exist_ok=True)
        width = tile * 3 // 2
        for i in range(per_photo):
            y, x = 37 * i, 53 * i
            crop = np.ascontiguousarray(photo[y : y + tile, x : x + width])
            rel = f"photo{p}/{i}.jpg"
            Image.fromarray(crop).save(root / rel, quality=90)
            out[rel] = p
    return out


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def bomb_png(side: int = 30000) -> bytes:
    """A small PNG whose header claims ``side`` × ``side`` pixels (a decompression bomb)."""
    header = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    row = b"\x00" + b"\x00" * side
    body = zlib.compress(row * 16, 9)  # far fewer rows than claimed: never decoded anyway
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", header)
        + _png_chunk(b"IDAT", body)
        + _png_chunk(b"IEND", b"")
    )


def _encoded(img: Image.Image, fmt: str, **kw: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def _gradient(h: int, w: int) -> np.ndarray:
    y, x = np.mgrid[0:h, 0:w]
    return np.stack([x * 255 // max(w - 1, 1), y * 255 // max(h - 1, 1), (x + y) % 256], -1)


def write_hostile(root: Path) -> dict[str, str | None]:
    """Every file of :data:`HOSTILE_REASONS` under ``root/<good|bad>/``; returns the mapping
    of each file's path relative to ``root`` to its expected reason."""
    rgb = Image.fromarray(_gradient(20, 30).astype(np.uint8))
    png, jpg = _encoded(rgb, "PNG"), _encoded(rgb, "JPEG", quality=90)
    gray16 = (np.arange(20 * 30, dtype=np.uint16).reshape(20, 30) * 100).astype(np.uint16)
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90° clockwise to display
    files: dict[str, bytes] = {
        "empty.png": b"",
        "truncated.png": png[: len(png) // 2],
        "truncated.jpg": jpg[: len(jpg) // 2],
        "text.png": b"this is not an image\n" * 10,
        "bomb.png": bomb_png(),
        "big.png": _encoded(Image.new("L", (BIG_SIDE, BIG_SIDE), 7), "PNG"),
        "gray16.png": _encoded(Image.fromarray(gray16), "PNG"),
        "palette.png": _encoded(rgb.convert("P", palette=Image.Palette.ADAPTIVE), "PNG"),
        "rgba.png": _encoded(rgb.convert("RGBA"), "PNG"),
        "cmyk.jpg": _encoded(rgb.convert("CMYK"), "JPEG", quality=95),
        "rotated.jpg": _encoded(rgb, "JPEG", quality=95, exif=exif.tobytes()),
        "plain.png": png,
    }
    out: dict[str, str | None] = {}
    for name, data in files.items():
        reason = HOSTILE_REASONS[name]
        rel = f"{'good' if reason is None else 'bad'}/{name}"
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
        out[rel] = reason
    return out
