"""Image loading and preprocessing shared by training, evaluation, prediction and deployment.

One implementation so that every entry point feeds the network identical tensors.
"""
import io
import os
from dataclasses import dataclass
from functools import cached_property

import numba
import numpy as np
from PIL import Image, UnidentifiedImageError

from datasets.tiling import TileGrid
from utils import UserError

try:  # libspng: 8-bit RGB PNGs (MVTec's format) decode ~2x faster than with Pillow, to the same pixels
    import pyspng
except ImportError:  # no wheel for this platform: Pillow decodes everything
    pyspng = None

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)
# (x / 255 - mean) / std for every 8-bit value of each channel: normalising is then one table
# lookup per pixel (_normalise_hwc): 0.06 ms on a 224^2 image, against ~1 ms for the arithmetic
# and 0.25-0.8 ms for np.take (which first widens the uint8 indices to int64).
_NORM_TABLE = ((np.arange(256, dtype=np.float32)[None, :] / np.float32(255.0) - IMAGENET_MEAN[:, None])
               / IMAGENET_STD[:, None]).astype(np.float32)
# The smallest images scored: below MIN_IMAGE_SIDE pixels on the shorter side, or longer than
# MAX_ASPECT_RATIO times that, a picture is a strip or a dot that the network would see as an
# upscaled blur (or a centre crop of under 1% of it): a clear error instead of a score.
MIN_IMAGE_SIDE = 16
MAX_ASPECT_RATIO = 100
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


def is_image_file(name):
    return name.lower().endswith(IMAGE_EXTENSIONS) and not os.path.basename(name).startswith(".")


class ImageTooLarge(UserError):
    """The header announces more pixels than allowed (a decompression bomb); nothing was decoded."""


def _read(path):
    if not os.path.isfile(path):
        raise UserError(f"image not found: {path}")
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as err:
        raise UserError(f"cannot read image {path}: {err}") from None


def _header(data, name):
    """A PIL image that has read only its header (size, mode): nothing is decoded yet."""
    try:
        return Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as err:  # over twice Image.MAX_IMAGE_PIXELS
        raise ImageTooLarge(f"image {name} is too large: {err}") from None
    except UnidentifiedImageError:  # Pillow's message names the BytesIO object, not the image
        raise UserError(f"cannot read image {name}: not an image format Pillow knows") from None
    except (OSError, SyntaxError, ValueError) as err:
        raise UserError(f"cannot read image {name}: {err}") from None


def _open(data, name):
    img = _header(data, name)
    try:
        img.load()
    except Image.DecompressionBombError as err:
        raise ImageTooLarge(f"image {name} is too large: {err}") from None
    except (OSError, SyntaxError, ValueError) as err:
        raise UserError(f"cannot read image {name}: {err}") from None
    return img


def _decode_rgb8_png(data):
    """An 8-bit truecolour PNG without alpha decoded by libspng, else None (Pillow then decodes
    it, or names what is wrong with the file)."""
    # IHDR is the first chunk: bit depth at byte 24, colour type at byte 25 (2: RGB, no alpha).
    if pyspng is None or data[:8] != b"\x89PNG\r\n\x1a\n" or data[12:16] != b"IHDR" or data[24:26] != b"\x08\x02":
        return None
    try:
        arr = pyspng.load(data)
    except (RuntimeError, ValueError):
        return None
    if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[2] != 3:
        return None
    return Image.fromarray(arr)


def check_proportions(width, height, name):
    """A UserError for an image under the size floor (MIN_IMAGE_SIDE, MAX_ASPECT_RATIO)."""
    short, long = min(width, height), max(width, height)
    if short < MIN_IMAGE_SIDE:
        raise UserError(f"image {name} is {width}x{height} pixels: its shorter side is under the "
                        f"{MIN_IMAGE_SIDE}-pixel floor of what is scored")
    if long > MAX_ASPECT_RATIO * short:
        raise UserError(f"image {name} is {width}x{height} pixels: more than {MAX_ASPECT_RATIO} times longer "
                        f"than wide, over the limit of what is scored")


def decode_rgb(data, name="image", max_pixels=None):
    """Encoded image bytes (a file's, or a request body) -> 8-bit RGB PIL image; any mode
    (grayscale, palette, RGBA, 16-bit) is converted. With `max_pixels`, an image whose header
    announces more pixels raises ImageTooLarge before anything is decoded; one under the size
    floor (check_proportions) is a UserError, also from its header alone."""
    if not data:
        raise UserError(f"cannot read image {name}: it is empty")
    width, height = _header(data, name).size
    if max_pixels is not None and width * height > max_pixels:
        raise ImageTooLarge(f"image {name} is too large: {width}x{height} pixels, more than the limit "
                            f"of {max_pixels}")
    check_proportions(width, height, name)
    fast = _decode_rgb8_png(data)
    if fast is not None:
        return fast
    img = _open(data, name)
    if img.mode in ("I;16", "I;16B", "I"):
        arr = np.asarray(img, dtype=np.float64)
        arr /= max(arr.max(), 1.0)  # in place: the same values, one float64 copy instead of three
        arr *= 255.0
        arr = arr.astype(np.uint8)
        img = Image.fromarray(arr)
    if img.mode == "RGBA" or img.mode == "LA" or (img.mode == "P" and "transparency" in img.info):
        img = img.convert("RGBA")
        background = Image.new("RGBA", img.size, (0, 0, 0, 255))
        img = Image.alpha_composite(background, img)
    return img.convert("RGB")


def load_rgb(path):
    """An image file as 8-bit RGB (decode_rgb)."""
    return decode_rgb(_read(path), path)


def load_mask(path):
    """Binary mask (any non-zero pixel is defect) as a PIL 'L' image of 0/255."""
    img = _open(_read(path), path)
    arr = np.asarray(img.convert("L")) > 0
    return Image.fromarray((arr * 255).astype(np.uint8))


def _resize_crop(img, resize, crop_size, resample):
    """Shorter side to `resize`, then a centre square of `crop_size` (torchvision semantics)."""
    w, h = img.size
    if (w, h) != _resized_size(w, h, resize):
        img = img.resize(_resized_size(w, h, resize), resample)
    w, h = img.size
    left = int(round((w - crop_size) / 2.0))
    top = int(round((h - crop_size) / 2.0))
    return img.crop((left, top, left + crop_size, top + crop_size))


def _centre_crop_resampled(img, resize, crop_size, resample):
    """What _resize_crop gives, in one step: only the centre crop's box, in source coordinates,
    is resampled to `crop_size`. Its cost follows the output, not the resized frame (a 12000x1
    image would otherwise first become 3,072,000x256). Pillow centres each output pixel at box
    origin + (i + 0.5) x scale with the filter's support clipped at the whole image's edges, as
    in the full resize; only the order of its two 8-bit passes may differ (it picks the cheaper),
    so pixels differ from resize-then-crop by the passes' rounding: at most 2 levels of 255
    (tests/test_hardening.py). Masks keep _resize_crop: nearest neighbour would pick the other
    pixel at exact ties, and a mask only comes beside an image that passed the size floor."""
    w, h = img.size
    rw, rh = _resized_size(w, h, resize)
    left = int(round((rw - crop_size) / 2.0))
    top = int(round((rh - crop_size) / 2.0))
    if (w, h) == (rw, rh):
        return img.crop((left, top, left + crop_size, top + crop_size))
    sx, sy = w / rw, h / rh
    return img.resize((crop_size, crop_size), resample,
                      box=(left * sx, top * sy, (left + crop_size) * sx, (top + crop_size) * sy))


def _resized_size(w, h, resize):
    if w <= h:
        return resize, int(round(resize * h / w))
    return int(round(resize * w / h)), resize


def preprocess_image(img, resize, crop_size):
    """PIL RGB -> float32 CHW normalised with ImageNet statistics, plus the cropped uint8 HWC image."""
    return Preprocess(resize, crop_size).image(img)


@numba.njit(nogil=True, cache=True)
def _normalise_hwc(rgb, table, out):
    """out[c, y, x] = table[c, rgb[y, x, c]]: uint8 HWC -> normalised float32 CHW."""
    h, w, channels = rgb.shape
    for c in range(channels):
        lut = table[c]
        for y in range(h):
            for x in range(w):
                out[c, y, x] = lut[rgb[y, x, c]]


def preprocess_mask(mask, resize, crop_size):
    """Same geometry as the image, nearest neighbour, as a {0,1} uint8 HxW array."""
    return Preprocess(resize, crop_size).mask(mask)


def load_and_preprocess(path, resize, crop_size):
    return preprocess_image(load_rgb(path), resize, crop_size)


CROPS = ("center", "none")


def parse_image_size(text):
    """`--image_size` "H,W" (or "S" for S x S) -> (H, W)."""
    try:
        size = tuple(int(v) for v in str(text).replace("x", ",").split(","))
    except ValueError:
        size = ()
    if len(size) == 1:
        size = size * 2
    if len(size) != 2 or min(size) < 1:
        raise UserError(f"--image_size must be H,W in pixels (e.g. 320,240), got {text!r}")
    return size


@dataclass(frozen=True)
class Preprocess:
    """A model's input geometry: what every entry point (fit, eval, predict, infer.py, a service)
    does to an image before the network. Built from the model's saved config (`from_config`),
    so a model file or an export carries its own preprocessing.

    crop "center": shorter side to `resize`, centre square of `crop_size` (the default);
    crop "none": the whole image resized to exactly `image_size` (H, W), any aspect ratio.
    `tile` > 0: the network sees `tile` x `tile` squares of that frame every `tile_stride` pixels
    (`tiles`); maps, masks and pictures stay the whole frame (`map_size`)."""
    resize: int = 256
    crop_size: int = 224
    crop: str = "center"
    image_size: tuple = None
    tile: int = 0
    tile_stride: int = 0

    def __post_init__(self):
        if self.crop not in CROPS:
            raise UserError(f"--crop must be one of {', '.join(CROPS)}, got {self.crop!r}")
        if self.crop == "center":
            if self.image_size is not None:
                raise UserError("--image_size resizes the whole image, which --crop center does not: drop "
                                "--crop center (the centre crop is set by --resize and --crop_size)")
            if self.tile:
                raise UserError("--tile cuts the whole image resized to --image_size H,W into tiles: give "
                                "--image_size, and not --crop center")
            if self.crop_size > self.resize:
                raise UserError(f"--crop_size {self.crop_size} is larger than --resize {self.resize}")
        elif self.image_size is None:
            raise UserError(f"{'--tile' if self.tile else '--crop none'} needs --image_size H,W (the size the "
                            f"whole image is resized to)")
        if self.tile or self.tile_stride:
            h, w = self.map_size
            if self.tile < 1:
                raise UserError(f"--tile must be a positive number of pixels (and --tile_stride needs it), "
                                f"got {self.tile}")
            if self.tile > min(h, w):
                raise UserError(f"--tile {self.tile} exceeds the {h}x{w} image (--image_size H,W) it is cut from")
            if not 0 < self.tile_stride <= self.tile:
                raise UserError(f"--tile_stride must be between 1 and --tile {self.tile} (smaller overlaps "
                                f"the tiles), got {self.tile_stride}")

    @classmethod
    def from_config(cls, cfg):
        """Model files written before full frames and tiles carry only resize and crop_size."""
        size = cfg.get("image_size")
        tile = int(cfg.get("tile") or 0)
        return cls(int(cfg["resize"]), int(cfg["crop_size"]), cfg.get("crop") or "center",
                   tuple(int(v) for v in size) if size else None, tile, int(cfg.get("tile_stride") or tile))

    @property
    def map_size(self):
        """(H, W) of the preprocessed image, the anomaly map and the mask (the whole frame when tiled)."""
        if self.crop == "none":
            return tuple(self.image_size)
        return self.crop_size, self.crop_size

    @property
    def input_shape(self):
        """[C, H, W] of one network input: a tile when tiled."""
        return (3, self.tile, self.tile) if self.tile else (3, *self.map_size)

    @cached_property
    def tiles(self):
        """The TileGrid the network inputs are cut from, or None (the network sees the frame)."""
        return TileGrid(self.map_size, self.tile, self.tile_stride) if self.tile else None

    def network_inputs(self, frames):
        """[B, 3, H, W] preprocessed images -> what the network takes: their tiles, or themselves."""
        return frames if self.tiles is None else self.tiles.split(frames)

    def _geometry(self, img, resample):
        if self.crop == "none":
            h, w = self.image_size
            return img if img.size == (w, h) else img.resize((w, h), resample)
        if resample == Image.NEAREST:  # masks: see _centre_crop_resampled
            return _resize_crop(img, self.resize, self.crop_size, resample)
        return _centre_crop_resampled(img, self.resize, self.crop_size, resample)

    def image(self, img):
        """PIL RGB -> (float32 CHW, uint8 HWC as the network sees it)."""
        rgb = np.asarray(self._geometry(img, Image.LANCZOS), dtype=np.uint8)
        chw = np.empty((3,) + rgb.shape[:2], np.float32)
        _normalise_hwc(rgb, _NORM_TABLE, chw)
        return chw, rgb

    def mask(self, mask):
        """PIL 'L' mask of the original image -> {0,1} uint8 [H, W] aligned with the map."""
        return (np.asarray(self._geometry(mask, Image.NEAREST)) > 127).astype(np.uint8)

    def load(self, path):
        return self.image(load_rgb(path))

    def decode(self, data, name="image", max_pixels=None):
        """Encoded image bytes (a request body) -> as `image`; see decode_rgb."""
        return self.image(decode_rgb(data, name, max_pixels))


def denormalize(chw):
    """Inverse of the normalisation, for pictures."""
    rgb = chw.transpose(1, 2, 0) * IMAGENET_STD + IMAGENET_MEAN
    return (np.clip(rgb, 0, 1) * 255).astype(np.uint8)


def list_input_images(inputs):
    """Image files and the images inside folders, in order; a missing input is a clear error."""
    paths = []
    for item in inputs:
        if os.path.isdir(item):
            found = sorted(os.path.join(item, f) for f in os.listdir(item) if is_image_file(f))
            if not found:
                raise UserError(f"no images in folder {item}")
            paths.extend(found)
        elif os.path.isfile(item):
            paths.append(item)
        else:
            raise UserError(f"input not found: {item}")
    return paths
