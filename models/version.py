"""A model's identity: which model judged which part.

    state["version"] = {"id": "3f9c0a1b2d4e",          # hash of what decides the answers
                        "trained_at": "2026-12-03T16:40:00Z", "train_images": 209,
                        "parent": "9a8b7c6d5e4f" | None}  # the model it was updated from

The id hashes the network weights (and the int8 graph's quantised weights and scales), the
projection, the statistics or memory bank, the preprocessing and method config and the
thresholds: two models that answer alike share it, and anything that changes an answer (refit,
--update, new thresholds from eval.py) changes it.
Timestamps, paths and the image count are metadata, not part of the hash.
"""
import datetime
import hashlib
import json

import numpy as np

ID_CHARS = 12
# What decides a model's answers; anything else in the state (split, category, sums) does not.
HASHED_KEYS = ("config", "net", "projection_kind", "projection", "stats", "calibration", "int8_graph")


def _feed(h, obj):
    if isinstance(obj, dict):
        for key in sorted(obj, key=str):
            h.update(f"<{key}>".encode())
            _feed(h, obj[key])
    elif isinstance(obj, (list, tuple)) and not all(isinstance(v, (int, float, str, bool, type(None))) for v in obj):
        for v in obj:
            _feed(h, v)
    elif isinstance(obj, (np.ndarray, np.generic)) or hasattr(obj, "numpy"):
        arr = np.ascontiguousarray(obj.numpy() if hasattr(obj, "numpy") and not isinstance(obj, np.ndarray) else obj)
        h.update(f"{arr.dtype.str}{arr.shape}".encode())
        h.update(arr.tobytes())
    else:
        h.update(json.dumps(obj, sort_keys=True, default=str).encode())


def _answering_part(key, value):
    """The int8 graph's weights and activation scales (its params) decide its answers; its
    program's bytes do not: Paddle's quantiser orders the same ops differently from one process
    to the next, and the ops follow from the net and config, which are hashed."""
    if key == "int8_graph":
        return {k: v for k, v in value.items() if k != "model"}
    return value


def version_id(state):
    """The hash of what decides the model's answers (12 hex characters)."""
    h = hashlib.sha256()
    for key in HASHED_KEYS:
        if key in state:
            h.update(f"[{key}]".encode())
            _feed(h, _answering_part(key, state[key]))
    return h.hexdigest()[:ID_CHARS]


def stamp_version(state):
    """Give `state` its version before it is saved. A model whose answers changed since its last
    version (an --update, new thresholds) gets a new id whose parent is the old one; a model saved
    again unchanged keeps its version."""
    old = state.get("version") or {}
    new_id = version_id(state)
    if old.get("id") == new_id:
        return old
    state["version"] = {
        "id": new_id,
        "trained_at": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "train_images": int(state.get("train_images") or 0),
        "parent": old.get("id"),
    }
    return state["version"]


def version_of(state):
    """The version dict of a model state; a model saved before versions existed gets its id
    computed now (no date, no parent)."""
    return state.get("version") or {"id": version_id(state), "trained_at": None,
                                    "train_images": int(state.get("train_images") or 0), "parent": None}
