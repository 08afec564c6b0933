"""serve.py's flags -> the model workers, the app and the uvicorn server; runs until SIGTERM."""
import ctypes
import logging
import signal

import uvicorn
from PIL import Image
from threadpoolctl import threadpool_limits

from service.app import Limits, create_app
from service.connections import HeadersDeadlineProtocol, answer_connections_full
from service.metrics import ServiceMetrics
from service.reload import Reloader
from service.workers import ModelWorker, find_model_dirs
from utils import UserError, inference_config


def log_to_stderr():
    """The service's own lines (ready, load failures, internal errors with their traceback) in
    uvicorn's format, on a handler of their own: Paddle's import leaves the root logger at WARNING."""
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s:     %(message)s"))
    service_log = logging.getLogger("service")
    service_log.addHandler(handler)
    service_log.setLevel(logging.INFO)
    service_log.propagate = False


def return_freed_images_to_the_os(threshold=4 * 2**20):
    """glibc raises its mmap threshold (up to 32 MB) each time it frees a block that large:
    decoded images (Pillow's 16 MB blocks) then come from the heap, and the memory of the largest
    images ever posted stays with the process (measured: 978 MB instead of 566 MB before the
    last of four rounds of 8 x 40 MP, benchmarks/bench_attack.py). A fixed threshold keeps blocks
    over it mmapped, so that each request's images go back to the system when it is answered.
    Smaller blocks stay on the heap. A no-op where the C library is not glibc."""
    try:
        ctypes.CDLL("libc.so.6").mallopt(-3, threshold)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass


def connection_limits(args):
    """uvicorn settings that bound connections: over --max_connections open ones (or requests in
    flight) a request is answered 503 at once; a connection waits --keep_alive_s at most for its
    next request's headers (service/connections.py)."""
    # uvicorn counts the connection of the request it checks: +1 lets --max_connections be served.
    return {"limit_concurrency": args.max_connections + 1, "timeout_keep_alive": args.keep_alive_s,
            "http": HeadersDeadlineProtocol}


def run_service(args):
    """-> 0 after a graceful stop; a model that cannot be loaded, or a port that cannot be
    bound, is a UserError once the server has stopped."""
    log_to_stderr()
    return_freed_images_to_the_os()
    max_pixels = int(args.max_megapixels * 1e6)
    Image.MAX_IMAGE_PIXELS = max_pixels  # Pillow's own guard agrees with ours
    engine_config = inference_config(args)
    # BLAS at one thread for good: each model's worker thread scores under a temporary one-thread
    # limit (postprocess, over_positions), and those limits, saved and restored from several
    # threads at once, could otherwise leave BLAS at whichever setting was restored last.
    threadpool_limits(limits=1, user_api="blas")
    dirs = find_model_dirs(args.model_dir)
    metrics = ServiceMetrics(list(dirs), args.max_batch)

    def make_worker(category, folder, log_failure=True):
        return ModelWorker(category, folder, engine_config, metrics, args.max_batch, args.max_wait_ms, args.max_queue,
                           log_failure)

    workers = {c: make_worker(c, d) for c, d in dirs.items()}
    reloader = Reloader(workers, dirs, lambda c, d: make_worker(c, d, log_failure=False), metrics, args.watch,
                        scan=lambda: find_model_dirs(args.model_dir))
    failures = []

    def load_failed(message):
        failures.append(message)
        server.should_exit = True

    limits = Limits(int(args.max_image_mb * 2**20), max_pixels, body_timeout_s=args.body_timeout_s,
                    max_body_buffer_bytes=int(args.max_body_buffer_mb * 2**20))
    app = create_app(workers, api_key=args.api_key, decode_threads=args.decode_threads, metrics=metrics,
                     limits=limits, on_load_failure=load_failed, reloader=reloader)
    answer_connections_full(limits.retry_after_s)  # over --max_connections: JSON like the other refusals
    server = uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port, access_log=args.access_log,
                                           timeout_graceful_shutdown=args.graceful_timeout, log_level="info",
                                           **connection_limits(args)))
    # uvicorn re-raises the signal that stopped it once it has shut down gracefully; a no-op
    # handler underneath turns that into a normal exit 0 (what a process manager expects).
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    server.run()
    if failures:
        raise UserError(f"cannot load the model for {failures[0]}")
    if not server.started:
        raise UserError(f"the server did not start on {args.host}:{args.port} (see the log above)")
    return 0
