"""The service's Prometheus metrics (GET /metrics), in a registry of its own so that two apps
in one process (tests) do not share counters."""
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.0, 5.0, 10.0)
CONTENT_TYPE = CONTENT_TYPE_LATEST


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
        for c in categories:  # every series exists from the start, at 0
            self.queue_length.labels(c)
            self.batch_size.labels(c)

    def observe_request(self, endpoint, category, status, seconds):
        self.requests.labels(endpoint, category, str(status)).inc()
        if status >= 400:
            self.errors.labels(endpoint, category, str(status)).inc()
        self.latency.labels(endpoint, category).observe(seconds)

    def observe_batch(self, category, size, seconds):
        self.batch_size.labels(category).observe(size)
        self.batch_seconds.labels(category).observe(seconds)

    def exposition(self):
        return generate_latest(self.registry)
