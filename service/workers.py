"""One inference worker per exported model: a thread that owns the model's Paddle Inference
predictor (predictors are not shared across threads) and runs the requests queued for it in
dynamic batches, through the same loading and scoring path as infer.py (deploy.load_deployed,
models/postprocess.Detector).
"""
import concurrent.futures
import logging
import os
import queue
import threading
import time

import numpy as np

from datasets.transforms import Preprocess
from deploy.predictor import STATS_FILE, load_deployed, load_stats, resolve_files
from service.metrics import answer_counts
from utils import UserError

log = logging.getLogger("service")
_STOP = object()


class Overloaded(Exception):
    """The model's queue is full: the request is refused (503) instead of waiting without bound."""


def find_model_dirs(model_dir):
    """{category: export folder}: `model_dir` itself when it is one export (named by its
    category), else every sub-folder holding an export, named by the folder."""
    if not os.path.isdir(model_dir):
        raise UserError(f"model dir not found: {model_dir}")
    if os.path.isfile(os.path.join(model_dir, STATS_FILE)):
        meta, _ = load_stats(os.path.join(model_dir, STATS_FILE))
        name = meta.get("category") or os.path.basename(os.path.abspath(model_dir))
        return {name: model_dir}
    # Dot-folders are exports being written or replaced (utils.atomic_dir), never categories.
    found = {name: os.path.join(model_dir, name) for name in sorted(os.listdir(model_dir))
             if not name.startswith(".") and os.path.isfile(os.path.join(model_dir, name, STATS_FILE))}
    if not found:
        raise UserError(f"no exported model in {model_dir}: expected {STATS_FILE} in it or in its "
                        f"category folders (written by export_model.py)")
    return found


class ModelWorker:
    """Requests for one category -> batches of up to `max_batch` images that arrived within
    `max_wait_ms` of the first -> one pass through the network and one scoring pass."""

    def __init__(self, category, model_dir, engine_config, metrics, max_batch=8, max_wait_ms=5.0, max_queue=64,
                 log_failure=True):
        self.category = category
        self.model_dir = model_dir
        self.files = resolve_files(model_dir)
        self.meta, _ = load_stats(self.files[2])  # a broken export is a one-line error at start
        self.version = self.meta.get("version") or {"id": None}  # exports made before versions: none
        self.log_failure = log_failure  # a reload logs its own line (service/reload.py)
        self.loaded_at = None
        self.answered = [0, 0]  # answers, anomalous ones, by this model
        cfg = self.meta["config"]
        self.preprocess = Preprocess.from_config(cfg)
        self.model_name = f"{cfg['method']}_{cfg['arch']}"
        self.engine_config = engine_config
        self.metrics = metrics
        self.max_batch, self.max_wait, self.max_queue = max_batch, max_wait_ms / 1000.0, max_queue
        self.detector = None
        self.error = None
        self.ready = threading.Event()
        self.done = threading.Event()  # set when loading failed or the worker stopped
        self._queue = queue.Queue()
        self._admitted = 0
        self._closed = False
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name=f"infer-{category}", daemon=True)

    # ------------------------------------------------------------ the request side
    def describe(self):
        cfg, cal = self.meta["config"], self.meta["calibration"]
        return {"category": self.category, "model": self.model_name, "method": cfg["method"], "arch": cfg["arch"],
                "config": cfg, "input_shape": self.meta["input_shape"], "ready": self.ready.is_set(),
                "thresholds": {"image": cal["image_threshold"], "pixel": cal["pixel_threshold"]},
                "calibration": cal, "model_version": self.version["id"], "version": self.version,
                "export_dir": self.model_dir, "loaded_at": self.loaded_at,
                "answers": {"this_version": answer_counts(*self.answered),
                            "since_start": self.metrics.answers_since_start(self.category),
                            "validation": cal.get("validation")}}

    def admit(self):
        """Count a request in (from its decoded image until its answer), or raise Overloaded.
        The count bounds the images held for this model, not only the queue proper."""
        with self._lock:
            if self._closed:  # only if a request looked its worker up, then yielded before admit()
                raise Overloaded(f"{self.category}: the model was replaced by a reload; send again")
            if self._admitted >= self.max_queue:
                raise Overloaded(f"{self.category}: {self._admitted} requests waiting (--max_queue {self.max_queue})")
            self._admitted += 1
        self.metrics.queue_length.labels(self.category).inc()

    def close(self):
        """Admit no more requests (a reload has replaced this worker); the admitted are answered."""
        with self._lock:
            self._closed = True

    @property
    def admitted(self):
        """Requests counted in and not yet answered."""
        return self._admitted

    def release(self):
        with self._lock:
            self._admitted -= 1
        self.metrics.queue_length.labels(self.category).dec()

    def submit(self, chw):
        """A preprocessed image [3, H, W] -> a Future of its calibrated prediction (Detector.calibrated)."""
        future = concurrent.futures.Future()
        self._queue.put((chw, future, time.monotonic()))
        return future

    # ------------------------------------------------------------ the worker thread
    def start(self):
        self._thread.start()

    def stop(self, timeout=None):
        """Answer everything queued, then end the thread (if it was started)."""
        self._queue.put(_STOP)
        if self._thread.ident is not None:
            self._thread.join(timeout)

    def _run(self):
        try:  # the predictor is made in the thread that runs it
            self.detector, _ = load_deployed(*self.files, **self.engine_config)
            # Warm-up: one image through the whole path, calibration included, before any request.
            probe = np.zeros((1, 3, *self.preprocess.map_size), np.float32)
            self.detector.calibrated(*self.detector.raw(probe))
        except Exception as err:  # noqa: BLE001 - reported by the server (which then exits) or the reload
            self.error = f"{self.category}: {err}"
            self.detector = None
            if self.log_failure:
                log.error("cannot load the model for %s: %s", self.category, err)
            self.done.set()
            return
        self.loaded_at = time.time()
        self.ready.set()
        try:
            while self._serve_batch():
                pass
        finally:
            self.detector = None  # the predictor goes with the thread that made it
            self.done.set()

    def _collect(self):
        """The next batch: block for its first request, then take what arrives until it is full
        or `max_wait` has passed since the first arrived. Under load the first has waited that
        long already while the previous batch ran: the batch is then what is queued, and the
        worker never idles while requests wait. None once stopped."""
        first = self._queue.get()
        if first is _STOP:
            return None
        batch = [first]
        deadline = first[2] + self.max_wait
        while len(batch) < self.max_batch:
            remaining = deadline - time.monotonic()
            try:
                item = self._queue.get(timeout=remaining) if remaining > 0 else self._queue.get_nowait()
            except queue.Empty:
                break
            if item is _STOP:
                self._queue.put(_STOP)  # end after this batch is answered
                break
            batch.append(item)
        return batch

    def _serve_batch(self):
        batch = self._collect()
        if batch is None:
            return False
        # A request whose client went away was cancelled: drop it; the rest can no longer be.
        batch = [(chw, f) for chw, f, _ in batch if f.set_running_or_notify_cancel()]
        if not batch:
            return True
        futures = [f for _, f in batch]
        try:
            t0 = time.perf_counter()
            scores, maps = self.detector.raw(np.stack([chw for chw, _ in batch]))
            preds = self.detector.calibrated(scores, maps)
            self.metrics.observe_batch(self.category, len(batch), time.perf_counter() - t0)
            self.metrics.observe_answers(self.category, preds)
            self.answered[0] += len(preds)
            self.answered[1] += sum(1 for p in preds if p["pred_label"])
        except Exception as err:  # noqa: BLE001 - every waiting request gets it; the worker goes on
            for f in futures:
                f.set_exception(err)
            return True
        for f, pred in zip(futures, preds):
            f.set_result(pred)
        return True
