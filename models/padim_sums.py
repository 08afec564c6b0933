"""The float64 sufficient statistics of a PaDiM/OrthoAD fit, saved beside the model
(`train.py --keep_sums`) so that `train.py --update` can add good images later: count, sum of x
and the upper triangle of sum x x^T per position (R18 k=100 at 224 px: 127 MB)."""
import os

import numpy as np

from utils import UserError, atomic_path

SUMS_FORMAT = "paddle-anomaly-sums/1"
# The flags that define what the sums are sums of: the same images through another network,
# projection or crop would add up to nonsense.
DEFINING_KEYS = ("method", "arch", "k", "seed", "resize", "crop_size", "crop", "image_size", "tile", "tile_stride",
                 "backbone_weights")


def defining_flags(config):
    """The meta lines of a config (a saved tuple may come back as a list: both read HxW)."""
    def text(value):
        return "x".join(map(str, value)) if isinstance(value, (tuple, list)) else str(value)
    return [SUMS_FORMAT] + [f"{k}={text(config.get(k))}" for k in DEFINING_KEYS]


def sums_path(model_path):
    """<category>.pdparams -> <category>.sums.npz"""
    stem = model_path[:-len(".pdparams")] if model_path.endswith(".pdparams") else model_path
    return stem + ".sums.npz"


def save_sums(model_path, sums, config):
    path = sums_path(model_path)
    meta = np.array(defining_flags(config))
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, count=np.int64(sums["count"]), sum=sums["sum"], outer=sums["outer"], meta=meta)
    return path


def load_sums(model_path, state):
    """The sums saved beside `model_path`, checked against its model `state`."""
    path = sums_path(model_path)
    if not os.path.isfile(path):
        raise UserError(f"{model_path} has no saved sums ({path} is missing); --update needs a model "
                        f"fitted with --keep_sums")
    try:
        with np.load(path) as f:
            sums = {k: f[k] for k in ("count", "sum", "outer", "meta")}
    except (OSError, ValueError, KeyError) as err:
        raise UserError(f"cannot read the sums {path}: {err}") from None
    config = state["config"]
    if list(sums["meta"]) != defining_flags(config):
        raise UserError(f"{path} does not belong to {model_path} (its flags differ); fit again with --keep_sums")
    mean = sums["sum"] / max(int(sums["count"]), 1)
    if mean.shape != state["stats"]["mean"].shape or not np.allclose(mean, state["stats"]["mean"], rtol=1e-4,
                                                                     atol=1e-4):
        raise UserError(f"{path} does not belong to {model_path} (its mean differs); fit again with --keep_sums")
    return {"count": int(sums["count"]), "sum": sums["sum"], "outer": sums["outer"]}
