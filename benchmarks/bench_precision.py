"""Accuracy at each precision: OrthoAD R18 k=100 and PatchCore 1% / 10% fitted and evaluated on
bottle at fp32 and at every other precision given that this CPU runs natively (the others are
skipped with a line; AD_CPU_FLAGS forces them, see docs/precision.md), image AUROC, pixel AUROC and
PRO side by side with their distance from fp32 against the issue's bounds (bf16: 0.003 / 0.003 /
0.005, int8: 0.01 / 0.005 / 0.01), and how far the feature network's output moves on the test
images. Prints figures; asserts nothing.

    python benchmarks/bench_precision.py [--precision fp32,bf16] [--methods ortho,coreset1,coreset10]
"""
import argparse
import json
import os
import tempfile

import numpy as np

from common import DATA, WEIGHTS, cpu_header, load_images, precisions_to_run, require_shared

import train  # noqa: E402
from datasets import test_samples  # noqa: E402
from datasets.transforms import Preprocess  # noqa: E402
from models import build_method, load_model  # noqa: E402
from models.backbone import make_engine, run_in_chunks  # noqa: E402
from models.precision import paddle_support  # noqa: E402
from utils import UserError, format_table  # noqa: E402

METHOD_FLAGS = {
    "ortho": ["--method", "ortho", "--k", "100"],
    "coreset1": ["--method", "coreset", "--coreset_ratio", "0.01"],
    "coreset10": ["--method", "coreset", "--coreset_ratio", "0.1"],
}
METRICS = ("image_AUROC", "pixel_AUROC", "PRO")
BOUNDS = {"bf16": (0.003, 0.003, 0.005), "int8": (0.01, 0.005, 0.01)}


def fit_and_evaluate(name, precision, tmp, threads):
    run = os.path.join(tmp, f"{name}_{precision}")
    train.main(["--data_path", DATA, "--category", "bottle", "--arch", "resnet18", *METHOD_FLAGS[name],
                "--backbone_weights", WEIGHTS, "--eval_PRO", "--save_path", run, "--no_progress",
                "--cpu_threads", str(threads), "--precision", precision])
    with open(os.path.join(run, "metrics", "bottle.json")) as f:
        return run, json.load(f)


def feature_drift(run, precision, images, threads):
    """(max, mean) |features at `precision` - at fp32| / mean |fp32 features| of the model's own
    feature network on `images`."""
    state = load_model(os.path.join(run, "bottle.pdparams"))
    net = build_method(state["config"]).feature_net(state)
    shape = Preprocess.from_config(state["config"]).input_shape
    outs = [run_in_chunks(make_engine(net, shape, cpu_threads=threads, precision=p), images)[0]
            for p in ("fp32", precision)]
    diff, scale = np.abs(outs[1] - outs[0]), np.abs(outs[0]).mean()
    return diff.max() / scale, diff.mean() / scale


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--precision", default="fp32,bf16", help="comma list; fp32 is always run first")
    parser.add_argument("--methods", default="ortho,coreset1,coreset10", help=f"comma list of {', '.join(METHOD_FLAGS)}")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--drift_images", type=int, default=16, help="bottle test images for the feature drift")
    args = parser.parse_args()
    require_shared()
    print(cpu_header())
    precisions = ["fp32"] + [p for p in precisions_to_run(args.precision) if p != "fp32"]
    if "bf16" in precisions and paddle_support()["bf16"] is False:
        print("Paddle has no bf16 kernels for this CPU: its bf16 runs are fp32 kernels (forced through AD_CPU_FLAGS)")
    images = load_images(test_samples(DATA, "bottle")[:args.drift_images])
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.methods.split(","):
            base = None
            for precision in precisions:
                try:
                    run, result = fit_and_evaluate(name, precision, tmp, args.threads)
                except UserError as err:  # a precision not offered for this method (PatchCore int8)
                    print(f"[{name} {precision}] refused: {err}", flush=True)
                    continue
                row = [name, precision] + [f"{result[m]:.4f}" for m in METRICS]
                if base is None:
                    base = result
                    row += ["", "", ""]
                else:
                    deltas = [result[m] - base[m] for m in METRICS]
                    held = all(abs(d) <= b for d, b in zip(deltas, BOUNDS[precision]))
                    drift = feature_drift(run, precision, images, args.threads)
                    row += [" / ".join(f"{d:+.4f}" for d in deltas), "yes" if held else "NO",
                            f"{drift[0]:.2%} / {drift[1]:.2%}"]
                rows.append(row)
                print(f"[{name} {precision}] " + "  ".join(f"{m} {result[m]:.4f}" for m in METRICS), flush=True)
    print("\n" + format_table(["method", "precision", "image AUROC", "pixel AUROC", "PRO", "delta vs fp32",
                               "within bounds", "feature drift max / mean"], rows))
    print("bounds (image / pixel / PRO): " + "; ".join(f"{p} {b[0]} / {b[1]} / {b[2]}" for p, b in BOUNDS.items()))


if __name__ == "__main__":
    main()
