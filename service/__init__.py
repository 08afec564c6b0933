"""The HTTP service of serve.py: model workers with dynamic batching (workers.py), the API
(app.py), its Prometheus metrics (metrics.py) and the drop-an-image page (page.html)."""
