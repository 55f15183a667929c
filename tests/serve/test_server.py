"""caltech serve: the real server on a loopback port, its answers against `caltech predict`'s, and
the requests it refuses in one line while it goes on serving."""

from __future__ import annotations

import concurrent.futures
import io
import shutil
import socket
import time

import httpx
import pytest
from PIL import Image

from caltech_cli import engines

from conftest import CLASSES, FIXTURE, caltech, csv_rows, old_checkpoint, photos, serving, upload


@pytest.mark.e2e
@pytest.mark.parametrize("tta", ["true", "false"])
def test_answers_are_what_predict_writes_for_the_same_files(tmp_path, capsys, tta):
    """The same decoding, preprocessing, test-time augmentation and network as `caltech predict`:
    the same top classes with the same probabilities, whether the images come in one request, in
    several, or as the raw bytes of one."""
    images = photos(tmp_path / "photos")
    status, stderr = caltech(*old_checkpoint(tmp_path, "predict", "--data.predict_dir", str(tmp_path / "photos"),
                                             "--data.tta_flip", tta), capsys=capsys)  # fmt: skip
    assert status == 0, stderr[-3000:]
    written = {row["path"]: row for row in csv_rows(tmp_path / "runs" / "predictions.csv")}
    with serving("--ckpt_path", str(FIXTURE / "best.ckpt"), "--tta_flip", tta, cwd=tmp_path) as server:
        answers = httpx.post(server.url + "predict", files=upload(images[:4]), timeout=60).json()["predictions"]
        answers += httpx.post(server.url + "predict", files=upload(images[4:5]), timeout=60).json()["predictions"]
        raw = httpx.post(server.url + "predict", content=images[5].read_bytes(),
                         headers={"content-type": "image/jpeg"}, timeout=60).json()["predictions"]  # fmt: skip
        answers.append({**raw[0], "file": images[5].name})
    assert [a["file"] for a in answers] == [p.name for p in images]
    for answer in answers:
        row = written[answer["file"]]
        columns = [("class", "probability")] + [(f"class_{k}", f"probability_{k}") for k in (2, 3)]
        assert [guess["class"] for guess in answer["top"]] == [row[c] for c, _ in columns]
        for guess, (_, p) in zip(answer["top"], columns):
            assert guess["probability"] == pytest.approx(float(row[p]), abs=2e-6)


@pytest.mark.e2e
@pytest.mark.skipif(not engines.installed("onnxruntime"), reason="ONNX Runtime is not installed")
def test_a_checkpoint_served_on_an_engine_answers_what_predict_writes(tmp_path, capsys):
    """--engine onnxruntime exports the backbone's graph into --cache_dir as it starts and answers
    predict's numbers (float32: within 1e-4); a later server on auto runs that kept graph, exporting
    nothing; without a kept graph auto starts on PyTorch at once."""
    images = photos(tmp_path / "photos")
    predict = ["--data.predict_dir", str(tmp_path / "photos"), "--model.engine", "torch", "--data.tta_flip", "false"]
    status, stderr = caltech(*old_checkpoint(tmp_path, "predict", *predict), capsys=capsys)
    assert status == 0, stderr[-3000:]
    written = {row["path"]: row for row in csv_rows(tmp_path / "runs" / "predictions.csv")}
    cache = tmp_path / "cache"
    with serving("--ckpt_path", str(FIXTURE / "best.ckpt"), "--cache_dir", str(cache), cwd=tmp_path) as server:
        assert httpx.get(server.url + "info").json()["engine"] == "torch", "auto exports nothing at start-up"
    assert not cache.exists()
    run = ["--ckpt_path", str(FIXTURE / "best.ckpt"), "--cache_dir", str(cache)]
    with serving(*run, "--engine", "onnxruntime", cwd=tmp_path) as server:
        assert httpx.get(server.url + "info").json()["engine"].startswith("onnxruntime"), server.said
        answers = httpx.post(server.url + "predict", files=upload(images), timeout=60).json()["predictions"]
    for answer in answers:
        row = written[answer["file"]]
        assert answer["top"][0]["class"] == row["class"]
        assert answer["top"][0]["probability"] == pytest.approx(float(row["probability"]), abs=1e-4)
    graphs = list((cache / "engines").glob("*.onnx"))
    assert len(graphs) == 1
    built = graphs[0].stat().st_mtime_ns
    with serving(*run, cwd=tmp_path) as server:
        assert httpx.get(server.url + "info").json()["engine"] != "torch", server.said
        assert len(httpx.post(server.url + "predict", files=upload(images[:2]), timeout=60).json()["predictions"]) == 2
    assert graphs[0].stat().st_mtime_ns == built and "exporting" not in server.said


def png_of(width: int, height: int, mode: str = "RGB") -> bytes:
    out = io.BytesIO()
    Image.new(mode, (width, height)).save(out, format="PNG")
    return out.getvalue()


@pytest.mark.e2e
@pytest.mark.hostile
def test_bad_requests_get_one_line_and_the_server_goes_on(tmp_path):
    good = photos(tmp_path / "photos", 1)[0]
    truncated = good.read_bytes()[: len(good.read_bytes()) // 3]
    cases = [
        ({"content": b"hello", "headers": {"content-type": "text/plain"}}, 415, "a request of type text/plain"),
        ({"content": b"", "headers": {"content-type": "image/png"}}, 422, "holds no image"),
        ({"files": [("files", ("notes.txt", b"not an image", "text/plain"))]}, 422, "notes.txt is not an image"),
        ({"files": [("files", ("cut.jpg", truncated, "image/jpeg"))]}, 422, "cut.jpg is not an image"),
        ({"files": [("files", ("bomb.png", png_of(10_000, 10_000, "1"), "image/png"))]}, 422, "decompression-bomb"),
        ({"files": [("files", ("thin.png", png_of(400_000, 1, "L"), "image/png"))]}, 422, "too thin"),
        (
            {"files": [("files", (f"{i}.jpg", good.read_bytes(), "image/jpeg")) for i in range(5)]},
            413,
            "5 files, over the limit of 4",
        ),
        ({"content": b"x" * 3_000_000, "headers": {"content-type": "image/png"}}, 413, "over the limit"),
        ({"content": (b"x" * 1000 for _ in range(3000)), "headers": {"content-type": "image/png"}}, 413, "limit"),
        ({"content": b"--x\r\nno headers", "headers": {"content-type": "multipart/form-data"}}, 400, "boundary"),
        ({"files": [("files", ("photo.jpg", EPS, "image/jpeg"))]}, 422, "photo.jpg is not an image the model"),
        (
            {"files": [("files", (f"{i}.png", png_of(9_000, 9_000), "image/png")) for i in range(2)]},
            413,
            "over the limit of 89,478,485 a request",
        ),
        (
            {"files": [("files", ("a\nb\x1b[2J.jpg", b"nope", "image/jpeg"))]},
            422,
            "a%0Ab\\x1b[2J.jpg is not an image the model can read (UnidentifiedImageError: cannot identify image file)",
        ),
    ]
    with serving("--ckpt_path", str(FIXTURE / "best.ckpt"), "--max_files", "4", "--max_request_mb", "2",
                 "--body_timeout_s", "3", cwd=tmp_path) as server:  # fmt: skip
        for request, status, says in cases:
            response = httpx.post(server.url + "predict", timeout=60, **request)
            answer = response.json()
            assert response.status_code == status and says in answer["error"], (request.get("headers"), answer)
            assert "\n" not in answer["error"] and "Traceback" not in answer["error"]
        for method, path, status in (("GET", "predict", 405), ("GET", "nowhere", 404)):
            answer = httpx.request(method, server.url + path, timeout=10)
            assert answer.status_code == status and "error" in answer.json()
        other = httpx.get(server.url + "info", headers={"host": "evil.example"}, timeout=10)
        assert other.status_code == 421 and "this server answers 127.0.0.1" in other.json()["error"]
        assert slow_body(server.url, seconds=3) == 408, "a body that never ends is cut off"
        left = socket.create_connection(server_address(server.url))  # a client that leaves mid-body
        left.sendall(b"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 100\r\n\r\nab")
        left.close()
        assert httpx.get(server.url + "health", timeout=10).json()["status"] == "ok"
        with_field = [*upload([good] * 4), ("note", (None, b"a form field, not a file"))]
        served = httpx.post(server.url + "predict", files=with_field, timeout=60)
        assert served.status_code == 200 and served.json()["predictions"][0]["top"][0]["class"] in CLASSES
        body = '--b\r\nContent-Disposition: form-data; name=f; filename="café.jpg"\r\n\r\n'.encode()  # as browsers
        body += good.read_bytes() + b"\r\n--b--\r\n"
        named = httpx.post(
            server.url + "predict", content=body, headers={"content-type": "multipart/form-data; boundary=b"}
        )
        assert named.status_code == 200 and named.json()["predictions"][0]["file"] == "café.jpg", named.text
    output = server.process.stdout.read()
    assert "Traceback" not in output and "\x1b" not in output, output[-3000:]


# An EPS file: PIL would hand it to Ghostscript, which the server never lets it do.
EPS = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nnewpath 0 0 moveto 10 10 lineto stroke\nshowpage\n"


def server_address(url: str) -> tuple[str, int]:
    host, port = url.removeprefix("http://").strip("/").split(":")
    return host, int(port)


def slow_body(url: str, seconds: float) -> int:
    """The status answered to a request whose body comes a byte a second, for up to 2 x ``seconds``."""
    with socket.create_connection(server_address(url), timeout=2 * seconds + 5) as sock:
        sock.sendall(
            b"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: image/png\r\nContent-Length: 1000\r\n\r\n"
        )
        for _ in range(int(2 * seconds)):
            try:
                sock.sendall(b"x")
            except OSError:
                break
            time.sleep(1)
        return int(sock.recv(200).split()[1])


@pytest.mark.e2e
def test_requests_that_arrive_together_share_a_network_call_and_info_says_what_runs(tmp_path):
    images = photos(tmp_path / "photos", 3)
    with serving("--ckpt_path", str(FIXTURE / "best.ckpt"), "--batch_wait_ms", "200", cwd=tmp_path) as server:
        assert server.url.startswith("http://127.0.0.1:"), "loopback unless told otherwise"
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            posted = list(pool.map(lambda i: httpx.post(server.url + "predict", files=upload([images[i % 3]]),
                                                          timeout=60), range(8)))  # fmt: skip
        assert all(response.status_code == 200 for response in posted)
        calls = httpx.get(server.url + "health", timeout=10).json()["network_calls"]
        assert 1 <= calls < 8, f"8 requests in {calls} network calls"
        info = httpx.get(server.url + "info", timeout=10).json()
        assert info["classes"] == sorted(CLASSES) and info["backbone"] == "timm/test_convnext.r160_in1k"
        assert (
            info["preprocessing"]["crop_size"] == 64 and info["format"] == "checkpoint" and "torch" in info["versions"]
        )
        page = httpx.get(server.url, timeout=10)
        assert page.status_code == 200 and "default-src 'none'" in page.headers["content-security-policy"]


@pytest.mark.e2e
def test_no_network_call_holds_more_than_max_batch_images(tmp_path):
    images = photos(tmp_path / "photos", 5)
    with serving("--ckpt_path", str(FIXTURE / "best.ckpt"), "--max_batch", "2", cwd=tmp_path) as server:
        answer = httpx.post(server.url + "predict", files=upload(images), timeout=60)
        assert len(answer.json()["predictions"]) == 5
        assert httpx.get(server.url + "health", timeout=10).json()["network_calls"] == 3, "5 images, 2 a call"


@pytest.mark.e2e
def test_an_exported_onnx_file_serves_the_same_answers(tmp_path, capsys):
    checkpoint = shutil.copy(FIXTURE / "best.ckpt", tmp_path / "model.ckpt")
    status, stderr = caltech("export", "--ckpt_path", str(checkpoint), capsys=capsys)
    assert status == 0, stderr[-3000:]
    images = photos(tmp_path / "photos", 3)
    answers = {}
    for source in (["--ckpt_path", str(checkpoint)], ["--onnx", str(tmp_path / "model.onnx")]):
        with serving(*source, "--tta_flip", "true", cwd=tmp_path) as server:
            answers[source[0]] = httpx.post(server.url + "predict", files=upload(images), timeout=60).json()
            if source[0] == "--onnx":
                assert httpx.get(server.url + "info", timeout=10).json()["format"] == "onnx"
    for torch_answer, onnx_answer in zip(answers["--ckpt_path"]["predictions"], answers["--onnx"]["predictions"]):
        assert [g["class"] for g in torch_answer["top"]] == [g["class"] for g in onnx_answer["top"]]
        for a, b in zip(torch_answer["top"], onnx_answer["top"]):
            assert a["probability"] == pytest.approx(b["probability"], abs=1e-4)
    for key, value, says in [
        ("class_names", '["circles", "squares"]', "names 2 classes for the network's 3 outputs"),
        ("class_names", '"abc"', "names no list of two or more classes"),
        ("class_names", '["a", "a", "a"]', "names a class twice"),
        ("preprocessing", '{"crop_size": 100, "resize_size": 110}', "gives a crop of 100"),
        ("preprocessing", '{"interpolation": "magic"}', "gives interpolation 'magic'"),
    ]:
        altered = altered_onnx(tmp_path / "model.onnx", tmp_path / "altered.onnx", key, value)
        status, stderr = caltech("serve", "--onnx", str(altered), "--port", "0", capsys=capsys)
        assert status == 2 and f"its metadata {says}" in stderr and "Traceback" not in stderr, stderr[-2000:]


def altered_onnx(source, target, key: str, value: str):
    """``source`` with one metadata entry changed (``preprocessing``: fields merged into its own)."""
    import json

    import onnx

    model = onnx.load(str(source))
    for entry in model.metadata_props:
        if entry.key == key:
            entry.value = (
                json.dumps({**json.loads(entry.value), **json.loads(value)}) if key == "preprocessing" else value
            )
    onnx.save(model, str(target))
    return target


@pytest.mark.hostile
def test_serve_refuses_what_cannot_work_in_one_line(tmp_path, capsys):
    (tmp_path / "notes.onnx").write_text("not a model")
    line_of = {
        "not-onnx": ["--onnx", str(tmp_path / "notes.onnx")],
        "not-a-checkpoint": ["--ckpt_path", str(tmp_path / "notes.onnx")],
        "port": ["--ckpt_path", str(FIXTURE / "best.ckpt"), "--port", "70000"],
        "wait": ["--ckpt_path", str(FIXTURE / "best.ckpt"), "--batch_wait_ms", "nan"],
        "cache-a-file": ["--ckpt_path", str(FIXTURE / "best.ckpt"), "--engine", "onnxruntime", "--cache_dir",
                         str(tmp_path / "notes.onnx")],
        "cache-a-file-auto": ["--ckpt_path", str(FIXTURE / "best.ckpt"), "--cache_dir", str(tmp_path / "notes.onnx")],
        "cache-in-proc": ["--ckpt_path", str(FIXTURE / "best.ckpt"), "--engine", "openvino", "--cache_dir",
                          "/proc/self/caltech"],
        "engine-of-onnx": ["--onnx", str(tmp_path / "notes.onnx"), "--engine", "openvino"],
        "cache-of-onnx": ["--onnx", str(tmp_path / "notes.onnx"), "--cache_dir", str(tmp_path)],
    }  # fmt: skip
    says = {
        "not-onnx": "is not an ONNX file that `caltech export` wrote",
        "not-a-checkpoint": "cannot read checkpoint",
        "port": "--port 70000 cannot work",
        "wait": "--batch_wait_ms nan cannot work",
        "cache-a-file": "cannot be made a folder (a file is in its way). Fix: pass --cache_dir",
        "cache-a-file-auto": "cannot be made a folder (a file is in its way). Fix: pass --cache_dir",
        "cache-in-proc": "is in /proc, the kernel's",
        "engine-of-onnx": "--engine is for a checkpoint's backbone; an ONNX file runs on ONNX Runtime",
        "cache-of-onnx": "--cache_dir is for a checkpoint's backbone",
    }
    for case, options in line_of.items():
        status, stderr = caltech("serve", "--port", "0", *options, capsys=capsys)
        assert status == 2 and says[case] in stderr and "Traceback" not in stderr, stderr[-2000:]
    with socket.socket() as taken:  # a port in use: bind one here, then ask the server for it
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        status, stderr = caltech("serve", "--ckpt_path", str(FIXTURE / "best.ckpt"), "--port", port, capsys=capsys)
    assert status == 2 and f"cannot listen on 127.0.0.1:{port}" in stderr
