"""Hot reload: a category's export folder, changed while the service runs, goes live without a
restart and without a failed request.

Triggers: SIGHUP (every category), POST /admin/reload and /admin/reload/{category} (the API key
applies as to every route), and with --watch a poll of each export folder every N seconds.

A reload reads the folder's fingerprint (its files' inodes, sizes and times): unchanged, nothing
is done. Else a new ModelWorker loads the export and warms it up (one image through the whole
path) on its own thread, beside the serving one, which goes on answering. Once it is ready, the
category's entry in the app's worker table is replaced in one assignment on the event loop: the
request handler looks its worker up and admits itself to it without yielding in between, so
every request is either admitted to the old worker before the swap or sees the new one after
it. The old worker then answers what it admitted and stops; its thread drops the predictor.

A new model that fails to load or to warm up is dropped and the old one keeps serving; the
failure is shown by GET /models, /health, /metrics (anomaly_reload_failed) and one log line.
An export folder that disappears leaves the loaded model serving; /health says so.

Two reloads of one category never run at once: a second one waits for the first, then compares
the folder with what is now serving (so a reload asked for after an export always serves that
export when it answers, and a burst of triggers loads the folder once).

New categories: a reload of every category (SIGHUP, POST /admin/reload) and each --watch poll
also look for export folders that appeared under --model_dir since start (`scan`). One is loaded
and warmed up like a reload, then added to the worker table in one assignment; until then its
requests get 404 as before. One that fails to load is not served, is shown by /health and the
reload's answer; --watch tries it again when its folder changes, a reload asked for at once.
"""
import asyncio
import ctypes
import gc
import logging
import os
import signal
import threading
import time

from fastapi.responses import JSONResponse

from deploy.predictor import STATS_FILE
from service.app import error_response
from utils import UserError

log = logging.getLogger("service")
LIBC = ctypes.CDLL(None)
POLL_S = 0.02  # how often a reload checks on the model it is loading and on the one it retires
SWAP_GAP_S = 1.0  # how long a reload waits for a missing export folder to come back


def export_fingerprint(folder):
    """What changes whenever an export is written into `folder` (export_model.py swaps in a new
    folder; a copy rewrites the files): the folder's inode and each file's inode, size and mtime.
    None while the folder or its stats file is missing."""
    try:
        folder_inode = os.stat(folder).st_ino
        files = []
        for entry in os.scandir(folder):
            if entry.is_file():
                st = entry.stat()
                files.append((entry.name, st.st_ino, st.st_size, st.st_mtime_ns))
    except OSError:
        return None
    if not any(name == STATS_FILE for name, *_ in files):
        return None
    return folder_inode, tuple(sorted(files))


def release_memory():
    """Collect the old model's objects (Paddle's hold cycles) and hand the freed heap back to the
    system (glibc keeps it otherwise: RSS would climb by a few MB per reload)."""
    gc.collect()
    trim = getattr(LIBC, "malloc_trim", None)
    if trim is not None:
        trim(0)


class Reloader:
    """Reloads the categories of `workers` (the app's {category: ModelWorker}, changed in place)
    from `model_dirs` ({category: export folder}); `make_worker(category, folder)` builds a
    worker, not started. `watch_s` > 0: poll the folders that often. `scan()` -> {category: export
    folder} as found now (service.workers.find_model_dirs over --model_dir): new categories."""

    def __init__(self, workers, model_dirs, make_worker, metrics, watch_s=0.0, scan=None):
        self.workers = workers
        self.scan = scan
        self.adding = asyncio.Lock()  # one new category loads at a time
        self.not_added = {}  # category -> {"error", "at", "fingerprint", "folder"}: a new folder that failed
        self.model_dirs = dict(model_dirs)
        self.make_worker = make_worker
        self.metrics = metrics
        self.watch_s = watch_s
        self.locks = {c: asyncio.Lock() for c in workers}
        self.serving = {c: export_fingerprint(d) for c, d in self.model_dirs.items()}  # read before loading
        self.failure = {}  # category -> {"error", "at", "fingerprint"} of its latest failed reload
        self.last = {}  # category -> the latest reload's answer
        self.tasks = set()  # watcher, SIGHUP reloads, retiring workers
        self.busy_workers = set()  # loading or retiring: stopped with the service

    # ------------------------------------------------------------ lifecycle (the app's lifespan)
    def start(self):
        loop = asyncio.get_running_loop()
        for category, worker in self.workers.items():
            self.metrics.serving(category, worker.version, worker.meta["calibration"].get("validation"))
        if threading.current_thread() is threading.main_thread():  # (an app under a test client is not)
            loop.add_signal_handler(signal.SIGHUP, lambda: self._spawn(self.reload_all("SIGHUP")))
        if self.watch_s > 0:
            self._spawn(self._watch())

    async def stop(self):
        """Before the workers stop: no more reloads; models being loaded or retired are stopped."""
        if threading.current_thread() is threading.main_thread():
            asyncio.get_running_loop().remove_signal_handler(signal.SIGHUP)
        for task in list(self.tasks):
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        for worker in list(self.busy_workers):
            await asyncio.get_running_loop().run_in_executor(None, worker.stop)

    def _spawn(self, coro):
        task = asyncio.ensure_future(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return task

    # ------------------------------------------------------------ reloading
    async def reload_all(self, trigger):
        """Every category in turn (one new model in memory at a time), then the category folders
        that appeared since start -> their answers."""
        answers = [await self.reload(c, trigger) for c in list(self.workers)]
        new = await self.new_categories(retry_failed=True)
        return answers + [await self.add(c, folder, trigger) for c, folder in new.items()]

    async def new_categories(self, retry_failed=False):
        """{category: folder} of export folders under --model_dir that are not served yet; those
        that failed to load as they are now only with `retry_failed` (asked for, not --watch)."""
        if self.scan is None:
            return {}
        try:
            found = await asyncio.get_running_loop().run_in_executor(None, self.scan)
        except UserError:  # no export at all right now (folders being replaced): nothing new
            return {}
        for gone in set(self.not_added) - set(found):  # a failed folder removed: no longer a problem
            del self.not_added[gone]
        return {c: folder for c, folder in found.items() if c not in self.workers and (
            retry_failed or export_fingerprint(folder) != self.not_added.get(c, {}).get("fingerprint"))}

    async def add(self, category, folder, trigger):
        """Load, warm up and then serve a new category -> its answer ("added" or "failed")."""
        async with self.adding:
            if category in self.workers:  # added meanwhile by another trigger
                return {"category": category, "result": "unchanged", "trigger": trigger, "at": time.time(),
                        "model_version": self.workers[category].version["id"]}
            found = export_fingerprint(folder)
            new, error = await self._load(category, folder, found)
            answer = {"category": category, "trigger": trigger, "at": time.time()}
            if new is None:
                self.not_added[category] = {"error": error, "at": answer["at"], "fingerprint": found, "folder": folder}
                log.error("new category %s (%s) not served: %s", category, trigger, error)
                return dict(answer, result="failed", error=error, model_version=None)
            self.not_added.pop(category, None)
            self.model_dirs[category], self.serving[category] = folder, found
            self.locks[category] = asyncio.Lock()
            self.metrics.add_category(category)
            self.metrics.serving(category, new.version, new.meta["calibration"].get("validation"))
            self.workers[category] = new  # served from here on: one assignment, on the event loop
            self.busy_workers.discard(new)
            self.metrics.count_ready(self.workers)
            self.last[category] = answer = dict(answer, result="added", model_version=new.version["id"])
            self.metrics.observe_reload(category, "added")
            log.info("new category %s (%s): added, version %s", category, trigger, new.version["id"])
            return answer

    async def reload(self, category, trigger):
        """-> {"category", "result": "reloaded" | "unchanged" | "failed", "model_version", ...}."""
        async with self.locks[category]:  # a second reload of the category waits for the first
            answer = await self._reload(category)
        answer["trigger"], answer["at"] = trigger, time.time()
        self.last[category] = answer
        self.metrics.observe_reload(category, answer["result"])
        if answer["result"] == "failed":
            log.error("reload of %s (%s) failed, version %s keeps serving: %s", category, trigger,
                      answer["model_version"], answer["error"])
        else:
            log.info("reload of %s (%s): %s, version %s", category, trigger, answer["result"], answer["model_version"])
        return answer

    async def _reload(self, category):
        folder, old = self.model_dirs[category], self.workers[category]
        await self._until(lambda: old.ready.is_set() or old.done.is_set())  # the first load has finished
        found = await self._fingerprint_across_a_swap(folder)
        if found is None:
            return self._failed(category, f"the export folder {folder} is missing or has no {STATS_FILE}", found)
        if found == self.serving[category]:
            self.failure.pop(category, None)
            return {"category": category, "result": "unchanged", "model_version": old.version["id"]}
        new, error = await self._load(category, folder, found)
        if new is None:  # the old model serves on
            return self._failed(category, error, found)
        self.workers[category] = new  # the swap: one assignment, on the event loop
        self.busy_workers.discard(new)
        self.serving[category] = found
        self.failure.pop(category, None)
        self.metrics.serving(category, new.version, new.meta["calibration"].get("validation"))
        self._spawn(self._retire(old))
        return {"category": category, "result": "reloaded", "model_version": new.version["id"],
                "previous_version": old.version["id"]}

    async def _load(self, category, folder, found):
        """A started, warmed-up worker over `folder`, whose fingerprint was `found` before the load
        -> (worker, None), or (None, why it failed)."""
        try:
            new = await asyncio.get_running_loop().run_in_executor(None, self.make_worker, category, folder)
        except Exception as err:  # noqa: BLE001 - any unreadable export
            return None, str(err) or type(err).__name__
        self.busy_workers.add(new)
        new.start()
        await self._until(lambda: new.ready.is_set() or new.done.is_set())
        if new.error:
            self.busy_workers.discard(new)
            return None, new.error.split(": ", 1)[-1]
        if export_fingerprint(folder) != found:  # rewritten while it loaded: what we hold may mix two exports
            self._spawn(self._retire(new))
            return None, f"the export folder {folder} changed while it was loaded; reload again"
        return new, None

    @staticmethod
    async def _fingerprint_across_a_swap(folder):
        """The folder's fingerprint; where the system cannot swap two folders in one step,
        utils.atomic_dir leaves the path missing between two renames: look again for a while."""
        for _ in range(int(SWAP_GAP_S / POLL_S)):
            found = export_fingerprint(folder)
            if found is not None:
                return found
            await asyncio.sleep(POLL_S)
        return export_fingerprint(folder)

    def _failed(self, category, message, fingerprint):
        self.failure[category] = {"error": message, "at": time.time(), "fingerprint": fingerprint}
        return {"category": category, "result": "failed", "error": message,
                "model_version": self.workers[category].version["id"]}

    async def _retire(self, worker):
        """Answer what the old worker admitted, then stop it and let its predictor go."""
        self.busy_workers.add(worker)
        worker.close()
        try:
            await self._until(lambda: worker.admitted == 0)
            await asyncio.get_running_loop().run_in_executor(None, worker.stop)
        finally:
            self.busy_workers.discard(worker)
        await asyncio.get_running_loop().run_in_executor(None, release_memory)

    @staticmethod
    async def _until(condition):
        while not condition():
            await asyncio.sleep(POLL_S)

    async def _watch(self):
        """Poll the folders; reload one whose fingerprint changed and then held still for one
        more poll (a folder being copied file by file is not loaded half-copied). A fingerprint
        that failed to load is not retried until the folder changes again."""
        seen = {}
        while True:
            await asyncio.sleep(self.watch_s)
            for category, folder in (await self.new_categories()).items():
                found = export_fingerprint(folder)
                if found is not None and seen.get(category) == found:
                    seen.pop(category)
                    await self.add(category, folder, "watch")
                else:
                    seen[category] = found
            for category, folder in list(self.model_dirs.items()):
                found = export_fingerprint(folder)
                failed = self.failure.get(category, {}).get("fingerprint")
                if found is None or found == self.serving[category] or found == failed:
                    seen.pop(category, None)
                elif seen.get(category) != found:
                    seen[category] = found
                else:
                    seen.pop(category)
                    await self.reload(category, "watch")

    # ------------------------------------------------------------ what the app shows
    def problems(self):
        """{category: what is wrong} for GET /health: a missing export folder, a failed reload."""
        out = {}
        for category, folder in self.model_dirs.items():
            version = self.workers[category].version["id"]
            if export_fingerprint(folder) is None:
                out[category] = (f"the export folder {folder} is missing or has no {STATS_FILE}; "
                                 f"version {version}, loaded before, keeps serving")
            elif category in self.failure:
                out[category] = f"the latest reload failed ({self.failure[category]['error']}); version {version} " \
                                f"keeps serving"
        for category, failure in self.not_added.items():
            out[category] = f"the new export folder {failure['folder']} could not be loaded ({failure['error']}); " \
                            f"not served"
        return out

    def describe(self, category):
        """The reload state of a category, for GET /models."""
        failure = self.failure.get(category)
        return {"reload": {"last": self.last.get(category),
                           "failed": None if failure is None else {"error": failure["error"], "at": failure["at"]},
                           "watch_s": self.watch_s or None}}

    def add_routes(self, app):
        @app.post("/admin/reload")
        async def reload_every_category():
            return self._answer(await self.reload_all("POST /admin/reload"))

        @app.post("/admin/reload/{category}")
        async def reload_one_category(category: str):
            trigger = f"POST /admin/reload/{category}"
            if category not in self.workers:  # a category folder added since start, or none
                new = await self.new_categories(retry_failed=True)
                if category not in new:
                    return error_response(404, f"unknown category {category!r}; served: {', '.join(self.workers)}")
                return self._answer([await self.add(category, new[category], trigger)])
            return self._answer([await self.reload(category, trigger)])

    @staticmethod
    def _answer(results):
        """200 when every category serves its folder's export; 422 (the old models serve) if one failed."""
        failed = [r for r in results if r["result"] == "failed"]
        if failed:
            return JSONResponse({"error": "; ".join(f"{r['category']}: {r['error']}" for r in failed),
                                 "results": results}, status_code=422)
        return {"results": results}
