"""Model zoo: one module per method sharing one interface.

    method = build_method(config)
    state, engine = method.fit(batches, engine_kwargs, weights_path)   # statistics / memory bank
    net = method.feature_net(state)                                   # static-graph part (export)
    patch_scores = method.score(outputs, state["stats"])              # pure numpy (deployment too)
    image_scores = method.image_score(outputs, patch_scores, state["stats"])  # optional; default: map max
"""
import os

# Paddle's oneDNN kernels run on Intel OpenMP, whose worker threads spin for 200 ms after each
# parallel region by default (KMP_BLOCKTIME). After a forward that spin holds a core while the
# numpy/numba scoring needs it: OrthoAD k=100 scoring took 4.7 ms instead of 3.0 ms after each
# image. 1 ms still bridges the gaps between the ops of one forward. It must be set before
# Paddle starts OpenMP (importing this package is the first thing every entry point does that
# loads Paddle); a value the user set wins.
os.environ.setdefault("KMP_BLOCKTIME", "1")

import numpy as np  # noqa: E402

# utils before the method modules: it silences Paddle's import-time "No ccache found" warning,
# which must be in place before their `import paddle` runs.
from utils import UserError, atomic_path, load_pdparams  # noqa: E402
from models.efficientad import EfficientAD  # noqa: E402
from models.padim import PROJECTIONS, PaDiM  # noqa: E402
from models.patchcore import PatchCore  # noqa: E402
from models.version import stamp_version, version_of  # noqa: E402

MODEL_FORMAT = "paddle-anomaly-model/1"
METHODS = {**{name: PaDiM for name in PROJECTIONS}, "coreset": PatchCore, "efficientad": EfficientAD}


def build_method(config):
    name = config["method"]
    if name not in METHODS:
        raise UserError(f"unknown --method {name}; choose one of {', '.join(METHODS)}")
    return METHODS[name](config)


def check_geometry(config, max_stats_gb=None):
    """The model's input size, tiles and (PaDiM) statistics size checked before anything is
    loaded or fitted: one clear error instead of a failure deep in the network or out of memory."""
    family = METHODS.get(config["method"])
    if family is not None:
        family.check_geometry(config, max_stats_gb)


def save_model(path, state):
    """Write `<category>.pdparams` atomically (paddle.save, pickle protocol 4 for >4 GB), with its
    version (models/version.py) stamped into `state` first."""
    import paddle
    stamp_version(state)
    state = dict(state, format=MODEL_FORMAT)
    with atomic_path(path) as tmp:
        paddle.save(state, tmp, protocol=4)


def load_model(path):
    state = load_pdparams(path, "model file", missing=f"model file not found: {path} (train it first, or pass --model_path)",
                          marker=MODEL_FORMAT,
                          wrong=f"{path} is not a model written by train.py (no '{MODEL_FORMAT}' marker)")
    if "version" not in state:  # saved before versions: its id now, so that an update names it as parent
        state["version"] = version_of(state)
    return state


def check_model_matches(state, config, path):
    """A model trained with other flags than the ones given is a clear error, not silent nonsense."""
    saved = state["config"]
    # Preprocessing (resize, crop) always comes from the model itself, so it is not compared;
    # each method names the flags that define it (k for PaDiM, the ratio for PatchCore, ...).
    family = METHODS.get(saved.get("method"))
    for key in ("method", "arch") + tuple(getattr(family, "MATCH_KEYS", ())):
        if key in config and config.get(key) is not None and key in saved and saved[key] != config[key]:
            raise UserError(f"{path} was trained with {key}={saved[key]}, not {config[key]}; "
                            f"pass matching flags or another --model_path")


def as_numpy_tree(obj):
    if isinstance(obj, dict):
        return {k: as_numpy_tree(v) for k, v in obj.items()}
    if hasattr(obj, "numpy") and not isinstance(obj, np.ndarray):
        return obj.numpy()
    return obj
