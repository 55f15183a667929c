"""``caltech serve``: a checkpoint or an exported ONNX file behind a local HTTP server.

    caltech serve --ckpt_path runs/transfer/best.ckpt            # http://127.0.0.1:8000/
    curl -F files=@photo.jpg http://127.0.0.1:8000/predict       # the top classes, as JSON

``POST /predict`` takes images as multipart/form-data (any number of files, up to --max_files) or
the bytes of one image (an image/* content type) and answers, for each, the top classes with the
probabilities ``caltech predict`` writes for the same file; ``GET /info`` describes the model,
``GET /health`` says the server is up, and ``/`` is a page to drop images on. The server listens
on 127.0.0.1 unless told otherwise (--host 0.0.0.0 serves the whole network: do so only behind
what you trust).
"""

from __future__ import annotations

import argparse
import logging
import os
import socket
from pathlib import Path

from caltech_cli.errors import CaltechError
from caltech_cli.files import writable_folder
from caltech_cli.text import shown

log = logging.getLogger(__name__)


def _positive(kind: type) -> object:
    def parse(text: str) -> object:
        value = kind(text)
        if not value > 0:
            raise argparse.ArgumentTypeError(f"{text} is not above 0")
        return value

    return parse


def parser() -> argparse.ArgumentParser:
    options = argparse.ArgumentParser(
        prog="caltech serve", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    model = options.add_mutually_exclusive_group(required=True)
    model.add_argument("--ckpt_path", type=Path, help="a checkpoint written by `caltech fit`")
    model.add_argument("--onnx", type=Path, help="an ONNX file written by `caltech export`")
    options.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, this machine only)"
    )
    options.add_argument("--port", type=int, default=8000, help="port to listen on (default: 8000; 0 picks a free one)")
    options.add_argument(
        "--tta_flip",
        choices=("true", "false"),
        default="false",
        help="average each image with its mirror image, as predict does with --data.tta_flip true (default: false)",
    )
    options.add_argument(
        "--engine",
        choices=("auto", "torch", "onnxruntime", "openvino"),
        help="what runs a checkpoint's backbone on a CPU, as --model.engine does for predict; auto: the fastest "
        "engine where its graph is kept in --cache_dir (a fit there kept it), else PyTorch at once; a named "
        "engine exports its graph at start-up when it is not kept (seconds) (default: auto)",
    )
    options.add_argument(
        "--cache_dir",
        type=Path,
        help=f"where the engines' graphs are kept: fit's and predict's data.cache_dir (default: {CACHE_DIR}, "
        "theirs when run from the same folder)",
    )
    options.add_argument("--top_k", type=_positive(int), default=5, help="classes answered per image (default: 5)")
    options.add_argument(
        "--max_request_mb", type=_positive(float), default=20.0, help="the largest request, in MiB (default: 20)"
    )
    options.add_argument(
        "--max_files", type=_positive(int), default=16, help="images in one request, at most (default: 16)"
    )
    options.add_argument(
        "--max_batch", type=_positive(int), default=32, help="images in one network call, at most (default: 32)"
    )
    options.add_argument(
        "--body_timeout_s",
        type=_positive(float),
        default=30.0,
        help="seconds a request's body may take to arrive (default: 30)",
    )
    options.add_argument(
        "--max_connections",
        type=_positive(int),
        default=64,
        help="connections served at once; more are answered 503 at once (default: 64)",
    )
    options.add_argument(
        "--batch_wait_ms",
        type=float,
        default=5.0,
        help="how long a request waits for others to share its network call (default: 5 ms)",
    )
    return options


def _listening_socket(host: str, port: int) -> socket.socket:
    """The server's socket, bound here so that a port in use is one line and port 0 names a free one."""
    try:
        info = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(info[0], socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(info[4])
    except OSError as error:
        raise CaltechError(
            f"cannot listen on {host}:{port} ({error.strerror or error}). Fix: pass --port another port, or --host "
            "an address of this machine."
        ) from error
    sock.listen(128)
    return sock


# Where the engines' graphs are kept unless --cache_dir says: fit's and predict's data.cache_dir
# when they run from the same folder.
CACHE_DIR = Path("data/feature-cache")
# Names of this machine's loopback: a server bound there answers requests for these hosts only.
LOOPBACK = ("127.0.0.1", "localhost", "::1")


def _check(options: argparse.Namespace) -> None:
    """Refuse option values that cannot work, in one line; fill in the engine's defaults."""
    if options.onnx is not None:
        for given in ("engine", "cache_dir"):
            if getattr(options, given) is not None:
                raise CaltechError(
                    f"--{given} is for a checkpoint's backbone; an ONNX file runs on ONNX Runtime. Fix: drop "
                    f"--{given}, or serve the checkpoint with --ckpt_path."
                )
    options.engine = options.engine or "auto"
    options.cache_dir = options.cache_dir or CACHE_DIR
    # A named engine may export its graph there; auto only reads one that is there already.
    kept = options.cache_dir.exists() or options.cache_dir.is_symlink()
    if options.ckpt_path is not None and options.engine != "torch" and (options.engine != "auto" or kept):
        writable_folder(options.cache_dir, "cache_dir")
    for option, value, low, high in (
        ("port", options.port, 0, 65535),
        ("max_request_mb", options.max_request_mb, 0.01, 2048),
        ("batch_wait_ms", options.batch_wait_ms, 0, 10_000),
        ("body_timeout_s", options.body_timeout_s, 0.1, 3600),
    ):
        if not low <= value <= high:  # nan is in no range
            raise CaltechError(f"--{option} {value} cannot work. Fix: pass --{option} from {low} to {high}.")


def main(args: list[str]) -> None:
    options = parser().parse_args(args)
    _check(options)
    try:
        import uvicorn

        from caltech_cli.serve.app import Limits, create_app
    except ImportError as error:
        raise CaltechError(
            f"caltech serve needs the server packages ({error.name} is missing). "
            "Fix: pip install 'caltech-cli[serve]' (FastAPI, uvicorn, python-multipart)."
        ) from error
    from caltech_cli.serve.batching import Batcher
    from caltech_cli.serve.classifier import from_checkpoint, from_onnx

    tta = options.tta_flip == "true"
    if options.ckpt_path:
        classifier = from_checkpoint(options.ckpt_path, tta, options.engine, options.cache_dir)
    else:
        classifier = from_onnx(options.onnx, tta)
    batcher = Batcher(classifier.probabilities, options.max_batch, options.batch_wait_ms / 1000)
    limits = Limits(int(options.max_request_mb * 2**20), options.max_files, body_seconds=options.body_timeout_s)
    app = create_app(classifier, batcher, limits, options.top_k, LOOPBACK if options.host in LOOPBACK else None)
    sock = _listening_socket(options.host, options.port)
    host, port = sock.getsockname()[:2]
    print(
        f"Serving {shown(classifier.info['source'])} at http://{host}:{port}/ (POST /predict, GET /info, "
        "GET /health); Ctrl-C stops it.",
        flush=True,
    )
    # python-multipart logs what it makes of a malformed body; the client hears of it instead.
    logging.getLogger("python_multipart").setLevel(logging.ERROR)
    config = uvicorn.Config(
        app,
        log_level=os.environ.get("CALTECH_SERVE_LOG", "warning"),
        access_log=False,
        limit_concurrency=options.max_connections,
    )
    uvicorn.Server(config).run(sockets=[sock])
