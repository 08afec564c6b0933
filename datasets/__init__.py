"""Data sources: each layout is a class with categories(selection), train_samples(category) and
test_samples(category); `open_dataset(args)` picks the one the flags name."""
from datasets.mvtec import (MVTEC_OBJECTS, MVTEC_TEXTURES, MVTecDataset, Sample,  # noqa: F401
                            available_categories, iterate_batches, resolve_categories, test_samples,
                            train_samples)


def open_dataset(args):
    return MVTecDataset(args.data_path)
