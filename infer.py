"""Deployment inference with Paddle Inference (or ONNX Runtime, or OpenVINO) on an exported model.

    python infer.py --model_dir inference/bottle --input_file IMAGE_OR_FOLDER \
        --enable_mkldnn True --cpu_threads 2 --enable_benchmark True --save_path output/infer

Prints a JSON line per image (pred_score, pred_label, output files), writes the anomaly map,
predicted mask (and overlay with --save_pic), and with --enable_benchmark an AutoLog-style report.
A file that cannot be read is named on one line and skipped; the others are scored, and the exit
code is then 3 (datasets/unreadable.py).
"""
import argparse
import json
import os

import numpy as np

from report import add_review_args, review_page, visualize
from datasets.transforms import Preprocess, list_input_images
from datasets.unreadable import UnreadableImages
from deploy.predictor import BACKENDS, exported_version, load_deployed, resolve_files
from deploy.timing import StageTimer, benchmark_report, format_report, now
from utils import (UserError, add_inference_args, append_line, inference_config, run_cli, str2bool,
                   write_text_atomic)


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model_dir", default=None, help="folder written by export_model.py")
    p.add_argument("--model_file", default=None, help="model.json / model.pdmodel (instead of --model_dir)")
    p.add_argument("--params_file", default=None, help="model.pdiparams (instead of --model_dir)")
    p.add_argument("--stats", default=None, help="stats.npz (instead of --model_dir)")
    p.add_argument("--category", default=None, help="with --model_dir: use <model_dir>/<category> if it exists")
    p.add_argument("--input_file", required=True, nargs="+", help="image files or folders")
    p.add_argument("--batch_size", type=int, default=1)
    p.add_argument("--backend", default="paddle", choices=BACKENDS,
                   help="what runs the feature network; onnxruntime and openvino read model.onnx (export --onnx)")
    add_inference_args(p)
    p.add_argument("--enable_benchmark", type=str2bool, default=False)
    p.add_argument("--warmup", type=int, default=1, help="batches left out of the benchmark means")
    p.add_argument("--save_path", default="output/infer", help="output folder")
    p.add_argument("--save_log_path", default=None, help="benchmark log (default <save_path>/benchmark.log)")
    p.add_argument("--save_pic", type=str2bool, default=False, help="also write overlay figures")
    p.add_argument("--overwrite", action="store_true", help="replace earlier outputs of the same images")
    add_review_args(p, "<save_path>")
    return p


def predict_batch(detector, cfg, paths, timer, unreadable):
    """Image files -> (the readable ones, their [(chw, rgb)], uniform predictions); the others go
    to `unreadable`; the three stages' wall times go to `timer`."""
    t0 = now()
    preprocess = Preprocess.from_config(cfg)
    loaded = [(p, unreadable.load(preprocess, p)) for p in paths]
    paths = [p for p, image in loaded if image is not None]
    loaded = [image for _, image in loaded if image is not None]
    if not loaded:
        return [], [], []
    images = np.stack([chw for chw, _ in loaded])
    t1 = now()
    outputs = detector.features(images)
    t2 = now()
    scores, maps = detector.postprocess(outputs)
    preds = detector.calibrated(scores, maps)
    t3 = now()
    for stage, seconds in (("preprocess", t1 - t0), ("inference", t2 - t1), ("postprocess", t3 - t2)):
        timer.add(stage, seconds, len(paths))
    return paths, loaded, preds


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.batch_size < 1:
        raise UserError("--batch_size must be at least 1")
    model_dir = args.model_dir
    if model_dir and args.category and os.path.isdir(os.path.join(model_dir, args.category)):
        model_dir = os.path.join(model_dir, args.category)
    files = resolve_files(model_dir, args.model_file, args.params_file, args.stats)
    detector, meta = load_deployed(*files, backend=args.backend, **inference_config(args))
    cfg = meta["config"]
    paths = list_input_images(args.input_file)
    stems = visualize.output_stems(paths)
    timer = StageTimer(warmup=args.warmup)
    records = []
    category = meta.get("category") or args.category or "model"
    unreadable = UnreadableImages()
    with review_page(args.save_path, args.report, args.overwrite, ", ".join(args.input_file)) as page:
        for lo in range(0, len(paths), args.batch_size):
            batch, loaded, preds = predict_batch(detector, cfg, paths[lo:lo + args.batch_size], timer, unreadable)
            for path, (_, rgb), pred in zip(batch, loaded, preds):
                records.append(visualize.write_prediction(args.save_path, path, stems[path], rgb, pred,
                                                          args.save_pic, args.overwrite,
                                                          exported_version(meta)))
                if page:
                    page.add_prediction(category, path, stems[path], rgb, pred, cfg, meta.get("version"))
        if page:
            page.finish()
    write_text_atomic(os.path.join(args.save_path, "infer_results.jsonl"),
                      "".join(json.dumps(r) + "\n" for r in records))
    if args.enable_benchmark:
        report = benchmark_report(timer, model_name=f"{cfg['method']}_{cfg['arch']}", batch_size=args.batch_size,
                                  input_shape=meta["input_shape"], data_count=len(records), use_gpu=args.use_gpu,
                                  ir_optim=args.ir_optim, enable_mkldnn=args.enable_mkldnn,
                                  cpu_threads=args.cpu_threads, precision=meta["precision"], backend=args.backend)
        print(format_report(report))
        append_line(args.save_log_path or os.path.join(args.save_path, "benchmark.log"), json.dumps(report))
    return unreadable.exit_code(len(paths))


if __name__ == "__main__":
    run_cli(main)
