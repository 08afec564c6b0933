"""Export a trained model to a static graph + one stats file.

    <save_dir>/model.json | model.pdmodel   static feature network (Paddle 3 PIR | Paddle 2, or the
                                            quantised old-IR graph of an int8 export)
    <save_dir>/model.pdiparams              its weights
    <save_dir>/stats.npz                    statistics, thresholds, preprocessing and method config
    <save_dir>/model.onnx                   with --onnx (paddle2onnx)
"""
import contextlib
import json
import os
import shutil

import numpy as np

from datasets.transforms import Preprocess
from deploy.predictor import DEPLOY_FORMAT, STATS_FILE
from models import build_method, check_model_matches, load_model
from models.backbone import save_static
from models.precision import check as check_precision, for_model
from models.quantize import INT8_NO_ONNX, write_graph
from models.version import version_of
from utils import UserError, atomic_dir, atomic_path


def export_model(model_path, save_dir, onnx=False, expect=None, opset=11, precision=None):
    """Write the export into a folder beside `save_dir` and swap it in once complete
    (utils.atomic_dir): the service's watcher and reloads never see half an export, and the
    previous export serves until the new one is whole. `precision`: the one infer.py and the
    service run it at by default (None: the model's own; the deployment machine's CPU is checked
    when it loads the export, not this one's)."""
    state = load_model(model_path)
    if expect:
        check_model_matches(state, expect, model_path)
    if not state.get("calibration"):
        raise UserError(f"{model_path} has no calibrated thresholds; run train.py or eval.py first")
    check_replaceable(save_dir)
    cfg = state["config"]
    run_precision = for_model(precision, cfg, runs_here=False)
    if run_precision == "fp16":
        check_precision(run_precision)  # the one-line refusal: no CPU runs these exports
    if run_precision == "int8" and onnx:
        raise UserError(INT8_NO_ONNX)
    method = build_method(cfg)
    shape = Preprocess.from_config(cfg).input_shape
    meta = {"format": DEPLOY_FORMAT, "config": cfg, "calibration": state["calibration"],
            "category": state.get("category"), "input_shape": list(shape),
            "stats_keys": sorted(state["stats"]), "version": version_of(state),
            "precision": run_precision}
    arrays = {f"stats/{k}": np.asarray(v) for k, v in state["stats"].items()}
    with atomic_dir(save_dir) as tmp:
        net = method.feature_net(state)
        if run_precision == "int8":  # the quantised graph the model was fitted on (old IR: model.pdmodel)
            model_file = write_graph(net.int8_graph, tmp)[0]
        else:
            model_file = save_static(net, os.path.join(tmp, "model"), shape)
        with open(os.path.join(tmp, STATS_FILE), "wb") as f:
            np.savez(f, meta=np.frombuffer(json.dumps(meta).encode(), np.uint8), **arrays)
        written = [model_file, os.path.join(tmp, "model.pdiparams"), os.path.join(tmp, STATS_FILE)]
        if onnx:
            written.append(export_onnx(model_file, os.path.join(tmp, "model.pdiparams"),
                                       os.path.join(tmp, "model.onnx"), opset))
    return [os.path.join(save_dir, os.path.basename(f)) for f in written]


def publish_export(export_dir, save_dir):
    """Copy a finished export into the folder a service serves, swapped in whole like a new
    export (a rollback to an earlier export, two versions taking turns in a benchmark)."""
    check_replaceable(save_dir)
    with atomic_dir(save_dir) as tmp:
        for name in os.listdir(export_dir):
            shutil.copy2(os.path.join(export_dir, name), tmp)


def check_replaceable(save_dir):
    """The export replaces the whole folder: refuse one that holds anything but an export's files."""
    if not os.path.isdir(save_dir):
        if os.path.lexists(save_dir):
            raise UserError(f"--save_dir {save_dir} is not a folder")
        return
    others = sorted(n for n in os.listdir(save_dir) if not (n == STATS_FILE or n.startswith("model.")))
    if others:
        raise UserError(f"--save_dir {save_dir} holds other files than an export ({', '.join(others[:3])}"
                        f"{', ...' if len(others) > 3 else ''}), which the export would replace; "
                        f"give a new or empty folder")


def export_onnx(model_file, params_file, onnx_path, opset):
    try:
        import paddle2onnx
    except ImportError:
        raise UserError("--onnx needs paddle2onnx (pip install paddle2onnx onnxruntime)") from None
    with atomic_path(onnx_path) as tmp, no_polygraphy_autoinstall():
        paddle2onnx.export(model_file, params_file, tmp, opset_version=opset, enable_onnx_checker=True)
    return onnx_path


@contextlib.contextmanager
def no_polygraphy_autoinstall():
    """An export installs nothing. paddle2onnx (2.1, convert.py) sets POLYGRAPHY_AUTOINSTALL_DEPS=1
    before its constant folding with Polygraphy, which then pip-installs whatever module it misses
    (onnx_graphsurgeon, sympy...) or finds too old: on an air-gapped PC a failed pip call in the
    middle of an export, elsewhere a changed environment. Polygraphy reads the switch from its
    config module, imported here first with the switch off and held off for the call; the
    variable is restored after. A missing module then makes paddle2onnx skip the folding (the
    model is still valid); requirements.txt lists what the folding needs."""
    key = "POLYGRAPHY_AUTOINSTALL_DEPS"
    before = os.environ.get(key)
    os.environ[key] = "0"
    try:
        from polygraphy import config as polygraphy_config
    except ImportError:  # no Polygraphy: paddle2onnx skips the folding, nothing to install
        polygraphy_config = None
    saved = getattr(polygraphy_config, "AUTOINSTALL_DEPS", None)
    try:
        if polygraphy_config is not None:
            polygraphy_config.AUTOINSTALL_DEPS = False
        yield
    finally:
        if polygraphy_config is not None:
            polygraphy_config.AUTOINSTALL_DEPS = saved
        if before is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = before
