"""Shared pieces of the benchmark scripts: paths, the CPU header, the bare-backbone floor, timing."""
import os
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
SHARED = os.environ.get("AD_SHARED_DIR", os.path.join(os.path.dirname(ROOT), "shared"))
WEIGHTS = os.path.join(SHARED, "weights", "resnet18_imagenet_layer1-3.pdparams")
DATA = os.path.join(SHARED, "data", "mvtec_lite")

from utils import UserError  # noqa: E402


def cpu_header():
    """One line for a benchmark's header: the CPU, the flags that decide its precisions (lscpu's
    Flags) and what runs natively (models/precision.py), so that figures from different machines
    can be read side by side."""
    from models.precision import header_line
    return header_line()


def precisions_to_run(text):
    """--precision fp32,bf16,... -> those this CPU runs natively; each other one is skipped with
    a printed line saying what the CPU lacks."""
    from models.precision import check
    chosen = []
    for name in [p.strip() for p in text.split(",") if p.strip()]:
        try:
            chosen.append(check(name))
        except UserError as err:
            print(f"skipped --precision {name}: {err}", flush=True)
    return chosen


def require_shared():
    for path in (WEIGHTS, os.path.join(DATA, "bottle")):
        if not os.path.exists(path):
            raise UserError(f"benchmark asset missing: {path} (expected ../shared beside the repo)")


def load_images(samples, resize=256, crop_size=224):
    from datasets import iterate_batches
    from datasets.transforms import Preprocess
    return np.concatenate([b[1] for b in iterate_batches(samples, 16, Preprocess(resize, crop_size))])


def bare_backbone(arch="resnet18", weights=WEIGHTS, layers=("layer1", "layer2", "layer3")):
    """The floor every figure is compared with: backbone layers + resize/concat, nothing else."""
    import paddle

    from models.backbone import ResNetFeatures, concat_to_first

    class Bare(paddle.nn.Layer):
        def __init__(self):
            super().__init__()
            self.features = ResNetFeatures(arch, layers)
            if weights:
                self.features.load_pretrained(weights)

        def forward(self, x):
            return concat_to_first(self.features(x))

    return Bare()


def time_per_image(fn, images, repeat=1, warmup=2, batch=1):
    """Mean seconds per image of fn(a batch of `batch` images) over all images, after warm-up calls."""
    starts = range(0, len(images), batch)
    for lo in list(starts)[:warmup]:
        fn(images[lo:lo + batch])
    t0 = time.perf_counter()
    for _ in range(repeat):
        for lo in starts:
            fn(images[lo:lo + batch])
    return (time.perf_counter() - t0) / (repeat * len(images))
