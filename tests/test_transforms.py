"""Image loading and preprocessing: the libspng fast path decodes to Pillow's pixels, every other
kind of file goes through Pillow, and normalising by table equals the arithmetic."""
import glob
import os

import numpy as np
import pytest
from PIL import Image

from datasets import transforms
from utils import UserError


def _pillow_rgb(path, monkeypatch):
    with monkeypatch.context() as m:
        m.setattr(transforms, "pyspng", None)
        return np.asarray(transforms.load_rgb(path))


def test_fast_png_decoding_gives_pillows_pixels(mvtec_lite, tmp_path, monkeypatch):
    pytest.importorskip("pyspng")  # requirements.txt installs it; without a wheel Pillow decodes all
    paths = sorted(glob.glob(os.path.join(mvtec_lite, "bottle", "test", "*", "*.png")))[::10]
    rng = np.random.RandomState(0)
    own = str(tmp_path / "noise.png")
    Image.fromarray(rng.randint(0, 256, (37, 53, 3), dtype=np.uint8)).save(own)
    for path in [*paths, own]:
        assert transforms._decode_rgb8_png(open(path, 'rb').read()) is not None, path  # the fast path was taken
        np.testing.assert_array_equal(np.asarray(transforms.load_rgb(path)), _pillow_rgb(path, monkeypatch))


def test_other_pngs_go_through_pillow(tmp_path, monkeypatch):
    rng = np.random.RandomState(1)
    rgba = rng.randint(0, 256, (16, 17, 4), dtype=np.uint8)
    files = {
        "gray.png": Image.fromarray(rng.randint(0, 256, (16, 17), dtype=np.uint8)),
        "rgba.png": Image.fromarray(rgba),
        "deep.png": Image.fromarray(rng.randint(0, 65536, (16, 17)).astype(np.int32), "I").convert("I;16"),
        "palette.png": Image.fromarray(rng.randint(0, 256, (16, 17, 3), dtype=np.uint8)).convert("P"),
    }
    for name, img in files.items():
        path = str(tmp_path / name)
        img.save(path)
        assert transforms._decode_rgb8_png(open(path, 'rb').read()) is None, name
        rgb = np.asarray(transforms.load_rgb(path))
        assert rgb.shape == (16, 17, 3) and rgb.dtype == np.uint8
    # RGBA is composited on black, not decoded as its first three channels.
    alpha = rgba[..., 3:].astype(np.float64) / 255
    want = np.round(rgba[..., :3] * alpha).astype(int)
    assert np.abs(np.asarray(transforms.load_rgb(str(tmp_path / "rgba.png"))).astype(int) - want).max() <= 1


def test_broken_pngs_give_one_clear_error(tmp_path):
    whole = str(tmp_path / "whole.png")
    Image.fromarray(np.random.RandomState(2).randint(0, 256, (64, 64, 3), dtype=np.uint8)).save(whole)
    data = open(whole, "rb").read()
    cut = tmp_path / "cut.png"
    cut.write_bytes(data[: len(data) // 2])  # the header says 8-bit RGB: the fast path tries it first
    with pytest.raises(UserError, match="cannot read image .*cut.png"):
        transforms.load_rgb(str(cut))
    with pytest.raises(UserError, match="image not found"):
        transforms.load_rgb(str(tmp_path / "missing.png"))


def test_normalising_by_table_equals_the_arithmetic():
    rgb = np.random.RandomState(3).randint(0, 256, (30, 40, 3), dtype=np.uint8)
    chw, cropped = transforms.preprocess_image(Image.fromarray(rgb), 40, 30)
    want = (cropped.transpose(2, 0, 1).astype(np.float32) / np.float32(255.0)
            - transforms.IMAGENET_MEAN[:, None, None]) / transforms.IMAGENET_STD[:, None, None]
    assert chw.shape == (3, 30, 30) and chw.dtype == np.float32
    np.testing.assert_array_equal(chw, want)


def png_header_only(width, height):
    """A PNG whose header announces width x height 8-bit RGB pixels, with almost no pixel data."""
    import struct
    import zlib

    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b""))


def test_bytes_decode_like_files_and_bombs_are_refused_from_the_header(mvtec_lite):
    path = os.path.join(mvtec_lite, "bottle", "test", "good", "000.png")
    data = open(path, "rb").read()
    np.testing.assert_array_equal(np.asarray(transforms.decode_rgb(data, max_pixels=256 * 256)),
                                  np.asarray(transforms.load_rgb(path)))
    with pytest.raises(transforms.ImageTooLarge, match="256x256 pixels, more than"):
        transforms.decode_rgb(data, "body", max_pixels=256 * 255)
    with pytest.raises(transforms.ImageTooLarge):  # 10^10 pixels: refused before any decoding
        transforms.decode_rgb(png_header_only(100000, 100000), "bomb", max_pixels=10**8)
    for bad in (b"", b"not an image", data[: len(data) // 2]):
        with pytest.raises(UserError, match="cannot read image body"):
            transforms.decode_rgb(bad, "body", max_pixels=10**8)
