"""The service and the image readers against slow clients, odd images and hostile input: slow
uploads hold no queue slot and get 408, the connection cap and the headers deadline, the body
budget, multipart uploads, a corpus of odd inputs through the service, infer.py, predict.py and
training, and the one-step centre crop against resize-then-crop."""
import glob
import json
import os
import re
import socket
import time

import numpy as np
import pytest
import requests
from PIL import Image

import infer
import predict
import train
from datasets import transforms
from datasets.unreadable import SOME_UNREADABLE
from deploy.predictor import load_deployed, resolve_files
from odd_inputs import odd_inputs
from test_serve import TINY, exported, read, start  # noqa: F401 - `exported`: the tiny bottle model fixture
from utils import UserError

BODY_TIMEOUT_S = 3.0
KEEP_ALIVE_S = 2.0
MAX_CONNECTIONS = 210
SLOW_UPLOADS = 200


@pytest.fixture(scope="module")
def server(exported, tmp_path_factory):
    srv = start(exported[0], str(tmp_path_factory.mktemp("log") / "serve.log"), "--max_queue", "4",
                "--body_timeout_s", str(BODY_TIMEOUT_S), "--keep_alive_s", str(KEEP_ALIVE_S),
                "--max_connections", str(MAX_CONNECTIONS), "--max_image_mb", "1", "--max_body_buffer_mb", "1")
    try:
        yield srv.wait_ready()
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def corpus(exported):
    return odd_inputs(read(exported[1][0]))


def predict_url(server):
    return server.url + "/predict/bottle"


def open_upload(server, declared, sent):
    """A socket that sent the headers of a POST announcing `declared` body bytes, then `sent`."""
    s = socket.create_connection(("127.0.0.1", server.port), timeout=BODY_TIMEOUT_S + 30)
    s.sendall(f"POST /predict/bottle HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
              f"Content-Length: {declared}\r\n\r\n".encode() + sent)
    return s


def answer_and_close(sock):
    """(status, JSON body) of the one answer on `sock`, which the server must then close."""
    data = b""
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    sock.close()
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)


def test_slow_uploads_hold_no_queue_slot_and_get_408(server, exported):
    good = read(exported[1][0])
    want = requests.post(predict_url(server), data=good, timeout=60).json()["raw_score"]
    t0 = time.monotonic()
    slow = [open_upload(server, 70000, good[:100]) for _ in range(SLOW_UPLOADS)]  # 50x --max_queue 4
    time.sleep(0.5)  # every slow upload has reached the app
    for _ in range(3):
        res = requests.post(predict_url(server), data=good, timeout=60)
        assert res.status_code == 200 and res.json()["raw_score"] == want, res.text
    assert time.monotonic() - t0 < BODY_TIMEOUT_S  # answered while every slow upload is still held
    for sock in slow:
        status, body = answer_and_close(sock)
        assert status == 408 and "--body_timeout_s" in body["error"], body
    assert time.monotonic() - t0 >= BODY_TIMEOUT_S
    assert requests.post(predict_url(server), data=good, timeout=60).status_code == 200


def test_connection_cap_and_the_headers_deadline(server, exported):
    good = read(exported[1][0])
    idle = []
    for i in range(MAX_CONNECTIONS):  # headers that never end: every slot taken
        s = socket.create_connection(("127.0.0.1", server.port), timeout=KEEP_ALIVE_S + 30)
        s.sendall(b"POST /predict/bottle HTTP/1.1\r\nHost: x\r\n" if i % 2 else b"")
        idle.append(s)
    time.sleep(0.3)
    t0 = time.monotonic()
    res = requests.post(predict_url(server), data=good, timeout=60)
    assert res.status_code == 503 and time.monotonic() - t0 < 2.0
    assert "--max_connections" in res.json()["error"] and res.headers["Retry-After"] == "1", res.text
    for s in idle:  # closed by the server, without an answer, at the headers deadline
        assert s.recv(1024) == b""
        s.close()
    assert requests.post(predict_url(server), data=good, timeout=60).status_code == 200
    with requests.Session() as session:  # a kept-alive connection serves several requests
        assert [session.post(predict_url(server), data=good, timeout=60).status_code for _ in range(2)] == [200, 200]


def test_bodies_held_at_once_are_bounded(server, exported):
    """--max_body_buffer_mb 1: one upload stalled after 999,999 bytes leaves no room for another
    body (503); after its 408 there is."""
    good = read(exported[1][0])
    stalled = open_upload(server, 1_000_000, b"\0" * 999_999)
    time.sleep(0.5)
    res = requests.post(predict_url(server), data=good, timeout=60)
    assert res.status_code == 503 and "--max_body_buffer_mb" in res.json()["error"]
    assert answer_and_close(stalled)[0] == 408
    assert requests.post(predict_url(server), data=good, timeout=60).status_code == 200


def test_multipart_uploads_work_like_raw_bodies(server, exported):
    url = predict_url(server)
    for path in exported[1][:2]:
        raw = requests.post(url, data=read(path), params={"map": "true"}, timeout=60).json()
        form = requests.post(url, files={"image": ("part.png", read(path), "image/png")}, params={"map": "true"},
                             timeout=60).json()
        assert form == raw
    good = read(exported[1][0])
    want = requests.post(url, data=good, timeout=60).json()["raw_score"]
    # Another field name is taken when it is the form's only file; a form field beside it is ignored.
    res = requests.post(url, files={"upload": ("p.png", good)}, data={"note": "shift 2"}, timeout=60)
    assert res.status_code == 200 and res.json()["raw_score"] == want, res.text
    assert requests.post(url, data={"note": "no file"}, files={"a": ("a", b"1"), "b": ("b", b"2")},
                         timeout=60).status_code == 400
    res = requests.post(url, files={"image": ("big.png", os.urandom(2 * 2**20))}, timeout=60)
    assert res.status_code == 413 and "--max_image_mb" in res.json()["error"]
    res = requests.post(url, data=b"--x\r\nno end", headers={"Content-Type": "multipart/form-data; boundary=x"},
                        timeout=60)
    assert res.status_code == 400 and "multipart" in res.json()["error"]
    res = requests.post(url, files={"image": ("t.png", b"not an image")}, timeout=60)
    assert res.status_code == 400 and "cannot read image" in res.json()["error"]


def test_form_parts_by_offset():
    from service.uploads import BodyRefused, image_bytes
    form = (b"preamble\r\n--b0\r\nContent-Disposition: form-data; name=\"note\"\r\n\r\nhello\r\n"
            b"--b0 \r\nContent-Disposition: form-data; name=image; filename=\"a;b.png\"\r\n"
            b"Content-Type: image/png\r\n\r\n\x89PNG\r\n--b\r\n--b0--\r\nepilogue")
    assert image_bytes(form, 'multipart/form-data; boundary="b0"') == b"\x89PNG\r\n--b"
    assert image_bytes(b"raw", "application/x-www-form-urlencoded") == b"raw"  # curl --data-binary's label
    for body, ctype in ((form, "multipart/form-data"), (b"--b0\r\n\r\nx", "multipart/form-data; boundary=b0"),
                        (b"nothing", "multipart/form-data; boundary=b0")):
        with pytest.raises(BodyRefused):
            image_bytes(body, ctype)


def test_extreme_aspect_images_cost_nothing(server, corpus):
    """12000x1 and 1x60000 are refused from their header (size floor); before, 12000x1 was
    resized to 3,072,000x256 (9.3 s, +3.2 GB). Bounds are generous: a loaded machine."""
    rss0 = server.rss_mb("VmHWM")
    for name in ("12000x1.png", "1x60000.png", "60000x1.png"):
        t0 = time.monotonic()
        res = requests.post(predict_url(server), data=corpus[name], timeout=60)
        assert res.status_code == 400 and "16-pixel floor" in res.json()["error"]
        assert time.monotonic() - t0 < 1.0
    assert server.rss_mb("VmHWM") - rss0 < 50


def test_centre_crop_cost_follows_the_output():
    """The geometry alone (no size floor): a 12000x1 and a 1x60000 image to 224x224."""
    preprocess = transforms.Preprocess(256, 224)
    preprocess.image(Image.new("RGB", (256, 256)))  # the normalising kernel loaded (numba), not timed
    for size in ((12000, 1), (1, 60000)):
        t0 = time.perf_counter()
        chw, rgb = preprocess.image(Image.new("RGB", size, (90, 90, 90)))
        assert rgb.shape == (224, 224, 3) and (rgb == 90).all()
        assert time.perf_counter() - t0 < 0.5  # resize-then-crop: seconds and gigabytes


def test_every_odd_input_gets_200_or_a_json_4xx(server, exported, corpus):
    assert len(corpus) >= 40
    good = read(exported[1][0])
    want = requests.post(predict_url(server), data=good, timeout=60).json()["raw_score"]
    answered = {}
    for name, body in corpus.items():
        for upload in ({"data": body}, {"files": {"image": (name, body)}}):
            t0 = time.monotonic()
            res = requests.post(predict_url(server), timeout=60, **upload)
            assert time.monotonic() - t0 < 10, name
            assert res.status_code == 200 or (400 <= res.status_code < 500 and "error" in res.json()), \
                (name, res.status_code, res.text)
            assert "Traceback" not in res.text
            if res.status_code == 200:
                assert 0.0 <= res.json()["pred_score"] <= 1.0
            answered.setdefault(name, res.status_code)
            assert answered[name] == res.status_code, name  # raw and multipart alike
    for name in ("png_1bit.png", "png_palette.png", "png_gray_alpha.png", "png_16bit.png", "png_interlaced.png",
                 "jpeg_baseline.jpg", "jpeg_progressive.jpg", "jpeg_cmyk.jpg", "jpeg_exif_rotated.jpg",
                 "gif_animated.png", "tiff_multipage.tif", "webp.webp", "bmp.bmp", "ico.png"):
        assert answered[name] == 200, name
    for name in ("zero_bytes.png", "one_byte.png", "svg.png", "html.png", "zip.png", "png_truncated_at_73.png",
                 "1x1.png", "1x60000.png", "60000x1.png"):
        assert answered[name] == 400, name
    for name in ("bomb_png_100000x100000.png", "bomb_png_7000x7000.png", "bomb_jpeg_65000x65000.jpg",
                 "bomb_gif_65535x65535.png"):
        assert answered[name] == 413, name
    assert server.proc.poll() is None
    assert requests.post(predict_url(server), data=good, timeout=60).json()["raw_score"] == want
    server.answered_corpus = answered  # for the scripts' test: the same files, the same verdicts


@pytest.fixture(scope="module")
def corpus_dir(corpus, exported, tmp_path_factory):
    folder = tmp_path_factory.mktemp("corpus")
    for name, body in corpus.items():
        (folder / name).write_bytes(body)
    return str(folder)


def test_scripts_score_what_they_can_and_name_the_rest(server, exported, corpus, corpus_dir, tmp_path, capsys):
    """infer.py and predict.py over the corpus folder: every readable image scored, every other
    named on one line of stderr, exit code 3; the same files as the service answered 200."""
    scored_by_service = {n for n, status in getattr(server, "answered_corpus", {}).items() if status == 200}
    if not scored_by_service:
        scored_by_service = {n for n, b in corpus.items()
                             if requests.post(predict_url(server), data=b, timeout=60).status_code == 200}
    model_dir = os.path.join(exported[0], "bottle")
    run_dir = os.path.join(os.path.dirname(exported[0]), "run")
    runs = {"infer": lambda: infer.main(["--model_dir", model_dir, "--input_file", corpus_dir, "--cpu_threads", "2",
                                         "--batch_size", "4", "--save_path", str(tmp_path / "infer"), "--report"]),
            "predict": lambda: predict.main([corpus_dir, "--category", "bottle", *TINY, "--model_path", run_dir,
                                             "--output_dir", str(tmp_path / "predict"), "--no_progress"])}
    for label, run in runs.items():
        capsys.readouterr()
        assert run() == SOME_UNREADABLE, label
        out, err = capsys.readouterr()
        scored = {os.path.basename(json.loads(line)["image_path"]) for line in out.splitlines()
                  if line.startswith("{")}
        skipped = [line for line in err.splitlines() if line.startswith("skipped: ")]
        named = {n for n in corpus for line in skipped
                 if re.search(re.escape(os.path.join(corpus_dir, n)) + "[: ]", line)}
        assert scored == scored_by_service, (label, scored ^ scored_by_service)
        assert len(skipped) == len(named) == len(corpus) - len(scored), (label, err)
        assert named | scored == set(corpus)
        assert f"error: {len(named)} of {len(corpus)} images could not be read" in err
    assert os.path.isfile(tmp_path / "infer" / "report" / "index.html")  # the review page of the scored ones


@pytest.mark.parametrize("layout", ["mvtec", "folder"])
def test_training_stops_before_the_fit_naming_the_bad_file(layout, synthetic_root, corpus, tmp_path):
    good_dir = os.path.join(synthetic_root, "widget", "train", "good")
    bad = os.path.join(good_dir, "003_trunc.png")
    with open(bad, "wb") as f:
        f.write(corpus["png_truncated_at_73.png"])
    # Folder mode: every normal image is a training image (none held out for the test split).
    data = ["--data_path", synthetic_root] if layout == "mvtec" else ["--normal_dir", good_dir,
                                                                      "--normal_test_ratio", "0"]
    with pytest.raises(UserError) as err:
        train.main([*data, "--category", "widget", *TINY, "--save_path", str(tmp_path / "run"), "--no_progress"])
    assert bad in str(err.value) and "\n" not in str(err.value)
    assert not glob.glob(str(tmp_path / "run" / "**" / "*.pdparams"), recursive=True)  # no model written


def test_serve_checks_the_new_limits():
    import serve
    for flags, words in ((["--body_timeout_s", "0"], "--body_timeout_s must be positive"),
                         (["--keep_alive_s", "-1"], "--keep_alive_s must be positive"),
                         (["--max_connections", "0"], "--max_connections must be at least 1"),
                         (["--max_image_mb", "300"], "--max_body_buffer_mb 256 must hold")):
        with pytest.raises(UserError, match=words):
            serve.check_args(serve.build_parser().parse_args(["--model_dir", "m", *flags]))


# ---------------------------------------------------------------- the one-step centre crop
def resize_then_crop(img, resize, crop_size):
    """The centre crop as it was computed before: the whole image resized, then cropped."""
    w, h = img.size
    rw, rh = transforms._resized_size(w, h, resize)
    if (w, h) != (rw, rh):
        img = img.resize((rw, rh), Image.LANCZOS)
    left, top = int(round((rw - crop_size) / 2.0)), int(round((rh - crop_size) / 2.0))
    return np.asarray(img.crop((left, top, left + crop_size, top + crop_size)))


SIZES = [(256, 256), (900, 900), (300, 500), (500, 300), (640, 480), (1000, 333), (100, 150), (777, 1333),
         (255, 257), (20, 1500)]


def test_centre_crop_pixels_equal_resize_then_crop(mvtec_lite):
    """Pixels equal to within the two resampling passes' rounding (Pillow may run them in the
    other order for the box): at most 2 of 255, on at most a fifth of the pixels."""
    base = Image.open(os.path.join(mvtec_lite, "bottle", "test", "broken_large", "000.png")).convert("RGB")
    for size in SIZES:
        img = base.resize(size, Image.BICUBIC)
        for resize, crop in ((256, 224), (64, 64), (320, 288)):
            got = transforms.Preprocess(resize, crop).image(img)[1].astype(int)
            diff = np.abs(got - resize_then_crop(img, resize, crop))
            assert diff.max() <= 2 and (diff > 0).mean() <= 0.2, (size, resize, crop, diff.max())
    # Masks keep resize-then-crop (nearest neighbour): exactly as before.
    mask = Image.fromarray((np.asarray(base.convert("L").resize((300, 500))) > 128).astype(np.uint8) * 255)
    old = (resize_then_crop_nearest(mask, 256, 224) > 127).astype(np.uint8)
    np.testing.assert_array_equal(transforms.Preprocess(256, 224).mask(mask), old)


def resize_then_crop_nearest(img, resize, crop_size):
    w, h = img.size
    rw, rh = transforms._resized_size(w, h, resize)
    img = img.resize((rw, rh), Image.NEAREST)
    left, top = int(round((rw - crop_size) / 2.0)), int(round((rh - crop_size) / 2.0))
    return np.asarray(img.crop((left, top, left + crop_size, top + crop_size)))


def test_centre_crop_scores_and_maps_equal_resize_then_crop(exported):
    """Through the tiny exported model (resize 64, crop 64): bottle images at their 256x256 and
    resized to non-square sizes, scored from both crops."""
    detector, meta = load_deployed(*resolve_files(os.path.join(exported[0], "bottle")), cpu_threads=2)
    preprocess = transforms.Preprocess.from_config(meta["config"])
    new, old = [], []
    for path in exported[1]:
        img = transforms.load_rgb(path)
        for size in SIZES[:8]:
            resized = img.resize(size, Image.BICUBIC) if size != img.size else img
            new.append(preprocess.image(resized)[0])
            rgb = resize_then_crop(resized, preprocess.resize, preprocess.crop_size)
            old.append(preprocess.image(Image.fromarray(rgb))[0])  # already 64x64: only normalised
    new_scores, new_maps = detector.raw(np.stack(new))
    old_scores, old_maps = detector.raw(np.stack(old))
    # Measured when written (96 images): scores 0.36% apart at most (median 0), raw maps 0.55% of
    # their largest value, calibrated maps (0..1, threshold 0.5) 0.014, every label the same.
    rel = np.abs(new_scores - old_scores) / np.abs(old_scores)
    assert rel.max() < 5e-3 and np.median(rel) < 1e-4, rel.max()
    assert np.abs(new_maps - old_maps).max() < 1e-2 * np.abs(old_maps).max()
    new_preds, old_preds = detector.calibrated(new_scores, new_maps), detector.calibrated(old_scores, old_maps)
    for got, was in zip(new_preds, old_preds):
        assert np.abs(got["anomaly_map"] - was["anomaly_map"]).max() < 0.02
        assert got["pred_label"] == was["pred_label"]


def test_a_reload_while_the_body_arrives(exported):
    """The worker is looked up again once the image is decoded (the queue slot is taken then): a
    reload meanwhile that changed the model's geometry answers 503 send again; the worker the
    image was decoded for never counted it."""
    import asyncio

    import httpx

    from service.app import create_app
    from service.metrics import ServiceMetrics
    from service.workers import ModelWorker
    metrics = ServiceMetrics(["bottle"], 8)
    old, new = (ModelWorker("bottle", os.path.join(exported[0], "bottle"), {"cpu_threads": 1}, metrics)
                for _ in range(2))
    for w in (old, new):
        w.ready.set()
    new.preprocess = transforms.Preprocess(96, 96)
    workers = {"bottle": old}
    app = create_app(workers, metrics=metrics)
    good = read(exported[1][0])

    async def body():
        yield good[:1000]
        await asyncio.sleep(0.05)
        workers["bottle"] = new  # what service/reload.py does between two steps of the event loop
        yield good[1000:]

    async def post():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
            return await client.post("/predict/bottle", content=body())

    res = asyncio.run(asyncio.wait_for(post(), 30))  # admitted to `new` (never started), it would wait
    assert res.status_code == 503 and "send again" in res.json()["error"], res.text
    assert old.admitted == 0 and new.admitted == 0
