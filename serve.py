"""HTTP service over exported models: every category folder under --model_dir, loaded once.

    python serve.py --model_dir inference --port 8866
    curl --data-binary @IMAGE.png http://127.0.0.1:8866/predict/bottle
    curl -F image=@IMAGE.png http://127.0.0.1:8866/predict/bottle      # multipart/form-data

POST /predict/{category}[?map=true], GET /health, /models, /metrics (Prometheus), / (a page to
drop an image on). A changed export folder goes live without a restart on SIGHUP, POST
/admin/reload[/{category}], or by itself with --watch SECONDS (service/reload.py). Binds 127.0.0.1 unless told otherwise; another --host needs --api_key (or
$AD_API_KEY) or an explicit --no_auth. SIGTERM or Ctrl-C: stop accepting, answer what is in
flight, exit 0. What a request may cost (body size and time, connections, memory) is bounded:
docs/serving_limits.md.
"""
import argparse
import os

from utils import UserError, add_inference_args, run_cli

LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model_dir", required=True, help="export_model.py folder, or a folder of category folders")
    p.add_argument("--host", default="127.0.0.1", help="address to bind; another than loopback needs a key")
    p.add_argument("--port", type=int, default=8866)
    # Read from the environment in check_args, not as the default: -h would print the key.
    p.add_argument("--api_key", default=None,
                   help="required on every request but /health and the page (X-API-Key or Authorization: "
                        "Bearer); if not given, $AD_API_KEY")
    p.add_argument("--no_auth", action="store_true", help="serve another --host without an API key")
    p.add_argument("--max_batch", type=int, default=8, help="images per inference batch at most")
    p.add_argument("--max_wait_ms", type=float, default=5.0,
                   help="how long a batch waits for more requests after its first arrived")
    p.add_argument("--max_queue", type=int, default=64, help="requests per model waiting at most; more get 503")
    p.add_argument("--max_image_mb", type=float, default=20.0, help="largest request body")
    p.add_argument("--body_timeout_s", type=float, default=10.0,
                   help="a body not all arrived this long after its headers is answered 408 (slow clients)")
    p.add_argument("--max_body_buffer_mb", type=float, default=256.0,
                   help="request bodies held at once, all requests together; over it, 503")
    p.add_argument("--max_connections", type=int, default=256,
                   help="open connections at most; a request over it is answered 503 at once")
    p.add_argument("--keep_alive_s", type=float, default=5.0,
                   help="a connection without a request's headers for this long (idle or slow) is closed")
    p.add_argument("--max_megapixels", type=float, default=40.0, help="largest decoded image (decompression bombs)")
    p.add_argument("--decode_threads", type=int, default=2, help="threads decoding and preprocessing images")
    add_inference_args(p)  # --cpu_threads: per model
    p.add_argument("--graceful_timeout", type=float, default=30.0,
                   help="seconds to finish the requests in flight after SIGTERM")
    p.add_argument("--access_log", action="store_true", help="log every request")
    p.add_argument("--watch", type=float, default=0.0, metavar="SECONDS",
                   help="poll the export folders this often: reload a changed one, add a new category "
                        "folder (0: only on SIGHUP or POST /admin/reload)")
    return p


def check_args(args):
    if args.api_key is None:
        args.api_key = os.environ.get("AD_API_KEY")
    for name in ("max_batch", "max_queue", "decode_threads", "cpu_threads", "max_connections"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name} must be at least 1")
    for name in ("max_wait_ms", "max_image_mb", "max_megapixels", "body_timeout_s", "max_body_buffer_mb",
                 "keep_alive_s", "watch"):
        if getattr(args, name) < 0 or (name not in ("max_wait_ms", "watch") and getattr(args, name) == 0):
            raise UserError(f"--{name} must be positive")
    if args.max_body_buffer_mb < args.max_image_mb:
        raise UserError(f"--max_body_buffer_mb {args.max_body_buffer_mb:g} must hold at least one body of "
                        f"--max_image_mb {args.max_image_mb:g}")
    if args.host not in LOCAL_HOSTS and not (args.api_key or args.no_auth):
        raise UserError(f"--host {args.host} serves other machines: give --api_key KEY (or $AD_API_KEY), "
                        f"or --no_auth to serve them without one")
    if args.api_key is not None and not args.api_key.strip():
        raise UserError("--api_key is empty")


def main(argv=None):
    args = build_parser().parse_args(argv)
    check_args(args)
    from service.server import run_service
    return run_service(args)


if __name__ == "__main__":
    run_cli(main)
