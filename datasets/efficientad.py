"""Images EfficientAD needs beyond a category's normal training set: folders of natural images
(teacher distillation, the ImageNet penalty) and the autoencoder's colour augmentation.

All outputs are float32 NCHW normalised with the ImageNet statistics, like every other input.
"""
import os

import numpy as np
from PIL import Image

from datasets.transforms import IMAGENET_MEAN, IMAGENET_STD, is_image_file, load_rgb
from datasets.verify import readable_images
from utils import UserError

GRAY_WEIGHTS = np.array([0.299, 0.587, 0.114], np.float32)  # ITU-R 601, as PIL and torchvision


def list_image_tree(folders, progress=False):
    """Every readable image under the folders (recursively), in a stable order. Files that do not
    read as images are skipped up front with one line saying how many (datasets.verify): such
    folders are "any natural images", and one bad file should not stop a long run minutes in."""
    paths = []
    for folder in folders:
        if not os.path.isdir(folder):
            raise UserError(f"image folder not found: {folder}")
        for root, dirs, files in os.walk(folder):
            dirs.sort()
            paths.extend(os.path.join(root, f) for f in sorted(files) if is_image_file(f))
    if not paths:
        raise UserError(f"no images under {', '.join(folders)}")
    return readable_images(paths, ", ".join(folders), progress=progress)


def to_network(rgb):
    """uint8 or [0,1] float HWC / NHWC -> normalised float32 CHW / NCHW."""
    x = np.asarray(rgb, np.float32)
    if np.asarray(rgb).dtype == np.uint8:
        x = x / 255.0
    x = (x - IMAGENET_MEAN) / IMAGENET_STD
    return np.ascontiguousarray(np.moveaxis(x, -1, -3))


def to_unit_rgb(images):
    """Inverse of to_network for NCHW batches: [0,1] float NHWC."""
    return images.transpose(0, 2, 3, 1) * IMAGENET_STD + IMAGENET_MEAN


def _resize_shorter(img, side):
    w, h = img.size
    scale = side / min(w, h)
    return img.resize((max(side, round(w * scale)), max(side, round(h * scale))), Image.BILINEAR)


def _grayscale(rgb):
    return np.repeat((rgb.astype(np.float32) @ GRAY_WEIGHTS)[..., None], 3, axis=-1).astype(rgb.dtype)


def natural_crops(paths, rng, count, size, scale_side=256, gray_p=0.1):
    """`count` random crops for teacher distillation: shorter side resized to 256 (the scale
    images have at detection time), a random size x size window, a random horizontal flip, and
    grayscale with p=0.1 as in the paper's pretraining. -> NCHW float32."""
    crops = []
    for i in rng.randint(len(paths), size=count):
        img = _resize_shorter(load_rgb(paths[i]), max(scale_side, size))
        x0, y0 = rng.randint(img.size[0] - size + 1), rng.randint(img.size[1] - size + 1)
        rgb = np.asarray(img.crop((x0, y0, x0 + size, y0 + size)))
        if rng.rand() < 0.5:
            rgb = rgb[:, ::-1]
        if rng.rand() < gray_p:
            rgb = _grayscale(rgb)
        crops.append(to_network(rgb))
    return np.stack(crops)


def penalty_image(paths, rng, size=256):
    """One ImageNet-penalty input as in the reference code: resize to 2*size square, grayscale
    with p=0.3, centre crop size x size. -> [1,3,size,size]."""
    img = load_rgb(paths[rng.randint(len(paths))]).resize((2 * size, 2 * size), Image.BILINEAR)
    rgb = np.asarray(img)[size // 2:size // 2 + size, size // 2:size // 2 + size]
    if rng.rand() < 0.3:
        rgb = _grayscale(rgb)
    return to_network(rgb)[None]


def ae_color_jitter(images, rng, strength=0.2):
    """The paper's autoencoder input augmentation: per image one of brightness, contrast or
    saturation, with a factor drawn from [1-strength, 1+strength] (torchvision ColorJitter
    semantics). images: normalised NCHW -> the same, augmented."""
    rgb = to_unit_rgb(images)
    out = np.empty_like(rgb)
    for i, x in enumerate(rgb):
        kind, f = rng.randint(3), rng.uniform(1 - strength, 1 + strength)
        gray = (x @ GRAY_WEIGHTS)[..., None]
        if kind == 0:      # brightness: blend with black
            y = x * f
        elif kind == 1:    # contrast: blend with the mean grey level
            y = f * x + (1 - f) * gray.mean()
        else:              # saturation: blend with the grey image
            y = f * x + (1 - f) * gray
        out[i] = np.clip(y, 0.0, 1.0)
    return to_network(out)
