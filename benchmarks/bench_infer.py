"""Deployment latency: infer.py (Paddle Inference + oneDNN, batch 1) per image, split into
preprocess / inference / postprocess, beside the bare R18 layer1-3 forward under the same
config and beside eager predict.py, measured in one run. Prints figures; asserts nothing.

    python benchmarks/bench_infer.py [--methods ortho,coreset] [--threads 2] [--images 40]
"""
import argparse
import json
import os
import tempfile
import time

import numpy as np

from common import DATA, WEIGHTS, bare_backbone, load_images, require_shared, time_per_image

import engine  # noqa: E402
import export_model  # noqa: E402
import infer  # noqa: E402
import train  # noqa: E402
from datasets import test_samples  # noqa: E402
from deploy import StageTimer, load_deployed, resolve_files  # noqa: E402
from models.backbone import make_engine  # noqa: E402

METHOD_FLAGS = {
    "ortho": ["--method", "ortho", "--k", "100"],
    "sample": ["--method", "sample", "--k", "100"],
    "coreset": ["--method", "coreset", "--coreset_ratio", "0.01"],
    # Latency does not depend on how far the networks are trained: a teacher distilled for a
    # few steps on the bottle train images and a short student run stand in for the real ones.
    "efficientad": ["--method", "efficientad", "--train_steps", "20"],
}
DISTILL_STEPS = 20


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


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--methods", default="ortho", help=f"comma list of {', '.join(METHOD_FLAGS)}")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--images", type=int, default=40, help="bottle test images timed")
    args = parser.parse_args()
    require_shared()
    samples = test_samples(DATA, "bottle")[: args.images]
    paths = [s.image_path for s in samples]
    images = load_images(samples)
    floor = make_engine(bare_backbone(), (3, 224, 224), cpu_threads=args.threads, enable_mkldnn=True)
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.methods.split(","):
            flags = method_flags(name, tmp, args.threads)
            run = os.path.join(tmp, name)
            train.main(["--data_path", DATA, "--category", "bottle", *flags, "--backbone_weights", WEIGHTS,
                        "--save_path", run, "--no_progress", "--cpu_threads", str(args.threads)])
            deployed = os.path.join(run, "inference")
            export_model.main([*flags, "--model_path", os.path.join(run, "bottle.pdparams"), "--save_dir", deployed])
            log = os.path.join(run, "bench.log")
            # The floor is timed right before and right after infer.py and averaged, so a drift
            # of the machine's speed during the run does not land on one side of the ratio.
            before_ms = 1000 * time_per_image(floor, images)
            infer.main(["--model_dir", deployed, "--input_file", *paths, "--cpu_threads", str(args.threads),
                        "--enable_mkldnn", "True", "--enable_benchmark", "True", "--warmup", "2",
                        "--save_path", os.path.join(run, "infer"), "--save_log_path", log])
            bare_ms = (before_ms + 1000 * time_per_image(floor, images)) / 2
            report = json.loads(open(log).read().splitlines()[-1])
            eager_args = engine.parse(engine.parser_with(engine.add_model_args, engine.add_runtime_args),
                                      [*flags, "--model_path", run, "--engine", "eager"])
            _, eager, _ = engine.load_detector(eager_args, "bottle")
            # Eager scoring on tensors at the model's own input size (EfficientAD: 256).
            model_images = load_images(samples[:10], eager_args.resize, eager_args.crop_size)
            eager_ms = 1000 * time_per_image(eager.raw, model_images)
            total = report["total_time_ms"]
            print(f"\n[{name}] bare R18 layer1-3 forward, Paddle Inference + oneDNN, {args.threads} threads, batch 1: "
                  f"{bare_ms:.1f} ms/img (before {before_ms:.1f}, after {2 * bare_ms - before_ms:.1f})")
            print(f"[{name}] infer.py per image: preprocess {report['preprocess_time_ms']:.1f} + inference "
                  f"{report['inference_time_ms']:.1f} + postprocess {report['postprocess_time_ms']:.1f} = {total:.1f} ms")
            network_post = report["inference_time_ms"] + report["postprocess_time_ms"]
            print(f"[{name}] infer.py / bare forward: {total / bare_ms:.2f}x (inference only: "
                  f"{report['inference_time_ms'] / bare_ms:.2f}x, inference + postprocess: {network_post / bare_ms:.2f}x, "
                  f"preprocess = image decoding + crop + normalise: {report['preprocess_time_ms'] / bare_ms:.2f}x); "
                  f"target for ortho k=100: <= 1.15x")
            # Drift-proof ratio: infer.py's own per-image stages (predict_batch) and the bare
            # forward alternate image by image on the same deployed files; medians.
            detector, meta = load_deployed(*resolve_files(deployed), cpu_threads=args.threads, enable_mkldnn=True)
            timer, bare_times = StageTimer(warmup=2), []
            for path, image in zip(paths, images):
                infer.predict_batch(detector, meta["config"], [path], timer)
                t0 = time.perf_counter()
                floor(image[None])
                bare_times.append(1000 * (time.perf_counter() - t0))
            stages = {stage: float(np.median(timer.times[stage][2:])) for stage in timer.times}
            bare_median = float(np.median(bare_times[2:]))
            print(f"[{name}] interleaved with the bare forward, medians: preprocess {stages['preprocess']:.1f} + "
                  f"inference {stages['inference']:.1f} + postprocess {stages['postprocess']:.1f} = "
                  f"{sum(stages.values()):.1f} ms vs bare {bare_median:.1f} ms: {sum(stages.values()) / bare_median:.2f}x "
                  f"(inference + postprocess {(stages['inference'] + stages['postprocess']) / bare_median:.2f}x)")
            print(f"[{name}] eager predict (network + post-processing, no image loading): {eager_ms:.1f} ms/img = "
                  f"{eager_ms / total:.1f}x infer.py;  anomalib here: PaDiM 58 ms/img, PatchCore 138 ms/img")
            print(f"[{name}] cpu_rss {report['cpu_rss_mb']} MB")


if __name__ == "__main__":
    main()
