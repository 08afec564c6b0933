"""serve.py as a child process on a free loopback port: what the tests and the load benchmark
start, wait for, measure and stop."""
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServiceProcess:
    """`python serve.py --model_dir MODEL_DIR --port <free> FLAGS...`, its output in `log_path`."""

    def __init__(self, model_dir, log_path, *flags):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        with open(log_path, "w") as log:
            self.proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "serve.py"), "--model_dir", model_dir,
                                          "--port", str(self.port), *flags],
                                         cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)

    def wait_ready(self, timeout=300):
        """Poll GET /health until 200 (every model loaded); the log if it exits or times out."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"serve.py exited with {self.proc.returncode}:\n{self.log()}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as res:
                    if res.status == 200:
                        return self
            except (urllib.error.URLError, ConnectionError, OSError):
                pass
            time.sleep(0.1)
        raise RuntimeError(f"serve.py not ready in {timeout} s:\n{self.log()}")

    def log(self):
        with open(self.log_path) as f:
            return f.read()

    def rss_mb(self, field="VmRSS"):
        """Resident memory now; `field="VmHWM"`: its peak (since start or reset_peak_rss)."""
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024.0
        return float("nan")

    def reset_peak_rss(self):
        """Start VmHWM over from the current RSS (Linux: clear_refs 5)."""
        with open(f"/proc/{self.proc.pid}/clear_refs", "w") as f:
            f.write("5")

    def stop(self, timeout=60):
        """SIGTERM (graceful), then SIGKILL if it does not exit in `timeout` s; -> exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode
