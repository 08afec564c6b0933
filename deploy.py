"""Deployment: export a trained model to a static graph + one stats file, and run it.

    <save_dir>/model.json | model.pdmodel   static feature network (Paddle 3 PIR | Paddle 2)
    <save_dir>/model.pdiparams              its weights
    <save_dir>/stats.npz                    statistics, thresholds, preprocessing and method config
    <save_dir>/model.onnx                   with --onnx (paddle2onnx)

infer.py needs only these files: the feature network runs on Paddle Inference (or ONNX
Runtime), the post-processing is the same module predict.py uses (models/postprocess.py).
"""
import json
import os
import platform
import time

import numpy as np

from datasets.transforms import Preprocess
from models import build_method, check_model_matches, load_model
from models.backbone import InferenceEngine, model_file_for, save_static
from models.parallel import set_cpu_threads
from models.postprocess import Detector
from utils import UserError, atomic_path, current_rss_mb, peak_rss_mb

STATS_FILE = "stats.npz"
DEPLOY_FORMAT = "paddle-anomaly-deploy/1"


# ---------------------------------------------------------------- export
def export_model(model_path, save_dir, onnx=False, expect=None, opset=11):
    state = load_model(model_path)
    if expect:
        check_model_matches(state, expect, model_path)
    if not state.get("calibration"):
        raise UserError(f"{model_path} has no calibrated thresholds; run train.py or eval.py first")
    cfg = state["config"]
    method = build_method(cfg)
    os.makedirs(save_dir, exist_ok=True)
    shape = Preprocess.from_config(cfg).input_shape
    model_file = save_static(method.feature_net(state), os.path.join(save_dir, "model"), shape)
    meta = {"format": DEPLOY_FORMAT, "config": cfg, "calibration": state["calibration"],
            "category": state.get("category"), "input_shape": list(shape),
            "stats_keys": sorted(state["stats"])}
    arrays = {f"stats/{k}": np.asarray(v) for k, v in state["stats"].items()}
    with atomic_path(os.path.join(save_dir, STATS_FILE)) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, meta=np.frombuffer(json.dumps(meta).encode(), np.uint8), **arrays)
    files = [model_file, os.path.join(save_dir, "model.pdiparams"), os.path.join(save_dir, STATS_FILE)]
    if onnx:
        files.append(export_onnx(model_file, os.path.join(save_dir, "model.pdiparams"),
                                 os.path.join(save_dir, "model.onnx"), opset))
    return files


def export_onnx(model_file, params_file, onnx_path, opset):
    try:
        import paddle2onnx
    except ImportError:
        raise UserError("--onnx needs paddle2onnx (pip install paddle2onnx onnxruntime)") from None
    with atomic_path(onnx_path) as tmp:
        paddle2onnx.export(model_file, params_file, tmp, opset_version=opset, enable_onnx_checker=True)
    return onnx_path


# ---------------------------------------------------------------- load
def load_stats(path):
    if not os.path.isfile(path):
        raise UserError(f"stats file not found: {path} (written by export_model.py)")
    try:
        with np.load(path, allow_pickle=False) as z:
            meta = json.loads(bytes(z["meta"]).decode())
            stats = {k[len("stats/"):]: z[k] for k in z.files if k.startswith("stats/")}
    except (KeyError, ValueError, OSError) as err:
        raise UserError(f"cannot read stats file {path}: {err}") from None
    if meta.get("format") != DEPLOY_FORMAT:
        raise UserError(f"{path} is not a stats file written by export_model.py")
    return meta, stats


class OnnxEngine:
    def __init__(self, onnx_path, cpu_threads=None):
        try:
            import onnxruntime as ort
        except ImportError:
            raise UserError("--backend onnxruntime needs onnxruntime (pip install onnxruntime)") from None
        if not os.path.isfile(onnx_path):
            raise UserError(f"ONNX model not found: {onnx_path} (export with --onnx)")
        opts = ort.SessionOptions()
        if cpu_threads:
            opts.intra_op_num_threads = cpu_threads
        self.session = ort.InferenceSession(onnx_path, opts, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name

    def __call__(self, images):
        return self.session.run(None, {self.input_name: np.ascontiguousarray(images, np.float32)})


def resolve_files(model_dir=None, model_file=None, params_file=None, stats=None):
    """--model_dir, or the reproduction-style --model_file/--params_file/--stats."""
    if model_dir:
        if not os.path.isdir(model_dir):
            raise UserError(f"model dir not found: {model_dir}")
        model_file = model_file or model_file_for(os.path.join(model_dir, "model"))
        params_file = params_file or os.path.join(model_dir, "model.pdiparams")
        stats = stats or os.path.join(model_dir, STATS_FILE)
    if not (model_file and params_file and stats):
        raise UserError("give --model_dir, or all of --model_file --params_file --stats")
    for path, what in ((model_file, "model file"), (params_file, "params file")):
        if not os.path.isfile(path):
            raise UserError(f"{what} not found: {path}")
    return model_file, params_file, stats


def load_deployed(model_file, params_file, stats_path, backend="paddle", **config_kwargs):
    """-> (Detector, meta). Checks that the graph's output matches the statistics."""
    meta, stats = load_stats(stats_path)
    set_cpu_threads(config_kwargs.get("cpu_threads"))  # scoring follows --cpu_threads too
    cfg = meta["config"]
    if backend == "paddle":
        engine = InferenceEngine(model_file, params_file, **config_kwargs)
    elif backend == "onnxruntime":
        engine = OnnxEngine(os.path.join(os.path.dirname(model_file), "model.onnx"), config_kwargs.get("cpu_threads"))
    else:
        raise UserError(f"unknown --backend {backend}; choose paddle or onnxruntime")
    method = build_method(cfg)
    preprocess = Preprocess.from_config(cfg)
    detector = Detector.for_method(method, engine, stats, preprocess.map_size, meta["calibration"],
                                   tiles=preprocess.tiles)
    if config_kwargs.get("use_gpu"):
        detector.engine_chunk = 0  # a GPU runs a whole batch in one call: batching is what it is for
    probe = np.zeros((1, 3, *preprocess.map_size), np.float32)  # one whole image: all its tiles when tiled
    try:
        outputs = detector.engine(probe)
    except RuntimeError as err:
        raise UserError(f"the model {model_file} does not run on the input shape {meta['input_shape']} that "
                        f"{stats_path} records (stats exported from another model?): "
                        f"{str(err).strip().splitlines()[-1]}") from None
    try:
        detector.postprocess(outputs)
    except (ValueError, IndexError) as err:
        raise UserError(f"stats {stats_path} do not fit the model {model_file} "
                        f"(exported from another model?): {err}") from None
    return detector, meta


# ---------------------------------------------------------------- benchmark report
class StageTimer:
    """Per-stage wall time in ms; the first `warmup` records of each stage are dropped."""

    def __init__(self, warmup=1):
        self.warmup = warmup
        self.times = {"preprocess": [], "inference": [], "postprocess": []}

    def add(self, stage, seconds, images=1):
        self.times[stage].append(1000.0 * seconds / images)

    def mean_ms(self, stage):
        t = self.times[stage]
        t = t[self.warmup:] if len(t) > self.warmup else t
        return float(np.mean(t)) if t else 0.0


def benchmark_report(timer, *, model_name, batch_size, input_shape, data_count, use_gpu, ir_optim,
                     enable_mkldnn, cpu_threads, precision, backend):
    """The fields of PaddleOCR/PaddleClas AutoLog reports (auto_log is not on PyPI)."""
    import paddle
    report = {
        "runtime_device": "gpu" if use_gpu else "cpu",
        "backend": backend,
        "paddle_version": paddle.__version__,
        "cpu_model": platform.processor() or platform.machine(),
        "ir_optim": bool(ir_optim), "enable_mkldnn": bool(enable_mkldnn and not use_gpu),
        "cpu_math_library_num_threads": cpu_threads, "precision": precision,
        "model_name": model_name, "batch_size": batch_size, "input_shape": list(input_shape),
        "data_num": data_count,
        "cpu_rss_mb": round(current_rss_mb(), 1), "cpu_peak_rss_mb": round(peak_rss_mb(), 1),
        "preprocess_time_ms": round(timer.mean_ms("preprocess"), 3),
        "inference_time_ms": round(timer.mean_ms("inference"), 3),
        "postprocess_time_ms": round(timer.mean_ms("postprocess"), 3),
    }
    report["total_time_ms"] = round(report["preprocess_time_ms"] + report["inference_time_ms"]
                                    + report["postprocess_time_ms"], 3)
    if use_gpu:
        report.update(gpu_stats())
    return report


def gpu_stats():
    import subprocess
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used,utilization.gpu",
                              "--format=csv,noheader,nounits"], capture_output=True, text=True, timeout=10).stdout
        mem, util = out.strip().splitlines()[0].split(",")
        return {"gpu_rss_mb": float(mem), "gpu_util": float(util)}
    except (OSError, ValueError, IndexError, subprocess.SubprocessError):
        return {"gpu_rss_mb": None, "gpu_util": None}


def format_report(report):
    lines = ["----------------------- benchmark -----------------------",
             f"runtime device: {report['runtime_device']}  backend: {report['backend']}  "
             f"paddle: {report['paddle_version']}",
             f"ir_optim: {report['ir_optim']}  enable_mkldnn: {report['enable_mkldnn']}  "
             f"cpu_threads: {report['cpu_math_library_num_threads']}  precision: {report['precision']}",
             f"model: {report['model_name']}  batch_size: {report['batch_size']}  "
             f"input_shape: {report['input_shape']}  data_num: {report['data_num']}",
             f"cpu_rss(MB): {report['cpu_rss_mb']}  peak: {report['cpu_peak_rss_mb']}"
             + (f"  gpu_rss(MB): {report.get('gpu_rss_mb')}  gpu_util: {report.get('gpu_util')}"
                if report["runtime_device"] == "gpu" else ""),
             f"preprocess_time(ms): {report['preprocess_time_ms']}  inference_time(ms): "
             f"{report['inference_time_ms']}  postprocess_time(ms): {report['postprocess_time_ms']}  "
             f"total(ms/img): {report['total_time_ms']}"]
    return "\n".join(lines)


def now():
    return time.perf_counter()
