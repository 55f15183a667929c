"""``caltech serve`` under a bounded load on loopback, beside ``caltech predict`` on the same images.

(a) ``caltech predict`` over the images, one view each (``--data.tta_flip false``, as the server
    by default), less its start-up (a run over a single image): the tool's own batch throughput;
(b) ``caltech serve`` (FastAPI and uvicorn, requests batched into one network call): its start-up
    until ``/health`` answers, then CLIENTS concurrent clients each posting REQUESTS requests of one
    image, cycling through the images: p50 and p99 latency, images/s and the error count (a reply
    other than 200 with the top classes); with the backbone on PyTorch (``--engine torch``) and on
    ``--engine auto`` with its graph kept (a first start with ``--engine onnxruntime`` exports it);
(c) with ``--litserve``, the same classifier behind LitServe (Lightning's serving engine, on
    FastAPI and uvicorn too, with its own batching over worker processes; ``serve_litserve.py``),
    started and loaded the same way: what the choice of server library was measured by.

    python benchmarks/serve.py --ckpt runs/transfer/best.ckpt --folder data/101_ObjectCategories --litserve
    python benchmarks/serve.py --ckpt runs/transfer/best.ckpt --folder /tmp/caltech34 --clients 8 --requests 50
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import torch
from common import caltech

from caltech_cli.images import find_images

BATCH = 32  # images in one network call, at most, for both servers
WAIT_S = 0.005  # how long a request waits for others to share its call, for both servers


def predict_throughput(ckpt: Path, images: Path, files: list[Path], work: Path) -> float:
    """``caltech predict``'s images/s over ``images`` (the folder of ``files``), less its start-up."""

    def run(folder: Path, name: str) -> float:
        return caltech(
            "predict", "--ckpt_path", str(ckpt), "--data.predict_dir", str(folder), "--data.tta_flip", "false",
            "--data.batch_size", str(BATCH), "--trainer.logger", "false", "--trainer.enable_progress_bar", "false",
            "--trainer.default_root_dir", str(work / name), cwd=work,
        ).seconds  # fmt: skip

    one = work / "one"
    one.mkdir()
    shutil.copy(files[0], one / files[0].name)
    startup = run(one, "startup")
    return len(files) / (run(images, "run") - startup)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start(command: list[str], url: str | None) -> tuple[subprocess.Popen, str, float]:
    """Start a server; its URL (read from its output when ``url`` is None) and the seconds
    until ``/health`` answered."""
    began = time.perf_counter()
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    # A session of its own: LitServe's worker processes go when the group is stopped.
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, start_new_session=True
    )
    if url is None:
        said = []  # the lines before it serves (the engine that runs the backbone, say)
        while not (found := re.search(r"^Serving .* at (http://\S+/) ", said[-1] if said else "")):
            said.append(process.stdout.readline())
            if not said[-1]:
                stop(process)
                sys.exit(f"the server did not start: {''.join(said)[-3000:]}")
        url = found[1]
    while time.perf_counter() - began < 300:
        try:
            if httpx.get(url + "health", timeout=2).status_code == 200:
                return process, url, time.perf_counter() - began
        except httpx.HTTPError:
            pass
        if process.poll() is not None:
            output = process.stdout.read()[-3000:]
            stop(process)
            sys.exit(f"the server stopped:\n{output}")
        time.sleep(0.05)
    stop(process)
    sys.exit("the server did not answer /health within 300 s")


def stop(process: subprocess.Popen) -> None:
    """Stop a server and every process it started."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def load(url: str, files: list[Path], clients: int, requests: int) -> tuple[list[float], float, int]:
    """``clients`` threads posting ``requests`` one-image requests each: the latencies (s), the
    wall time and the errors."""
    payloads = [(path.name, path.read_bytes()) for path in files]

    def client(index: int) -> tuple[list[float], int]:
        latencies, errors = [], 0
        with httpx.Client(timeout=120) as session:
            for i in range(requests):
                name, data = payloads[(index * requests + i) % len(payloads)]
                began = time.perf_counter()
                try:
                    answer = session.post(url + "predict", files=[("files", (name, data, "image/jpeg"))])
                    ok = answer.status_code == 200 and answer.json()["predictions"][0]["top"]
                except (httpx.HTTPError, ValueError, KeyError, IndexError):
                    ok = False
                latencies.append(time.perf_counter() - began)
                errors += not ok
        return latencies, errors

    began = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(client, range(clients)))
    wall = time.perf_counter() - began
    return [t for latencies, _ in results for t in latencies], wall, sum(errors for _, errors in results)


def report(label: str, startup: float, latencies: list[float], wall: float, errors: int, predict: float) -> None:
    times = torch.tensor(latencies)
    p50, p99 = (float(torch.quantile(times, q)) * 1000 for q in (0.5, 0.99))
    rate = len(latencies) / wall
    print(
        f"{label:<30} start-up {startup:5.1f} s   p50 {p50:6.0f} ms   p99 {p99:6.0f} ms   {rate:6.1f} img/s "
        f"({rate / predict:.2f} of predict's)   errors {errors}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", type=Path, required=True, help="a checkpoint written by `caltech fit`")
    parser.add_argument("--folder", type=Path, required=True, help="images to post (searched recursively)")
    parser.add_argument("--limit", type=int, default=400, help="use the first N images (default: 400)")
    parser.add_argument("--clients", type=int, default=8, help="concurrent clients (default: 8)")
    parser.add_argument("--requests", type=int, default=50, help="requests of each client (default: 50)")
    parser.add_argument("--litserve", action="store_true", help="measure LitServe with the same classifier too")
    args = parser.parse_args()
    args.ckpt = args.ckpt.resolve()
    work = Path(tempfile.mkdtemp(prefix="caltech-serve-bench-"))
    images = work / "images"
    images.mkdir()
    for i, path in enumerate(find_images(args.folder)[: args.limit]):
        shutil.copy(path, images / f"{i:05d}{path.suffix}")
    files = find_images(images)
    print(
        f"{len(files)} images, {args.clients} clients x {args.requests} requests of one image, "
        f"{len(os.sched_getaffinity(0))} CPU cores, torch {torch.__version__}"
    )
    predict = predict_throughput(args.ckpt, images, files, work)
    print(f"{'caltech predict (less start-up)':<30} {predict:6.1f} img/s (batch {BATCH})")
    serve = [sys.executable, "-m", "caltech_cli", "serve", "--ckpt_path", str(args.ckpt), "--port", "0",
             "--max_batch", str(BATCH), "--batch_wait_ms", str(WAIT_S * 1000)]  # fmt: skip
    cache = ["--cache_dir", str(work / "cache")]
    # A first start with a named engine exports the backbone's graph into the cache; auto runs it then.
    stop(start([*serve, *cache, "--engine", "onnxruntime"], None)[0])
    servers = [
        ("caltech serve, PyTorch", [*serve, "--engine", "torch"], None),
        ("caltech serve, auto engine", [*serve, *cache], None),
    ]
    if args.litserve:
        port = free_port()
        command = [sys.executable, str(Path(__file__).with_name("serve_litserve.py")), str(args.ckpt), str(port)]
        servers.append(("LitServe, same classifier", command, f"http://127.0.0.1:{port}/"))
    for label, command, url in servers:
        process, url, startup = start(command, url)
        try:
            engine = httpx.get(url + "info", timeout=10).json().get("engine")
            load(url, files[: args.clients], args.clients, 2)  # warm: every client's first request
            latencies, wall, errors = load(url, files, args.clients, args.requests)
        finally:
            stop(process)
        report(label, startup, latencies, wall, errors, predict)
        if engine:  # what ran the backbone, as the server says (an engine that failed falls back to torch)
            print(f"{'':<30} backbone on {engine}")
    shutil.rmtree(work)


if __name__ == "__main__":
    main()
