"""MVTec AD layout: <root>/<category>/{train/good, test/<defect>, ground_truth/<defect>/<stem>_mask.png}.

Any folder that follows the layout is a category, so custom data needs no code change.
"""
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from datasets.transforms import is_image_file, load_mask, load_rgb
from datasets.verify import mask_size_error
from utils import UserError

MVTEC_TEXTURES = ["carpet", "grid", "leather", "tile", "wood"]
MVTEC_OBJECTS = ["bottle", "cable", "capsule", "hazelnut", "metal_nut", "pill", "screw",
                 "toothbrush", "transistor", "zipper"]


def available_categories(data_path):
    if not data_path or not os.path.isdir(data_path):
        raise UserError(f"data path not found: {data_path}")
    return sorted(d for d in os.listdir(data_path)
                  if os.path.isdir(os.path.join(data_path, d, "train"))
                  or os.path.isdir(os.path.join(data_path, d, "test")))


def resolve_categories(data_path, category):
    """`all`, `objects`, `textures`, one name or a comma list -> the category folders to run."""
    present = available_categories(data_path)
    if not present:
        raise UserError(f"no category folders (<category>/train or <category>/test) under {data_path}")
    wanted = [c.strip() for c in category.split(",") if c.strip()]
    if wanted == ["all"]:
        return present
    if wanted == ["textures"] or wanted == ["objects"]:
        group = MVTEC_TEXTURES if wanted == ["textures"] else MVTEC_OBJECTS
        found = [c for c in group if c in present]
        if not found:
            raise UserError(f"no MVTec {wanted[0]} under {data_path}; categories found: {', '.join(present)}")
        return found
    missing = [c for c in wanted if c not in present]
    if missing:
        raise UserError(f"category not found: {', '.join(missing)} under {data_path}; "
                        f"categories found: {', '.join(present)}")
    return wanted


class MVTecDataset:
    """The data source behind train/eval: categories, and each one's training and test samples.
    Another folder layout is another class with these three methods (datasets.open_dataset)."""

    split = None  # MVTec fixes its test set; folder mode's seeded split is recorded here

    def __init__(self, data_path):
        self.data_path = data_path

    def categories(self, selection):
        return resolve_categories(self.data_path, selection)

    def train_samples(self, category):
        return train_samples(self.data_path, category)

    def test_samples(self, category):
        return test_samples(self.data_path, category)


@dataclass
class Sample:
    image_path: str
    defect_type: str          # 'good' or the defect folder name
    label: int                # 0 normal, 1 anomalous
    mask_path: str = None     # None for normal images, and for defective ones of a set without masks


def _list_images(folder):
    return sorted(os.path.join(folder, f) for f in os.listdir(folder) if is_image_file(f))


def train_samples(data_path, category):
    folder = os.path.join(data_path, category, "train", "good")
    if not os.path.isdir(folder):
        raise UserError(f"training folder not found: {folder}")
    paths = _list_images(folder)
    if not paths:
        raise UserError(f"no training images in {folder}")
    return [Sample(p, "good", 0) for p in paths]


def test_samples(data_path, category):
    root = os.path.join(data_path, category, "test")
    if not os.path.isdir(root):
        raise UserError(f"test folder not found: {root}")
    samples = []
    for defect in sorted(os.listdir(root)):
        folder = os.path.join(root, defect)
        if not os.path.isdir(folder):
            continue
        for path in _list_images(folder):
            if defect == "good":
                samples.append(Sample(path, defect, 0))
                continue
            # No ground_truth/<defect> folder: no masks for this defect (image-level evaluation).
            masks = os.path.join(data_path, category, "ground_truth", defect)
            stem = os.path.splitext(os.path.basename(path))[0]
            mask = os.path.join(masks, stem + "_mask.png")
            if os.path.isdir(masks) and not os.path.isfile(mask):
                raise UserError(f"missing ground-truth mask for {path}: expected {mask}")
            samples.append(Sample(path, defect, 1, mask if os.path.isdir(masks) else None))
    if not samples:
        raise UserError(f"no test images in {root}")
    check_stray_masks(os.path.join(data_path, category, "ground_truth"), samples)
    check_mask_coverage(samples)
    return samples


def check_stray_masks(ground_truth, samples):
    """A mask file that belongs to no test image is a naming mistake (its image would silently
    count as unmasked or the mask as unused): an error naming it."""
    if not os.path.isdir(ground_truth):
        return
    used = {os.path.abspath(s.mask_path) for s in samples if s.mask_path}
    for defect in sorted(os.listdir(ground_truth)):
        folder = os.path.join(ground_truth, defect)
        if not os.path.isdir(folder):
            continue
        for path in _list_images(folder):
            if os.path.abspath(path) not in used:
                raise UserError(f"mask {path} matches no image in "
                                f"{os.path.join(os.path.dirname(ground_truth), 'test', defect)} "
                                f"(masks are named <stem>_mask.png)")


def check_mask_coverage(samples):
    """Masks for every defective image or for none (then evaluation is image-level only). A
    half-masked set is a mistake, and mixing would bias pixel AUROC: an error naming the first
    defective image without a mask."""
    defective = [s for s in samples if s.label]
    missing = [s for s in defective if s.mask_path is None]
    if missing and len(missing) < len(defective):
        raise UserError(f"no mask for {missing[0].image_path}, but {len(defective) - len(missing)} of the "
                        f"{len(defective)} defective images have one: give every defective image a mask, "
                        f"or none (image-level evaluation)")


def has_masks(samples):
    """True when the defective samples come with masks (check_mask_coverage: all or none)."""
    return any(s.mask_path is not None for s in samples if s.label)


def load_sample(sample, preprocess, with_mask):
    """-> (chw float32, rgb uint8 as the network sees it, mask uint8 or None); `preprocess`:
    the model's datasets.transforms.Preprocess."""
    img = load_rgb(sample.image_path)
    chw, rgb = preprocess.image(img)
    mask = None
    if with_mask:
        if sample.mask_path is None:
            mask = np.zeros(preprocess.map_size, np.uint8)
        else:
            m = load_mask(sample.mask_path)
            if m.size != img.size:
                raise mask_size_error(sample.mask_path, m.size, sample.image_path, img.size)
            mask = preprocess.mask(m)
    return chw, rgb, mask


def iterate_batches(samples, batch_size, preprocess, with_mask=False, workers=2):
    """Yield (samples, images NCHW, rgbs, masks) batches; images are decoded in a thread pool
    one batch ahead so that decoding overlaps the network."""
    chunks = [samples[i:i + batch_size] for i in range(0, len(samples), batch_size)]

    def load(chunk):
        parts = [load_sample(s, preprocess, with_mask) for s in chunk]
        images = np.stack([p[0] for p in parts])
        rgbs = np.stack([p[1] for p in parts])
        masks = np.stack([p[2] for p in parts]) if with_mask else None
        return chunk, images, rgbs, masks

    if not chunks:
        return
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        pending = pool.submit(load, chunks[0])
        for nxt in chunks[1:] + [None]:
            batch = pending.result()
            if nxt is not None:
                pending = pool.submit(load, nxt)
            yield batch
