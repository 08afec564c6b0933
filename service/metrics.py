"""The service's Prometheus metrics (GET /metrics), in a registry of its own so that two apps
in one process (tests) do not share counters."""
import threading

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.0, 5.0, 10.0)
CONTENT_TYPE = CONTENT_TYPE_LATEST
# Calibrated scores: 0.5 is the threshold; fine steps around it show a drift before answers flip.
SCORE_BUCKETS = (0.05, 0.1, 0.2, 0.3, 0.35, 0.4, 0.42, 0.44, 0.46, 0.47, 0.48, 0.49, 0.5, 0.51, 0.52, 0.53,
                 0.54, 0.56, 0.58, 0.6, 0.65, 0.7, 0.8, 0.9, 0.95, 1.0)


class ServiceMetrics:
    def __init__(self, categories, max_batch):
        self.registry = r = CollectorRegistry()
        labels = ["endpoint", "category", "status"]
        self.requests = Counter("anomaly_requests", "HTTP requests answered, by endpoint, category and status",
                                labels, registry=r)
        self.errors = Counter("anomaly_errors", "Requests answered with an error status (4xx, 5xx)", labels, registry=r)
        self.latency = Histogram("anomaly_request_latency_seconds", "Time from request to answer",
                                 ["endpoint", "category"], buckets=LATENCY_BUCKETS, registry=r)
        self.batch_size = Histogram("anomaly_batch_size", "Images per inference batch (dynamic batching)",
                                    ["category"], buckets=tuple(range(1, max_batch + 1)), registry=r)
        self.batch_seconds = Histogram("anomaly_batch_inference_seconds", "Network + scoring time of one batch",
                                       ["category"], buckets=LATENCY_BUCKETS, registry=r)
        self.queue_length = Gauge("anomaly_queue_length", "Requests admitted for a model and not yet answered",
                                  ["category"], registry=r)
        self.models_ready = Gauge("anomaly_models_ready", "Models loaded and warmed up", registry=r)
        # What the models answer (drift) and which model answers (reloads).
        self.score = Histogram("anomaly_score", "Calibrated image score of each answer (0.5 = threshold)",
                               ["category"], buckets=SCORE_BUCKETS, registry=r)
        self.answers = Counter("anomaly_answers", "Answers by predicted label", ["category", "label"], registry=r)
        self.validation_share = Gauge("anomaly_validation_anomalous_share",
                                      "Share of anomalous answers of the serving model on its own validation "
                                      "images (images=all) and on the good ones among them (images=good)",
                                      ["category", "images"], registry=r)
        self.validation_median = Gauge("anomaly_validation_good_score_median",
                                       "Median calibrated score of the serving model on its good validation images",
                                       ["category"], registry=r)
        self.model_info = Gauge("anomaly_model_version_info", "1 for the model version serving a category",
                                ["category", "version", "parent"], registry=r)
        self.model_loaded = Gauge("anomaly_model_loaded_timestamp_seconds", "When the serving model was swapped in",
                                  ["category"], registry=r)
        self.reloads = Counter("anomaly_reloads",
                               "Reloads by result (reloaded, unchanged, failed; added: a new category)",
                               ["category", "result"], registry=r)
        self.reload_failed = Gauge("anomaly_reload_failed", "1 while the latest reload of a category has failed "
                                   "(the model loaded before keeps serving)", ["category"], registry=r)
        self._serving = {}  # category -> the model_info labels shown
        self._counts = {}  # category -> [answers, anomalous] since start, for GET /models
        self._lock = threading.Lock()
        for c in categories:
            self.add_category(c)

    def add_category(self, category):
        """Every series of a category exists from the start (or from when it is added), at 0."""
        self.queue_length.labels(category)
        self.batch_size.labels(category)
        self.score.labels(category)
        self.reload_failed.labels(category)
        for label in ("normal", "anomalous"):
            self.answers.labels(category, label)

    def count_ready(self, workers):
        """anomaly_models_ready: the models of `workers` (category -> worker) loaded and warmed up."""
        self.models_ready.set(sum(w.ready.is_set() for w in workers.values()))

    def observe_request(self, endpoint, category, status, seconds):
        self.requests.labels(endpoint, category, str(status)).inc()
        if status >= 400:
            self.errors.labels(endpoint, category, str(status)).inc()
        self.latency.labels(endpoint, category).observe(seconds)

    def observe_batch(self, category, size, seconds):
        self.batch_size.labels(category).observe(size)
        self.batch_seconds.labels(category).observe(seconds)

    def observe_answers(self, category, preds):
        anomalous = sum(1 for p in preds if p["pred_label"])
        for p in preds:
            self.score.labels(category).observe(p["pred_score"])
        self.answers.labels(category, "anomalous").inc(anomalous)
        self.answers.labels(category, "normal").inc(len(preds) - anomalous)
        with self._lock:
            counts = self._counts.setdefault(category, [0, 0])
            counts[0] += len(preds)
            counts[1] += anomalous

    def answers_since_start(self, category):
        with self._lock:
            count, anomalous = self._counts.get(category, (0, 0))
        return answer_counts(count, anomalous)

    def serving(self, category, version, validation):
        """A model (its version dict and calibration["validation"]) now answers for `category`."""
        labels = (category, version.get("id") or "", version.get("parent") or "")
        with self._lock:
            old = self._serving.get(category)
            if old is not None and old != labels:
                self.model_info.remove(*old)
            self._serving[category] = labels
        self.model_info.labels(*labels).set(1)
        self.model_loaded.labels(category).set_to_current_time()
        validation = validation or {}  # none stored (a model calibrated before they were): NaN
        for images, key in (("all", "anomalous_share"), ("good", "good_anomalous_share")):
            self.validation_share.labels(category, images).set(nan_if_none(validation.get(key)))
        self.validation_median.labels(category).set(nan_if_none(validation.get("good_score_median")))

    def observe_reload(self, category, result):
        self.reloads.labels(category, result).inc()
        if result != "unchanged":
            self.reload_failed.labels(category).set(result == "failed")

    def exposition(self):
        return generate_latest(self.registry)


def answer_counts(count, anomalous):
    return {"count": count, "anomalous": anomalous, "anomalous_share": anomalous / count if count else None}


def nan_if_none(value):
    return float("nan") if value is None else value
