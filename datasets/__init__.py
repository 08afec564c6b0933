"""Data sources: each layout is a class with categories(selection), train_samples(category) and
test_samples(category); `open_dataset(args)` picks the one the flags name."""
import os

from datasets.mvtec import (MVTEC_OBJECTS, MVTEC_TEXTURES, MVTecDataset, Sample,  # noqa: F401
                            available_categories, iterate_batches, resolve_categories, test_samples,
                            train_samples)
from utils import UserError

DEFAULT_DATA_PATH = "demo_data"


def open_dataset(args, stored_split=None):
    """The layout the flags name: folder mode with --normal_dir, else the MVTec layout under
    --data_path. `stored_split`: a model's recorded split (folder mode evaluates on its test images)."""
    if getattr(args, "normal_dir", None):
        from datasets.folder import FolderDataset
        return FolderDataset(args.normal_dir, args.abnormal_dir, args.mask_dir, args.category,
                             args.normal_test_ratio, args.seed, stored_split)
    if stored_split:  # its test images are recorded by name: another layout would test on training images
        raise UserError("this model was trained in folder mode (its test split is recorded in the model): "
                        "evaluate it with the same --normal_dir/--abnormal_dir, not --data_path")
    return MVTecDataset(args.data_path)


def resolve_data_args(args):
    """Check the data flags against each other, before any work. --data_path defaults to None so
    that an explicit one can be told from the default (demo_data) and refused with --normal_dir;
    in folder mode it becomes the folders' common parent (the report names images relative to it)."""
    if not hasattr(args, "data_path"):
        return
    folders = [getattr(args, flag, None) for flag in ("normal_dir", "abnormal_dir", "mask_dir")]
    if not folders[0]:
        if any(folders):
            raise UserError("--abnormal_dir and --mask_dir belong to folder mode: give --normal_dir too")
        args.data_path = args.data_path if args.data_path is not None else DEFAULT_DATA_PATH
        return
    if args.data_path is not None:
        raise UserError("--normal_dir (folder mode) and --data_path (MVTec layout) exclude each other: give one")
    given = [os.path.abspath(f) for f in folders if f]
    args.data_path = os.path.commonpath(given) if len(given) > 1 else os.path.dirname(given[0])
