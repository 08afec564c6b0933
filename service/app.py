"""The HTTP API (FastAPI on uvicorn) over the model workers: routes, the API key, body limits,
errors as JSON and request metrics. serve.py parses the flags and runs it."""
import asyncio
import base64
import concurrent.futures
import contextlib
import hmac
import io
import logging
import os
import time
from dataclasses import dataclass

import numpy as np
from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from PIL import Image
from starlette.exceptions import HTTPException as StarletteHTTPException

from datasets.transforms import ImageTooLarge
from models.postprocess import prediction_fields
from service.metrics import CONTENT_TYPE, ServiceMetrics
from service.uploads import BodyBudget, BodyRefused, image_bytes, received_body
from service.workers import Overloaded
from utils import UserError

log = logging.getLogger("service")
PAGE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "page.html")
OPEN_PATHS = ("/health", "/")  # no key: liveness probes, and the static page (it sends the key it is given)


@dataclass(frozen=True)
class Limits:
    max_body_bytes: int = 20 * 2**20
    max_pixels: int = 40_000_000
    retry_after_s: int = 1
    body_timeout_s: float = 10.0
    max_body_buffer_bytes: int = 256 * 2**20  # all bodies held at once (service/uploads.BodyBudget)


class ApiError(Exception):
    def __init__(self, status, message, headers=None):
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers


def error_response(status, message, headers=None):
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def png_base64(gray_u8):
    buf = io.BytesIO()
    Image.fromarray(gray_u8).save(buf, format="PNG", compress_level=1)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def prediction_record(worker, pred, with_map):
    """infer.py's JSON fields (visualize.write_prediction), plus the category and model; with
    `with_map` the calibrated map (0..1 as 0..255, 0.5 = threshold) and the mask as PNGs."""
    record = {"category": worker.category, "model": worker.model_name, "model_version": worker.version["id"],
              **prediction_fields(pred)}
    if with_map:
        heat = np.rint(np.clip(pred["anomaly_map"], 0.0, 1.0) * 255.0).astype(np.uint8)
        record["anomaly_map_png"] = png_base64(heat)
        record["pred_mask_png"] = png_base64(pred["pred_mask"].astype(np.uint8) * 255)
        record["map_size"] = list(heat.shape)
    return record


def create_app(workers, api_key=None, limits=Limits(), decode_threads=2, metrics=None, on_load_failure=None,
               reloader=None):
    """`workers`: {category: service.workers.ModelWorker}, started by the app's lifespan and
    drained when it stops; `on_load_failure(message)` is called if a model cannot be loaded;
    `reloader`: a service.reload.Reloader over `workers`, which swaps their entries."""
    metrics = metrics or ServiceMetrics(list(workers), max((w.max_batch for w in workers.values()), default=1))
    pool = concurrent.futures.ThreadPoolExecutor(decode_threads, thread_name_prefix="decode")
    bodies = BodyBudget(limits.max_body_buffer_bytes)
    with open(PAGE, encoding="utf-8") as f:
        page = f.read()
    key = api_key.encode() if api_key else None

    async def watch_loading():
        for w in workers.values():
            while not (w.ready.is_set() or w.done.is_set()):
                await asyncio.sleep(0.05)
            if w.error and on_load_failure:
                on_load_failure(w.error)
                return
        metrics.count_ready(workers)
        log.info("ready: %s", ", ".join(workers))

    @contextlib.asynccontextmanager
    async def lifespan(app):
        for w in workers.values():
            w.start()
        watcher = asyncio.create_task(watch_loading())
        if reloader:
            reloader.start()
        yield
        watcher.cancel()
        if reloader:
            await reloader.stop()
        for w in workers.values():  # uvicorn has answered every request in flight by now
            await asyncio.get_running_loop().run_in_executor(None, w.stop)
        pool.shutdown(wait=True)

    app = FastAPI(title="anomaly detection service", lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None)

    def authorized(request):
        given = request.headers.get("x-api-key")
        auth = request.headers.get("authorization", "")
        if given is None and auth.lower().startswith("bearer "):
            given = auth[7:].strip()
        return given is not None and hmac.compare_digest(given.encode(), key)

    def labels(path):
        """(endpoint, category) for the metrics; unknown names collapse so that no client can
        create series at will."""
        if path.startswith("/predict/"):
            category = path[len("/predict/"):]
            return "predict", category if category in workers else "unknown"
        if path.startswith("/admin/reload"):
            return "reload", ""
        endpoint = {"/": "page", "/health": "health", "/models": "models", "/metrics": "metrics"}.get(path, "other")
        return endpoint, ""

    @app.middleware("http")
    async def guard(request, call_next):
        start = time.perf_counter()
        if key is not None and request.url.path not in OPEN_PATHS and not authorized(request):
            response = error_response(401, "missing or wrong API key (X-API-Key or Authorization: Bearer)",
                                      {"WWW-Authenticate": "Bearer"})
        else:
            try:
                response = await call_next(request)
            except Exception:  # noqa: BLE001 - logged here, never shown to the client
                log.exception("internal error on %s %s", request.method, request.url.path)
                response = error_response(500, "internal error")
        metrics.observe_request(*labels(request.url.path), response.status_code, time.perf_counter() - start)
        return response

    @app.exception_handler(ApiError)
    @app.exception_handler(BodyRefused)
    async def api_error(request, err):
        return error_response(err.status, err.message, err.headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, err):
        return error_response(err.status_code, str(err.detail), getattr(err, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def bad_request(request, err):
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in err.errors())
        return error_response(400, f"bad request: {problems}")

    def ready_worker(category):
        worker = workers.get(category)
        if worker is None:
            raise ApiError(404, f"unknown category {category!r}; served: {', '.join(workers)}")
        if not worker.ready.is_set():
            raise ApiError(503, f"the model for {category} is loading", {"Retry-After": str(limits.retry_after_s)})
        return worker

    async def decoded_image(request, worker):
        """The request's image (raw body or multipart form), read within --body_timeout_s and
        decoded in the pool; its body is let go (and given back to the budget) on return."""
        async with received_body(request, limits.max_body_bytes, limits.body_timeout_s, bodies) as body:
            encoded = image_bytes(body, request.headers.get("content-type"))
            try:
                chw, _ = await asyncio.get_running_loop().run_in_executor(
                    pool, worker.preprocess.decode, encoded, "in the request body", limits.max_pixels)
            except ImageTooLarge as err:
                raise ApiError(413, str(err)) from None
            except UserError as err:
                raise ApiError(400, str(err)) from None
        return chw

    @app.post("/predict/{category}")
    async def predict(category: str, request: Request, with_map: bool = Query(False, alias="map")):
        loop = asyncio.get_running_loop()
        decoded_for = ready_worker(category)  # unknown or loading: answered before the body is read
        chw = await decoded_image(request, decoded_for)
        # A queue slot only now: a client slow to send its body holds none (and is cut off at
        # --body_timeout_s), so slow uploads cannot fill the queue against everyone else.
        # No await from this lookup to admit(): a hot reload swaps workers[category] between two
        # steps of the event loop and retires the old worker once its admitted requests are answered.
        worker = ready_worker(category)
        if worker.preprocess != decoded_for.preprocess:  # a reload changed the geometry meanwhile
            raise ApiError(503, f"{category}: the model was replaced by a reload while the image was read; send again",
                           {"Retry-After": str(limits.retry_after_s)})
        try:
            worker.admit()
        except Overloaded as err:
            raise ApiError(503, f"overloaded: {err}", {"Retry-After": str(limits.retry_after_s)}) from None
        try:
            pred = await asyncio.wrap_future(worker.submit(chw))
        finally:
            worker.release()
        if with_map:  # PNG encoding off the event loop
            return JSONResponse(await loop.run_in_executor(pool, prediction_record, worker, pred, True))
        return JSONResponse(prediction_record(worker, pred, False))

    @app.get("/health")
    async def health():
        loading = [c for c, w in workers.items() if not w.ready.is_set()]
        if loading:
            return JSONResponse({"status": "loading", "loading": loading}, status_code=503,
                                headers={"Retry-After": str(limits.retry_after_s)})
        problems = reloader.problems() if reloader else {}
        if problems:  # still serving: 200, with what went wrong
            return {"status": "degraded", "models": list(workers), "problems": problems}
        return {"status": "ok", "models": list(workers)}

    @app.get("/models")
    async def models():
        return {"models": [dict(w.describe(), **(reloader.describe(c) if reloader else {})) for c, w in workers.items()]}

    @app.get("/metrics")
    async def metrics_text():
        return Response(metrics.exposition(), media_type=CONTENT_TYPE)

    if reloader:
        reloader.add_routes(app)

    @app.get("/", response_class=HTMLResponse)
    async def index():
        return HTMLResponse(page)

    return app
