"""Load an exported model (see deploy/export.py for its files) and run it.

infer.py and the service need only the exported files: the feature network runs on Paddle
Inference (or ONNX Runtime, or OpenVINO: deploy/openvino_engine.py), the post-processing is the
same module predict.py uses (models/postprocess.py).
"""
import json
import os

import numpy as np

from datasets.transforms import Preprocess
from models import build_method
from models.backbone import InferenceEngine, model_file_for
from models.parallel import set_cpu_threads
from models.postprocess import Detector
from models.precision import INT8_NEEDS_FIT, for_model, recorded
from models.quantize import INT8_NO_ONNX
from utils import UserError

STATS_FILE = "stats.npz"
DEPLOY_FORMAT = "paddle-anomaly-deploy/1"
BACKENDS = ("paddle", "onnxruntime", "openvino")  # infer.py --backend


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


def exported_version(meta):
    """The model version an export records (models/version.py); None for exports made before
    versions existed."""
    return (meta.get("version") or {}).get("id")


class OnnxEngine:
    def __init__(self, onnx_path, cpu_threads=None):
        try:
            import onnxruntime as ort
        except ImportError:
            raise UserError("--backend onnxruntime needs onnxruntime (pip install onnxruntime)") from None
        opts = ort.SessionOptions()
        if cpu_threads:
            opts.intra_op_num_threads = cpu_threads
        self.session = ort.InferenceSession(onnx_path, opts, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name

    def __call__(self, images):
        return self.session.run(None, {self.input_name: np.ascontiguousarray(images, np.float32)})


def onnx_engine(backend, onnx_path, cpu_threads=None, precision="fp32", use_gpu=False, **_paddle_only):
    """The engine of an ONNX backend over the exported model.onnx (`_paddle_only`: the Paddle
    Inference flags, mkldnn and ir_optim, which these runtimes do not have)."""
    if not os.path.isfile(onnx_path):
        raise UserError(f"ONNX model not found: {onnx_path} (export with --onnx; --backend {backend} reads it)")
    if use_gpu:
        raise UserError(f"--backend {backend} runs on the CPU here; --use_gpu needs --backend paddle")
    if backend == "openvino":
        from deploy.openvino_engine import OpenVinoEngine  # openvino is imported only when asked for
        return OpenVinoEngine(onnx_path, cpu_threads, precision)
    return OnnxEngine(onnx_path, cpu_threads)


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


def check_int8_export(exported, chosen, backend, use_gpu, own):
    """An int8 export holds only the quantised graph, run by oneDNN's int8 kernels on Paddle
    Inference; any other export holds the float graph, which has no int8 calibration."""
    if chosen == "int8" and (backend != "paddle" or use_gpu):
        raise UserError(INT8_NO_ONNX if backend != "paddle" else
                        "an int8 export runs on the CPU (oneDNN int8); --use_gpu runs fp32 exports")
    if exported == "int8" and chosen != "int8":
        raise UserError(f"this export holds the int8 graph only; to run at {chosen}, export the model again with "
                        f"export_model.py --precision {chosen}")
    if exported != "int8" and chosen == "int8":
        if own != "int8":
            raise UserError(INT8_NEEDS_FIT.format(own=own))
        raise UserError(f"this export holds the {exported or 'fp32'} graph, with no int8 calibration: export an int8 "
                        f"model with export_model.py --precision int8")


def load_deployed(model_file, params_file, stats_path, backend="paddle", **config_kwargs):
    """-> (Detector, meta). Checks that the graph's output matches the statistics."""
    meta, stats = load_stats(stats_path)
    set_cpu_threads(config_kwargs.get("cpu_threads"))  # scoring follows --cpu_threads too
    cfg = meta["config"]
    if backend not in BACKENDS:
        raise UserError(f"unknown --backend {backend}; choose {', '.join(BACKENDS)}")
    # By default the precision export_model.py recorded (the model's own unless exported with --precision).
    # Paddle Inference's precision is checked against this CPU here; the ONNX runtimes check theirs.
    requested, use_gpu = config_kwargs.get("precision"), config_kwargs.get("use_gpu", False)
    if requested != "auto":  # before for_model's override note: the refusal is the one line
        check_int8_export(meta.get("precision"), requested or meta.get("precision") or "fp32", backend, use_gpu,
                          recorded(cfg))
    chosen = for_model(config_kwargs.get("precision"), cfg, config_kwargs.get("use_gpu", False),
                       runs_here=backend == "paddle", default=meta.get("precision"))
    check_int8_export(meta.get("precision"), chosen, backend, use_gpu, recorded(cfg))
    config_kwargs = dict(config_kwargs, precision=chosen)
    meta["precision"] = config_kwargs["precision"]  # what it runs at
    if backend == "onnxruntime" and config_kwargs["precision"] != "fp32":
        raise UserError(f"--backend {backend} runs fp32 here; --precision {config_kwargs['precision']} runs on "
                        f"--backend paddle")
    if backend == "paddle":
        engine = InferenceEngine(model_file, params_file, **config_kwargs)
    else:
        engine = onnx_engine(backend, os.path.join(os.path.dirname(model_file), "model.onnx"), **config_kwargs)
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
