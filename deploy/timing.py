"""Per-stage timing and the AutoLog-style benchmark report of infer.py --benchmark."""
import platform
import time

import numpy as np

from utils import current_rss_mb, peak_rss_mb


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
