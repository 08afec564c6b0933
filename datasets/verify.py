"""Cheap checks of image files before long work: a broken file should stop a run (training data)
or be skipped (folders of natural images) before the fit or distillation starts, not minutes in.

PNGs are checked with Pillow's verify() (every chunk's CRC: truncation and corruption, no pixel
decoding); other formats are decoded, JPEGs at 1/8 scale (DCT scaling: the whole stream is still
read). benchmarks/bench_verify.py measures the cost against decoding the images.
"""
import sys
from concurrent.futures import ThreadPoolExecutor

from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from utils import UserError

_READ_ERRORS = (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError)


def image_problem(path):
    """None when `path` reads as an image, else what is wrong (one short phrase)."""
    try:
        with Image.open(path) as img:
            if img.format == "PNG":
                img.verify()
            else:
                img.draft("RGB", (1, 1))
                img.load()
                img.convert("RGB")  # modes Pillow cannot convert (some multi-page TIFFs) fail here
    except _READ_ERRORS as err:
        return str(err) or type(err).__name__
    return None


def image_size(path):
    """(width, height) from the header only."""
    with Image.open(path) as img:
        return img.size


def mask_size_error(mask_path, mask_size, image_path, image_size):
    return UserError(f"mask {mask_path} is {mask_size[0]}x{mask_size[1]} but its image {image_path} is "
                     f"{image_size[0]}x{image_size[1]}")


def _sample_problem(sample):
    for path in (sample.image_path, sample.mask_path):
        if path is None:
            continue
        problem = image_problem(path)
        if problem:
            return UserError(f"cannot read image {path}: {problem}")
    if sample.mask_path is not None:
        size, mask = image_size(sample.image_path), image_size(sample.mask_path)
        if size != mask:
            return mask_size_error(sample.mask_path, mask, sample.image_path, size)
    return None


def check_samples(samples, workers=2, progress=False):
    """Every image and mask readable, every mask the size of its image; else a UserError naming
    the first bad file (in the samples' order, whatever the threads finish first)."""
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        problems = tqdm(pool.map(_sample_problem, samples), total=len(samples), desc="check images",
                        unit="img", disable=not progress, leave=False)
        for problem in problems:
            if problem is not None:
                raise problem


def readable_images(paths, where, workers=2, progress=False, shown=3):
    """The paths that read as images; the others are skipped with one line on stderr saying how
    many and naming the first few. None readable is a UserError."""
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        problems = list(tqdm(pool.map(image_problem, paths), total=len(paths), desc="check images",
                             unit="img", disable=not progress, leave=False))
    bad = [p for p, problem in zip(paths, problems) if problem]
    good = [p for p, problem in zip(paths, problems) if not problem]
    if not good:
        raise UserError(f"none of the {len(paths)} image files under {where} can be read "
                        f"(first: {bad[0]}: {problems[0]})")
    if bad:
        more = f" and {len(bad) - shown} more" if len(bad) > shown else ""
        print(f"warning: skipped {len(bad)} of {len(paths)} image files under {where} that cannot be read: "
              f"{', '.join(bad[:shown])}{more}", file=sys.stderr)
    return good
