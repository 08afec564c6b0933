"""PaDiM/OrthoAD figures: fit time vs the bare backbone forward, peak RSS of a WRN50 k=300 fit,
PRO time per category. Prints figures measured in one run; asserts nothing.

    python benchmarks/bench_padim.py [--skip_wrn] [--precision fp32,bf16]
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

from common import (DATA, ROOT, WEIGHTS, bare_backbone, cpu_header, load_images, precisions_to_run,
                    require_shared)

from report import metrics  # noqa: E402
from datasets import train_samples, test_samples  # noqa: E402
from models.backbone import make_engine  # noqa: E402
from models.backbone import run_in_chunks  # noqa: E402
from models.padim import PaDiM  # noqa: E402

# Random WRN50-2 weights (the memory figure does not depend on their values), written by one
# process so that the measured process holds only what fitting needs.
WRN_WEIGHTS = r"""
import paddle
paddle.seed(0)
paddle.save(paddle.vision.models.wide_resnet50_2().state_dict(), {weights!r})
"""
WRN_CHILD = r"""
import sys, json, numpy as np
sys.path.insert(0, {root!r})
from utils import peak_rss_mb
from models.padim import PaDiM
path = {weights!r}
cfg = dict(method="ortho", arch="wide_resnet50_2", k=300, seed=521, resize=256, crop_size=224)
rng = np.random.RandomState(0)
images = rng.randn({n}, 3, 224, 224).astype(np.float32)
batches = lambda: (images[i:i + 8] for i in range(0, len(images), 8))
before = peak_rss_mb()
state, _ = PaDiM(cfg).fit(batches, dict(engine="inference", cpu_threads=2), path, progress=False)
print(json.dumps(dict(peak_rss_mb=peak_rss_mb(), before_fit_mb=before,
                      packed_mb=state["stats"]["precision_packed"].nbytes / 2**20,
                      matrices_mb=state["stats"]["mean"].size * state["stats"]["mean"].shape[1] * 4 / 2**20)))
"""


def bench_fit(precision="fp32"):
    """-> (state, engine, fit seconds, bare forward seconds) of an OrthoAD R18 k=100 fit on bottle
    with the feature network at `precision`, beside the bare forward at the same precision."""
    samples = train_samples(DATA, "bottle")
    images = load_images(samples)
    floor = make_engine(bare_backbone(), (3, 224, 224), cpu_threads=2, precision=precision)
    bare_s = time_all(lambda: run_in_chunks(floor, images))
    cfg = dict(method="ortho", arch="resnet18", k=100, seed=521, resize=256, crop_size=224, precision=precision)
    from datasets.transforms import Preprocess
    from pipeline.training import image_batches
    args = argparse.Namespace(batch_size=8, resize=256, crop_size=224, num_workers=2)
    t0 = time.perf_counter()
    state, engine = PaDiM(cfg).fit(image_batches(samples, args, Preprocess.from_config(cfg)),
                                   dict(engine="inference", cpu_threads=2, precision=precision), WEIGHTS, progress=False)
    fit_s = time.perf_counter() - t0
    print(f"[{precision}] fit R18 ortho k=100 on bottle ({len(samples)} images, 224^2, 2 threads): {fit_s:.2f} s "
          f"(image loading, engine build, forward, statistics, inversion)")
    print(f"[{precision}] bare R18 layer1-3 forward over the same images (preloaded, Paddle Inference + oneDNN): "
          f"{bare_s:.2f} s = {1000 * bare_s / len(samples):.1f} ms/img")
    print(f"[{precision}] fit / bare forward: {fit_s / bare_s:.2f}x   (target <= 1.3x; anomalib PaDiM-R18 fit here: 20 s)")
    return state, engine, fit_s, bare_s


def time_all(fn):
    fn()  # warm-up (oneDNN primitive creation)
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def bench_pro(state, engine):
    from models.postprocess import Detector
    detector = Detector.for_method(PaDiM, engine, state["stats"], (224, 224))
    samples = test_samples(DATA, "bottle")
    from datasets import iterate_batches
    from datasets.transforms import Preprocess
    maps, masks = [], []
    for _, images, _, mask in iterate_batches(samples, 8, Preprocess(), with_mask=True):
        maps.append(detector.raw(images)[1])
        masks.append(mask)
    maps, masks = np.concatenate(maps), np.concatenate(masks)
    t0 = time.perf_counter()
    pro = metrics.pro_auc(masks, maps)
    print(f"PRO on bottle ({len(samples)} test images, exact, {maps.size / 1e6:.1f} M pixels): "
          f"{time.perf_counter() - t0:.2f} s  (PRO = {pro:.4f}; target <= 2 s)")


def bench_wrn_memory(n_images):
    with tempfile.TemporaryDirectory() as tmp:
        weights = os.path.join(tmp, "wrn.pdparams")
        subprocess.run([sys.executable, "-c", WRN_WEIGHTS.format(weights=weights)], check=True, capture_output=True)
        code = WRN_CHILD.format(root=ROOT, weights=weights, n=n_images)
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if proc.returncode:
        print(proc.stderr[-2000:])
        return
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    print(f"peak RSS, fit WRN50-2 ortho k=300 at 224 ({n_images} images, random weights): {r['peak_rss_mb']:.0f} MB "
          f"(float32 precision matrices during the fit {r['matrices_mb']:.0f} MB, stored packed {r['packed_mb']:.0f} MB; "
          f"process before fit {r['before_fit_mb']:.0f} MB; "
          f"target <= 2048 MB; anomalib PaDiM-R18 peak here: 1.9 GB)")


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--skip_wrn", action="store_true", help="skip the WRN50 memory figure")
    parser.add_argument("--wrn_images", type=int, default=32)
    parser.add_argument("--precision", default="fp32",
                        help="comma list of fp32, bf16, int8: the fit timed at each one this CPU runs natively "
                             "(the others are skipped with a line saying what the CPU lacks)")
    args = parser.parse_args()
    require_shared()
    print(cpu_header())
    precisions = precisions_to_run(args.precision)
    if not precisions:
        return
    fits = {p: bench_fit(p) for p in precisions}
    for p in precisions[1:]:  # the target on AMX-BF16: the OrthoAD fit >= 1.8x faster at bf16
        print(f"fit at {p}: {fits[precisions[0]][2] / fits[p][2]:.2f}x as fast as at {precisions[0]} "
              f"(bare forward {fits[precisions[0]][3] / fits[p][3]:.2f}x)")
    state, engine = fits[precisions[0]][:2]
    bench_pro(state, engine)
    if not args.skip_wrn:
        bench_wrn_memory(args.wrn_images)


if __name__ == "__main__":
    main()
