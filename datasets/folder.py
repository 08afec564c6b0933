"""Folder mode: a user's images as they come off the line, one category per run.

    --normal_dir  good images (flat folder); a seeded share (--normal_test_ratio) becomes test images
    --abnormal_dir rejects: a flat folder (one defect type, named after the folder) or one subfolder
                   per defect type (as MVTec's test/<defect>); optional
    --mask_dir     masks by file stem: <stem>.png or <stem>_mask.png, flat or in subfolders named
                   like the defect types; optional (without: image-level evaluation)

The split is recorded (`split`: seed, ratio, a hash of the normal file names and the test names)
in the model file and the metrics; evaluating a model later reuses the recorded test images and
refuses a normal folder whose files changed, since any re-split would test on training images.
"""
import hashlib
import os
from collections import Counter

import numpy as np

from datasets.mvtec import Sample, check_mask_coverage
from datasets.transforms import is_image_file
from utils import UserError

MASK_SUFFIX = "_mask"


def _images_in(folder, flag):
    if not os.path.isdir(folder):
        raise UserError(f"{flag} folder not found: {folder}")
    return sorted(f for f in os.listdir(folder) if is_image_file(f) and os.path.isfile(os.path.join(folder, f)))


def _subfolders(folder):
    return sorted(d for d in os.listdir(folder) if os.path.isdir(os.path.join(folder, d)) and not d.startswith("."))


def _stem(name):
    return os.path.splitext(name)[0]


def names_hash(names):
    return hashlib.sha256("\n".join(sorted(names)).encode("utf-8")).hexdigest()


def split_normals(names, ratio, seed):
    """Seeded split of the sorted normal file names -> (train names, test names), each sorted."""
    if not 0 <= ratio < 1:
        raise UserError(f"--normal_test_ratio must be in [0, 1), got {ratio}")
    n_test = int(round(len(names) * ratio))
    if len(names) - n_test < 1:
        raise UserError(f"--normal_test_ratio {ratio} leaves no training image of the {len(names)} normal images")
    test = set(np.random.RandomState(seed).permutation(len(names))[:n_test].tolist())
    return ([n for i, n in enumerate(names) if i not in test], [n for i, n in enumerate(names) if i in test])


def default_category(normal_dir):
    """The category's name in folder mode without --category: the normal folder's parent
    (PATH/cap/good -> cap)."""
    return os.path.basename(os.path.dirname(os.path.abspath(normal_dir)))


class FolderDataset:
    """One category from --normal_dir / --abnormal_dir / --mask_dir (see the module doc). Every
    folder is listed and every mask matched when the dataset is opened, so a layout mistake stops
    the run before any work. `stored_split`: a model's recorded split, which evaluation reuses."""

    def __init__(self, normal_dir, abnormal_dir=None, mask_dir=None, category=None, test_ratio=0.2, seed=0,
                 stored_split=None):
        self.normal_dir, self.abnormal_dir, self.mask_dir = normal_dir, abnormal_dir, mask_dir
        self.name = self._category_name(category, normal_dir)
        normals = _images_in(normal_dir, "--normal_dir")
        if not normals:
            raise UserError(f"no images in --normal_dir {normal_dir}")
        if stored_split is not None:
            self.train_names, self.test_names = self._reuse(stored_split, normals)
            test_ratio, seed = stored_split["normal_test_ratio"], stored_split["seed"]
        else:
            self.train_names, self.test_names = split_normals(normals, test_ratio, seed)
        self.split = {"layout": "folder", "normal_dir": os.path.abspath(normal_dir),
                      "normal_test_ratio": float(test_ratio), "seed": int(seed), "normal_images": len(normals),
                      "normal_sha256": names_hash(normals), "test_normal": list(self.test_names)}
        self.defective = self._defective_samples()

    @staticmethod
    def _category_name(category, normal_dir):
        if category in (None, "", "all"):
            name = default_category(normal_dir)
            if not name:
                raise UserError(f"cannot name the category after the parent of {normal_dir}; pass --category NAME")
            return name
        if "," in category or category in ("objects", "textures") or os.sep in category or category.startswith("."):
            raise UserError(f"folder mode is one category: --category takes one name (a file name), got {category!r}")
        return category

    def _reuse(self, stored, normals):
        """The model's own test images, provided the normal folder holds the same files."""
        if names_hash(normals) != stored["normal_sha256"]:
            raise UserError(f"--normal_dir {self.normal_dir} holds {len(normals)} images whose names differ from "
                            f"the {stored['normal_images']} the model was split on (seed {stored['seed']}, "
                            f"ratio {stored['normal_test_ratio']:g}): its test images cannot be told from its "
                            f"training images; evaluate on the folder it was trained on, or retrain")
        test = list(stored["test_normal"])
        held = set(test)
        return [n for n in normals if n not in held], test

    # ------------------------------------------------------------ defective images and masks
    def _defect_folders(self):
        """[(defect type, folder)] of --abnormal_dir: its subfolders, or itself when flat."""
        root = self.abnormal_dir
        if root is None:
            return []
        loose = _images_in(root, "--abnormal_dir")
        subs = [d for d in _subfolders(root) if _images_in(os.path.join(root, d), "--abnormal_dir")]
        if loose and subs:
            raise UserError(f"--abnormal_dir {root} holds both images and defect subfolders ({', '.join(subs)}): "
                            f"put every image in a defect subfolder, or use a flat folder")
        if not loose and not subs:
            raise UserError(f"no images in --abnormal_dir {root}")
        if "good" in subs:
            raise UserError(f"--abnormal_dir {root} has a subfolder 'good': defect types cannot be named 'good'")
        if loose:
            return [(os.path.basename(os.path.abspath(root)) or "defect", root)]
        return [(d, os.path.join(root, d)) for d in subs]

    def _mask_index(self, defect_types):
        """{(defect type or None for a flat mask folder, stem): mask path}."""
        index = {}
        root = self.mask_dir
        folders = [(None, root)] + [(d, os.path.join(root, d)) for d in _subfolders(root)]
        for defect, folder in folders:
            if defect is not None and defect not in defect_types:
                raise UserError(f"mask folder {folder} names no defect type of --abnormal_dir "
                                f"({', '.join(sorted(defect_types)) or 'none'})")
            for name in _images_in(folder, "--mask_dir"):
                stem = _stem(name)
                stem = stem[:-len(MASK_SUFFIX)] if stem.endswith(MASK_SUFFIX) else stem
                key = (defect, stem)
                if key in index:
                    raise UserError(f"two masks for one image: {index[key]} and {os.path.join(folder, name)}")
                index[key] = os.path.join(folder, name)
        if not index:
            raise UserError(f"no masks in --mask_dir {root}")
        return index

    def _defective_samples(self):
        folders = self._defect_folders()
        images = [(defect, os.path.join(folder, name)) for defect, folder in folders
                  for name in _images_in(folder, "--abnormal_dir")]
        if self.mask_dir is None:
            return [Sample(path, defect, 1) for defect, path in images]
        index = self._mask_index({d for d, _ in folders})
        stems = [_stem(os.path.basename(p)) for _, p in images]
        stem_count = Counter(stems)
        samples, used = [], set()
        for (defect, path), stem in zip(images, stems):
            key = (defect, stem) if (defect, stem) in index else (None, stem)
            if key[0] is None and key in index and stem_count[stem] > 1:
                raise UserError(f"mask {index[key]} could belong to several images named {stem}.*: put the masks "
                                f"in subfolders named like the defect types")
            samples.append(Sample(path, defect, 1, index.get(key)))
            used.add(key)
        unmatched = sorted(index[k] for k in index if k not in used)
        if unmatched:
            raise UserError(f"mask {unmatched[0]} matches no image in --abnormal_dir {self.abnormal_dir} "
                            f"(masks match by file stem: <stem>.png or <stem>_mask.png)")
        check_mask_coverage(samples)
        return samples

    # ------------------------------------------------------------ the dataset interface
    def categories(self, selection):
        return [self.name]

    def _check(self, category):
        if category != self.name:
            raise UserError(f"folder mode holds one category, {self.name}, not {category}")

    def train_samples(self, category):
        self._check(category)
        return [Sample(os.path.join(self.normal_dir, n), "good", 0) for n in self.train_names]

    def test_samples(self, category):
        self._check(category)
        if not self.test_names:
            raise UserError(f"no normal test images: --normal_test_ratio {self.split['normal_test_ratio']:g} keeps "
                            f"all {self.split['normal_images']} normal images for training; evaluation needs some "
                            f"(e.g. 0.2)")
        return [Sample(os.path.join(self.normal_dir, n), "good", 0) for n in self.test_names] + self.defective
