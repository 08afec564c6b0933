"""Deployment latency: infer.py (Paddle Inference + oneDNN) per image at each --batch_size,
split into preprocess / inference / postprocess, beside the bare R18 layer1-3 forward at the
same batch size under the same config (and, at batch 1, beside eager predict.py), measured in
one run; for PatchCore also the nearest-neighbour search (grouped vs brute force: share of
distances computed, ms/img). Then Paddle Inference beside OpenVINO (fp32, and bf16 where the CPU
has it natively) on the same exported model, alternated batch by batch: the network alone and the
whole infer.py pipeline split into preprocess / network / scoring, with the ratio whole / network
and its projection for a network 3.7x faster (bf16 on AMX). Prints figures; asserts nothing.

    python benchmarks/bench_infer.py [--methods ortho,coreset,coreset10] [--batch_size 1,8] [--threads 2]
        [--images 40] [--backends paddle,openvino] [--precision fp32,bf16,int8]
    # --precision: each precision this CPU runs natively fitted, deployed and timed in the same run, side by side
"""
import argparse
import json
import os
import tempfile
import time

import numpy as np

from common import (DATA, WEIGHTS, bare_backbone, cpu_header, load_images, precisions_to_run, require_shared,
                    time_per_image)

from pipeline import cli  # noqa: E402
from pipeline import evaluation  # noqa: E402
import export_model  # noqa: E402
import infer  # noqa: E402
import train  # noqa: E402
from datasets import test_samples, train_samples  # noqa: E402
from datasets.unreadable import UnreadableImages  # noqa: E402
from deploy.predictor import load_deployed, resolve_files  # noqa: E402
from deploy.timing import StageTimer  # noqa: E402
from models import build_method  # noqa: E402
from models.backbone import make_engine  # noqa: E402
from models.postprocess import Detector  # noqa: E402
from models.quantize import CALIBRATION_IMAGES  # noqa: E402
from utils import format_table  # noqa: E402

METHOD_FLAGS = {
    "ortho": ["--method", "ortho", "--k", "100"],
    "sample": ["--method", "sample", "--k", "100"],
    "coreset": ["--method", "coreset", "--coreset_ratio", "0.01"],
    "coreset10": ["--method", "coreset", "--coreset_ratio", "0.1"],
    # Latency does not depend on how far the networks are trained: a teacher distilled for a
    # few steps on the bottle train images and a short student run stand in for the real ones.
    "efficientad": ["--method", "efficientad", "--train_steps", "20"],
}
DISTILL_STEPS = 20
# Paddle Inference fp32 / bf16 on the exported OrthoAD R18 network by batch size, AMX-BF16 Xeon,
# 2 threads (issue #20): what a bf16 network would cost here, for the projection of the pipeline.
BF16_SPEEDUP = {1: 2.4, 8: 3.7}


def method_flags(name, tmp, threads):
    flags = ["--arch", "resnet18", *METHOD_FLAGS[name]]
    if name == "efficientad":
        teacher = os.path.join(tmp, "teacher.pdparams")
        flags += ["--teacher_weights", teacher]
        if not os.path.exists(teacher):
            train.main([*flags, "--backbone_weights", WEIGHTS, "--distill", "--distill_data",
                        os.path.join(DATA, "bottle", "train"), "--train_steps", str(DISTILL_STEPS), "--no_progress",
                        "--cpu_threads", str(threads)])
    return flags


def batch_figures(name, deployed, paths, images, floor, batch, threads, log):
    """infer.py --batch_size `batch` against the bare forward at the same batch size: the
    AutoLog report between two floor timings, then the stages alternated batch by batch."""
    # The floor is timed right before and right after infer.py and averaged, so a drift of the
    # machine's speed during the run does not land on one side of the ratio.
    before_ms = 1000 * time_per_image(floor, images, batch=batch)
    infer.main(["--model_dir", deployed, "--input_file", *paths, "--cpu_threads", str(threads), "--batch_size",
                str(batch), "--enable_mkldnn", "True", "--enable_benchmark", "True", "--warmup", "2",
                "--save_path", os.path.join(os.path.dirname(log), f"infer{batch}"), "--save_log_path", log])
    bare_ms = (before_ms + 1000 * time_per_image(floor, images, batch=batch)) / 2
    report = json.loads(open(log).read().splitlines()[-1])
    total = report["total_time_ms"]
    tag = f"[{name} b{batch}]"
    print(f"\n{tag} bare R18 layer1-3 forward, Paddle Inference + oneDNN, {threads} threads, batch {batch}: "
          f"{bare_ms:.1f} ms/img (before {before_ms:.1f}, after {2 * bare_ms - before_ms:.1f})")
    print(f"{tag} infer.py per image: preprocess {report['preprocess_time_ms']:.1f} + inference "
          f"{report['inference_time_ms']:.1f} + postprocess {report['postprocess_time_ms']:.1f} = {total:.1f} ms")
    network_post = report["inference_time_ms"] + report["postprocess_time_ms"]
    print(f"{tag} infer.py / bare forward: {total / bare_ms:.2f}x (inference only: "
          f"{report['inference_time_ms'] / bare_ms:.2f}x, inference + postprocess: {network_post / bare_ms:.2f}x, "
          f"preprocess = image decoding + crop + normalise: {report['preprocess_time_ms'] / bare_ms:.2f}x)")
    # Drift-proof ratio: infer.py's own per-batch stages (predict_batch) and the bare forward
    # (as one batch, and image by image as the Detector runs it) alternate batch by batch on the
    # same deployed files; medians after `warm` batches.
    detector, meta = load_deployed(*resolve_files(deployed), cpu_threads=threads, enable_mkldnn=True)
    warm = 2 if batch == 1 else 1
    timer, bare_times, single_times = StageTimer(warmup=warm), [], []
    for lo in range(0, len(paths) - batch + 1, batch):
        infer.predict_batch(detector, meta["config"], paths[lo:lo + batch], timer, UnreadableImages())
        t0 = time.perf_counter()
        floor(images[lo:lo + batch])
        t1 = time.perf_counter()
        for i in range(lo, lo + batch) if batch > 1 else ():
            floor(images[i:i + 1])
        bare_times.append(1000 * (t1 - t0) / batch)
        single_times.append(1000 * (time.perf_counter() - t1) / batch)
    stages = {stage: float(np.median(timer.times[stage][warm:])) for stage in timer.times}
    bare_median, total_median = float(np.median(bare_times[warm:])), sum(stages.values())
    print(f"{tag} interleaved with the bare forward, medians: preprocess {stages['preprocess']:.1f} + "
          f"inference {stages['inference']:.1f} + postprocess {stages['postprocess']:.1f} = "
          f"{total_median:.1f} ms/img vs bare at batch {batch} {bare_median:.1f} ms/img: "
          f"{total_median / bare_median:.2f}x (inference + postprocess "
          f"{(stages['inference'] + stages['postprocess']) / bare_median:.2f}x); targets at batch 8: "
          f"ortho k=100 <= 1.10x, coreset 10% <= 1.5x")
    if batch > 1:
        single_median = float(np.median(single_times[warm:]))
        print(f"{tag} the bare forward image by image in the same loop: {single_median:.1f} ms/img "
              f"(infer.py runs the network so): infer.py {total_median / single_median:.2f}x that")
    return detector, meta, total, bare_ms


def search_figures(name, detector, meta, images, batch):
    """PatchCore post-processing (patch scores + re-weighted image score + maps) per image with
    each exact search over the same network outputs, and the share of distances computed."""
    outputs = [detector.features(images[lo:lo + batch]) for lo in range(0, len(images) - batch + 1, batch)]
    timings = {}
    for kind in ("brute", "grouped"):
        method = build_method(dict(meta["config"], nn_search=kind))
        scorer = Detector.for_method(method, detector.engine, detector.stats, detector.map_size)
        scorer.postprocess(outputs[0])  # builds the index
        index = method.nearest_index(detector.stats)
        index.computed = index.possible = 0
        t0 = time.perf_counter()
        for out in outputs:
            scorer.postprocess(out)
        timings[kind] = 1000 * (time.perf_counter() - t0) / (len(outputs) * batch)
        print(f"[{name} b{batch}] post-processing with the {kind} search: {timings[kind]:.1f} ms/img, "
              f"{index.distance_share():.1%} of the query x bank distances computed "
              f"(bank {len(detector.stats['memory_bank'])} rows)")
    print(f"[{name} b{batch}] grouped search: {timings['brute'] / timings['grouped']:.1f}x faster than brute force")


def method_figures(name, precision, tmp, args, paths, images, samples, floor, batches, runs):
    """Fit (at `precision`), export, and the figures of one method at each batch size, with the
    backend rows `runs` (backend_runs) beside them for the fp32 fit -> {batch: (infer.py ms/img,
    bare forward ms/img)}."""
    flags = method_flags(name, tmp, args.threads)
    run = os.path.join(tmp, f"{name}_{precision}")
    tag = name if precision == "fp32" else f"{name} {precision}"
    train.main(["--data_path", DATA, "--category", "bottle", *flags, "--backbone_weights", WEIGHTS, "--save_path", run,
                "--no_progress", "--cpu_threads", str(args.threads), "--precision", precision])
    deployed = os.path.join(run, "inference")
    runs = runs if precision == "fp32" else []
    onnx = ["--onnx"] if any(backend != "paddle" for backend, _ in runs) else []
    export_model.main([*flags, "--model_path", os.path.join(run, "bottle.pdparams"), "--save_dir", deployed, *onnx])
    figures = {}
    for batch in batches:
        detector, meta, total, bare = batch_figures(tag, deployed, paths, images, floor, batch, args.threads,
                                                    os.path.join(run, f"bench{batch}.log"))
        figures[batch] = total, bare
        if meta["config"]["method"] == "coreset":
            search_figures(tag, detector, meta, images, batch)
        if runs:
            backend_figures(tag, deployed, paths, images, batch, args.threads, runs)
        if batch == 1 and precision == "fp32":  # eager mode runs fp32 only
            eager_args = cli.parse(cli.parser_with(cli.add_model_args, cli.add_runtime_args),
                                   [*flags, "--model_path", run, "--engine", "eager"])
            _, eager, _ = evaluation.load_detector(eager_args, "bottle")
            # Eager scoring on tensors at the model's own input size (EfficientAD: 256).
            model_images = load_images(samples[:10], eager_args.resize, eager_args.crop_size)
            eager_ms = 1000 * time_per_image(eager.raw, model_images)
            print(f"[{tag}] eager predict (network + post-processing, no image loading): {eager_ms:.1f} "
                  f"ms/img = {eager_ms / total:.1f}x infer.py (anomalib in the same run: bench_vs_anomalib.py)")
    with open(os.path.join(run, f"bench{batches[-1]}.log")) as f:
        print(f"[{tag}] cpu_rss {json.loads(f.read().splitlines()[-1])['cpu_rss_mb']} MB")
    return figures


def print_precision_table(results, precisions, batches):
    """Side by side: per method and batch size, each precision's bare network and whole infer.py
    per image, and each one's speed-up over fp32 (the issue's targets on AMX-BF16: the network
    >= 2.5x and infer.py >= 2x at batch 8)."""
    header = ["method", "batch"] + [f"{p} {what}" for p in precisions for what in ("network ms", "infer.py ms")]
    header += [f"{p} speed-up (network / infer.py)" for p in precisions if p != "fp32"]
    rows = []
    for name in results[precisions[0]]:
        for batch in batches:
            row = [name, batch]
            for p in precisions:
                total, bare = results[p][name][batch]
                row += [f"{bare:.1f}", f"{total:.1f}"]
            base_total, base_bare = results[precisions[0]][name][batch]
            row += [f"{base_bare / results[p][name][batch][1]:.2f}x / {base_total / results[p][name][batch][0]:.2f}x"
                    for p in precisions if p != "fp32"]
            rows.append(row)
    print("\n" + format_table(header, rows))


def backend_runs(backends):
    """-> [(backend, precision)] to time: Paddle Inference fp32, OpenVINO fp32, and OpenVINO bf16
    where OpenVINO runs it natively (else a line saying why not)."""
    runs = [("paddle", "fp32")] if "paddle" in backends else []
    if "openvino" in backends:
        try:
            import openvino
        except ImportError:
            print("openvino not installed: no OpenVINO rows (pip install openvino)")
            return runs
        from deploy.openvino_engine import bf16_missing
        runs.append(("openvino", "fp32"))
        missing = bf16_missing(openvino.Core())
        if missing:
            print(f"OpenVINO bf16 not timed: {missing}")
        else:
            runs.append(("openvino", "bf16"))
    return runs


def backend_figures(name, deployed, paths, images, batch, threads, runs):
    """Each (backend, precision) of `runs` on the same exported model, alternated batch by batch
    (a drift of the loaded machine's speed then falls on every row alike): the network alone on
    the batch, and infer.py's stages (predict_batch: preprocess, network image by image, scoring).
    Medians after the warm-up batches; raw scores against the first run's."""
    detectors = {}
    for backend, precision in runs:
        detectors[backend, precision], meta = load_deployed(*resolve_files(deployed), backend=backend,
                                                             precision=precision, cpu_threads=threads)
    warm = 2 if batch == 1 else 1
    timers = {run: StageTimer(warmup=warm) for run in detectors}
    alone = {run: [] for run in detectors}
    scores = {run: [] for run in detectors}
    for lo in range(0, len(paths) - batch + 1, batch):
        for run, detector in detectors.items():
            _, _, preds = infer.predict_batch(detector, meta["config"], paths[lo:lo + batch], timers[run],
                                              UnreadableImages())
            scores[run] += [p["raw_score"] for p in preds]
            t0 = time.perf_counter()
            detector.engine(images[lo:lo + batch])
            alone[run].append(1000 * (time.perf_counter() - t0) / batch)
    tag, first = f"[{name} b{batch}]", runs[0]
    rows, split = [], {}
    def median(values):  # after the warm-up batches, unless there are no others
        return float(np.median(values[warm:] or values))

    for run in detectors:
        stage = {s: median(timers[run].times[s]) for s in timers[run].times}
        network, whole = median(alone[run]), sum(stage.values())
        split[run] = (stage, network)
        diff = np.max(np.abs(np.subtract(scores[run], scores[first])) / np.abs(scores[first]))
        rows.append([*run, f"{network:.1f}", f"{stage['preprocess']:.1f}", f"{stage['inference']:.1f}",
                     f"{stage['postprocess']:.1f}", f"{whole:.1f}", f"{whole / network:.2f}x", f"{diff:.1e}"])
    print(f"\n{tag} {len(scores[first])} bottle images, {threads} threads, ms/img, medians; network alone = the "
          f"engine on batches of {batch}; infer.py runs it image by image, then scores the batch")
    print(format_table(["backend", "precision", "network alone", "preprocess", "network", "scoring", "whole",
                        "whole/network alone", f"max rel diff of raw scores vs {' '.join(first)}"], rows))
    stage, network = split[first]
    speedup = BF16_SPEEDUP.get(batch, BF16_SPEEDUP[8])
    fast = network / speedup
    whole = stage["preprocess"] + fast + stage["postprocess"]
    print(f"{tag} PROJECTION, not measured: a network {speedup}x faster than {' '.join(first)} here (Paddle bf16 "
          f"on AMX, issue #20) = {fast:.1f} ms/img; with this run's preprocess {stage['preprocess']:.1f} "
          f"and scoring {stage['postprocess']:.1f}: whole {whole:.1f} ms/img = {whole / fast:.2f}x the network "
          f"(network + scoring {(fast + stage['postprocess']) / fast:.2f}x; target at batch 8 <= 1.4x)")


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--methods", default="ortho,coreset,coreset10", help=f"comma list of {', '.join(METHOD_FLAGS)}")
    parser.add_argument("--batch_size", default="1,8", help="comma list of batch sizes")
    parser.add_argument("--precision", default="fp32",
                        help="comma list of fp32, bf16, int8: each one this CPU runs natively is fitted, deployed "
                             "and timed (the others are skipped with a line saying what the CPU lacks)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--images", type=int, default=40, help="bottle test images timed")
    parser.add_argument("--backends", default="paddle,openvino",
                        help="comma list: paddle, openvino (timed side by side on the same exported model)")
    args = parser.parse_args()
    require_shared()
    print(cpu_header())
    precisions = precisions_to_run(args.precision)
    if not precisions:
        return
    runs = backend_runs(args.backends.split(","))
    batches = [int(b) for b in args.batch_size.split(",")]
    samples = test_samples(DATA, "bottle")[: args.images]
    paths = [s.image_path for s in samples]
    images = load_images(samples)
    # int8: the bare network quantised like a fit's, on the first training images
    calibration = load_images(train_samples(DATA, "bottle")[:CALIBRATION_IMAGES]) if "int8" in precisions else None
    floors = {p: make_engine(bare_backbone(), (3, 224, 224), cpu_threads=args.threads, enable_mkldnn=True, precision=p,
                             calibration=calibration if p == "int8" else None)
              for p in precisions}
    results = {p: {} for p in precisions}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.methods.split(","):
            for p in precisions:  # the precisions of one method back to back: one machine state
                results[p][name] = method_figures(name, p, tmp, args, paths, images, samples, floors[p], batches,
                                                  runs)
    if len(precisions) > 1:
        print_precision_table(results, precisions, batches)


if __name__ == "__main__":
    main()
