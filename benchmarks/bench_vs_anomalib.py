"""Our whole pipeline (image file -> preprocessing -> feature network -> scoring) per image against
anomalib's OpenVINOInferencer on the same bottle test images, in one run: ms/img side by side, the
ratios, and both image AUROCs (sklearn) on those images.

    python benchmarks/bench_vs_anomalib.py [--methods padim,patchcore] [--images 83] [--threads 2]
        [--batch_size 1,8] [--backends paddle,openvino] [--precision fp32,bf16]
        [--anomalib_python ../venv-anomalib/bin/python] [--anomalib_image_size 224,256]

Ours: train.py (OrthoAD R18 k=100, or PatchCore R18 1%), export_model.py --onnx, then infer.py's
own batch step (predict_batch: decode + crop + normalise, the network, scoring, calibration) with
Paddle Inference and with --backend openvino, at each --batch_size.
anomalib: benchmarks/anomalib_side.py run by the python of a separate virtual environment with
anomalib 2.x and torch (not dependencies of this project; without that python the anomalib side is
skipped with one line): its Engine fit and OpenVINO export of PaDiM (resnet18, layer1-3,
n_features=100) or PatchCore (resnet18, layer2-3, 1%), both starting from our ImageNet R18 weights,
then OpenVINOInferencer.predict(path) image by image (batch 1, the only batch it takes).
Ours is timed twice, before and after the anomalib timing, and averaged, so a drift of the loaded
machine's speed does not land on one side of the ratio. Prints figures; asserts nothing.
"""
import argparse
import json
import os
import subprocess
import tempfile
import time

import numpy as np

from common import DATA, ROOT, WEIGHTS, cpu_header, precisions_to_run, require_shared

import export_model  # noqa: E402
import infer  # noqa: E402
import train  # noqa: E402
from datasets import test_samples  # noqa: E402
from datasets.unreadable import UnreadableImages  # noqa: E402
from deploy.predictor import load_deployed, resolve_files  # noqa: E402
from deploy.timing import StageTimer  # noqa: E402
from utils import format_table  # noqa: E402

# method -> (our train.py flags, anomalib_side.py --model, what each side is called)
METHODS = {
    "padim": (["--method", "ortho", "--k", "100"], "padim",
              "OrthoAD R18 k=100", "PaDiM R18 n_features=100"),
    "patchcore": (["--method", "coreset", "--coreset_ratio", "0.01"], "patchcore",
                  "PatchCore R18 1%", "PatchCore R18 1%"),
}
# anomalib_side.py split knows the node names of anomalib's PaDiM export only.
METHODS_SPLIT = {"padim": True}
ANOMALIB_SIDE = os.path.join(ROOT, "benchmarks", "anomalib_side.py")
DEFAULT_VENV_PYTHON = os.path.join(os.path.dirname(ROOT), "venv-anomalib", "bin", "python")


def auroc(labels, scores):
    """Image AUROC as text; '-' where the images are all of one class (too few --images)."""
    from sklearn.metrics import roc_auc_score
    return f"{roc_auc_score(labels, scores):.4f}" if len(set(labels)) == 2 else "-"


def fit_and_export(name, precision, tmp, threads):
    """train.py + export_model.py --onnx of our model of `name` -> (deployed folder, fit seconds)."""
    flags = ["--arch", "resnet18", *METHODS[name][0]]
    run = os.path.join(tmp, f"ours_{name}_{precision}")
    t0 = time.perf_counter()
    train.main(["--data_path", DATA, "--category", "bottle", *flags, "--backbone_weights", WEIGHTS, "--save_path", run,
                "--no_progress", "--cpu_threads", str(threads), "--precision", precision])
    fit_s = time.perf_counter() - t0
    deployed = os.path.join(run, "inference")
    export_model.main([*flags, "--model_path", os.path.join(run, "bottle.pdparams"), "--save_dir", deployed, "--onnx"])
    return deployed, fit_s


def time_ours(detector, cfg, paths, batch):
    """infer.py's batch step over `paths` in batches of `batch` -> (median ms/img of the whole
    step, median ms/img of each stage, raw scores in image order). Medians after the warm-up
    batches (2 at batch 1, 1 above), which are timed like the others and dropped."""
    warm = 2 if batch == 1 else 1
    timer, totals, scores = StageTimer(warmup=warm), [], []
    for lo in range(0, len(paths), batch):
        _, _, preds = infer.predict_batch(detector, cfg, paths[lo:lo + batch], timer, UnreadableImages())
        totals.append(sum(timer.times[stage][-1] for stage in timer.times))
        scores += [p["raw_score"] for p in preds]
    stages = {stage: float(np.median(times[warm:])) for stage, times in timer.times.items()}
    return float(np.median(totals[warm:])), stages, scores


def run_anomalib_side(python, step, work, log, **flags):
    """anomalib_side.py `step` under the venv's python; its output goes to `log`. -> None, or
    one line saying why it failed."""
    argv = [python, ANOMALIB_SIDE, step, "--work", work]
    for key, value in flags.items():
        argv += [f"--{key}", str(value)]
    # The venv's torch may be a CUDA build: keep it off any GPU, this is a CPU comparison.
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    with open(log, "a") as out:
        code = subprocess.run(argv, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=work).returncode
    if code:
        with open(log) as f:
            tail = [line for line in f.read().splitlines() if line.strip()][-1:]
        return f"anomalib_side.py {step} failed (exit {code}): {tail[0] if tail else ''} (log: {log})"
    return None


def anomalib_weights(tmp):
    """Our R18 layer1-3 weights as .npz, which the venv (no Paddle) reads with numpy."""
    import paddle
    path = os.path.join(tmp, "resnet18_layer1-3.npz")
    np.savez(path, **{k: np.asarray(v) for k, v in paddle.load(WEIGHTS).items()})
    return path


def prepare_anomalib(args, name, tmp, weights):
    """anomalib's fit + OpenVINO export at each --anomalib_image_size -> {size: work folder}."""
    prepared = {}
    for size in args.anomalib_sizes:
        work = os.path.join(tmp, f"anomalib_{name}_{size}")
        os.makedirs(work)
        error = run_anomalib_side(args.anomalib_python, "prepare", work, os.path.join(work, "log.txt"), data=DATA,
                                  category="bottle", weights=weights, model=METHODS[name][1], image_size=size,
                                  threads=args.threads)
        if error:
            print(error)
            continue
        with open(os.path.join(work, "prepared.json")) as f:
            info = json.load(f)
        print(f"[anomalib {METHODS[name][3]} {size}px] Engine.fit {info['fit_s']:.0f} s (one epoch + its validation "
              f"pass), export to OpenVINO IR {info['export_s']:.0f} s, torch {info['torch']}")
        prepared[size] = work
    return prepared


def time_anomalib(args, name, prepared, images_json, precisions):
    """OpenVINOInferencer per image at each prepared size and precision -> {(size, precision): result}."""
    results = {}
    for size, work in prepared.items():
        for precision in precisions:
            out = os.path.join(work, f"time_{precision}.json")
            error = run_anomalib_side(args.anomalib_python, "time", work, os.path.join(work, "log.txt"),
                                      images=images_json, precision=precision, threads=args.threads, out=out)
            if error:
                print(error)
                continue
            with open(out) as f:
                result = json.load(f)
            if "skipped" in result:
                print(f"anomalib OpenVINO {precision} not timed: {result['skipped']}")
                continue
            if METHODS_SPLIT.get(name):  # where its IR's time goes, on the same images
                split = os.path.join(work, f"split_{precision}.json")
                error = run_anomalib_side(args.anomalib_python, "split", work, os.path.join(work, "log.txt"),
                                          images=images_json, precision=precision, threads=args.threads, out=split)
                if not error:
                    with open(split) as f:
                        result["ir_split"] = json.load(f)
            results[size, precision] = result
    return results


def compare(args, name, tmp, paths, labels, images_json, weights):
    """One method: both sides fitted and exported, ours timed around anomalib's timing; the table."""
    ours_label, theirs_label = METHODS[name][2], METHODS[name][3]
    precisions = precisions_to_run(args.precision)
    deployed = {}
    for precision in precisions:
        deployed[precision], fit_s = fit_and_export(name, precision, tmp, args.threads)
        print(f"[ours {ours_label} {precision}] train.py fit {fit_s:.0f} s (no evaluation)")
    prepared = prepare_anomalib(args, name, tmp, weights) if weights else {}
    detectors = {}
    for precision in precisions:
        for backend in args.backends:
            detectors[backend, precision] = load_deployed(*resolve_files(deployed[precision]), backend=backend,
                                                          precision=precision, cpu_threads=args.threads)
    rounds = []
    for round_no in range(2):  # ours before and after anomalib's timing
        rounds.append({(run, batch): time_ours(detector, meta["config"], paths, batch)
                       for run, (detector, meta) in detectors.items() for batch in args.batches})
        if round_no == 0:
            theirs = time_anomalib(args, name, prepared, images_json, precisions)
    rows, best = [], None
    reference = next(iter(theirs.values()), None)
    for (backend, precision), _ in detectors.items():
        for batch in args.batches:
            first, second = rounds[0][(backend, precision), batch], rounds[1][(backend, precision), batch]
            whole = (first[0] + second[0]) / 2
            split = {s: (first[1][s] + second[1][s]) / 2 for s in first[1]}
            same = max(abs(a - b) / abs(b) for a, b in zip(first[2], rounds[0][(backend, precision), args.batches[0]][2]))
            rows.append([f"ours {ours_label}", f"{'Paddle Inference' if backend == 'paddle' else 'OpenVINO'} "
                         f"{precision}", batch, f"{whole:.1f} ({first[0]:.1f} / {second[0]:.1f})",
                         f"{split['preprocess']:.1f} + {split['inference']:.1f} + {split['postprocess']:.1f}",
                         auroc(labels, first[2]), f"{same:.0e}",
                         f"{np.median(reference['ms']) / whole:.2f}x" if reference else "-"])
            best = whole if best is None else min(best, whole)
    for (size, precision), result in theirs.items():
        median = float(np.median(result["ms"]))
        read, ir = float(np.median(result["read_ms"])), float(np.median(result["ir_ms"]))
        rows.append([f"anomalib {theirs_label} {size}px", f"OpenVINO {precision}", 1, f"{median:.1f}",
                     f"read {read:.1f} + IR {ir:.1f}",
                     auroc(labels, result['scores']), "",
                     f"{np.median(reference['ms']) / median:.2f}x" if reference else "-"])
    print(f"\n[{name}] {len(paths)} bottle test images, {args.threads} threads, ms/img (medians; ours: mean of the two "
          f"rounds, before / after anomalib's); 'vs first batch size' = max relative difference of raw scores from "
          f"the same backend at the first batch size (the same images must score the same); 'speed-up' = anomalib's first row "
          f"ms/img / this row's; anomalib's split, timed apart in the same loop: reading the file (and scaling it) + "
          f"the IR call (its preprocessing, network, scoring and normalisation in one graph)")
    print(format_table(["pipeline", "runtime", "batch", "whole ms/img", "preprocess + network + scoring",
                        "image AUROC", "vs first batch size", "speed-up vs anomalib"], rows))
    for (size, precision), result in theirs.items():
        if "ir_split" in result:
            split = result["ir_split"]
            print(f"[{name}] anomalib {size}px {precision}: its IR and the same IR cut short, alternated image by "
                  f"image, ms/img medians: " + ", ".join(f"{part} {ms:.1f}" for part, ms in split.items())
                  + " (the rest after the Mahalanobis distances: upsampling, 33x33 blur, normalisation)")
    if reference:
        print(f"[{name}] anomalib OpenVINOInferencer {reference['anomalib']} / OpenVINO {reference['openvino']}: "
              f"{np.median(reference['ms']):.1f} ms/img; our fastest row {best:.1f} ms/img: "
              f"{np.median(reference['ms']) / best:.2f}x")


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--methods", default="padim", help=f"comma list of {', '.join(METHODS)}")
    parser.add_argument("--images", type=int, default=0, help="bottle test images timed (0: all)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch_size", default="1,8", help="comma list of our batch sizes")
    parser.add_argument("--backends", default="paddle,openvino", help="comma list of our runtimes: paddle, openvino")
    parser.add_argument("--precision", default="fp32",
                        help="comma list of fp32, bf16: each one this CPU runs natively, on both sides")
    parser.add_argument("--anomalib_python", default=DEFAULT_VENV_PYTHON,
                        help="python of a virtual environment with anomalib 2.x and torch")
    parser.add_argument("--anomalib_image_size", default="224",
                        help="comma list: 224 (our geometry: 256x256 then the centre 224x224), 256 (anomalib's "
                             "default: the whole image at 256x256)")
    args = parser.parse_args()
    require_shared()
    print(cpu_header())
    args.batches = [int(b) for b in args.batch_size.split(",")]
    args.backends = args.backends.split(",")
    args.anomalib_sizes = [int(s) for s in args.anomalib_image_size.split(",")]
    samples = test_samples(DATA, "bottle")
    samples = samples[:args.images] if args.images else samples
    paths, labels = [s.image_path for s in samples], [s.label for s in samples]
    with tempfile.TemporaryDirectory() as tmp:
        images_json = os.path.join(tmp, "images.json")
        with open(images_json, "w") as f:
            json.dump(paths, f)
        weights = None
        if os.path.isfile(args.anomalib_python):
            weights = anomalib_weights(tmp)
        else:
            print(f"anomalib side skipped: no python at {args.anomalib_python} (--anomalib_python: a virtual "
                  f"environment with anomalib 2.x and torch; see docs/benchmarks.md)")
        for name in args.methods.split(","):
            compare(args, name, tmp, paths, labels, images_json, weights)


if __name__ == "__main__":
    main()
