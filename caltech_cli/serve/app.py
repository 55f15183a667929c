"""The server: ``POST /predict``, ``GET /health``, ``GET /info`` and the page at ``/``, on FastAPI.

Requests are read into memory under a size limit (nothing from a request reaches the disk), their
images decoded in worker threads with the checks ``caltech predict`` applies (a decompression
bomb, a sliver too thin to resize), and their network calls batched (``batching``). A request the
server cannot serve gets a 4xx and one line, ``{"error": "..."}``, and the server goes on.
"""

from __future__ import annotations

import asyncio
import io
import re
import warnings
from dataclasses import dataclass
from importlib.resources import files
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse
from PIL import Image
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from caltech_cli.images import FORMATS, UNREADABLE, size_problem
from caltech_cli.serve.batching import Batcher
from caltech_cli.serve.classifier import Classifier, describe
from caltech_cli.text import escaped

# The page may load only itself, and show the images the user picks (blob: URLs made in the page).
PAGE_POLICY = (
    "default-src 'none'; img-src 'self' blob: data:; style-src 'unsafe-inline'; script-src 'unsafe-inline'; "
    "connect-src 'self'"
)
IMAGE_TYPES = ("image/", "application/octet-stream")


@dataclass(frozen=True)
class Limits:
    """What one request may hold, and how long it may take to arrive."""

    max_bytes: int
    max_files: int
    # Pixels of all a request's images together: PIL's decompression-bomb limit for one image is
    # also the most one request may make the server decode.
    max_pixels: int = Image.MAX_IMAGE_PIXELS or 89_478_485
    # Seconds for the whole body to arrive: a client that sends a byte now and then does not hold
    # a connection for as long as it likes.
    body_seconds: float = 30.0


class RefusedError(Exception):
    """A request the server does not serve: an HTTP status and the line that says why."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


async def read_body(request: Request, limits: Limits) -> bytes:
    """The request's body, refused past ``limits.max_bytes`` bytes, whether it announced its
    length or not, and past ``limits.body_seconds`` to arrive."""
    limit = limits.max_bytes
    announced = request.headers.get("content-length", "")
    if announced and (not announced.isdigit() or int(announced) > limit):
        raise RefusedError(413, f"the request holds {escaped(announced[:40])} bytes, over the limit of {limit:,}")
    body = bytearray()
    try:
        async with asyncio.timeout(limits.body_seconds):
            async for chunk in request.stream():
                body += chunk
                if len(body) > limit:
                    raise RefusedError(413, f"the request holds more than {limit:,} bytes, the limit")
    except TimeoutError:
        raise RefusedError(408, f"the request took more than {limits.body_seconds:g} s to arrive") from None
    except ClientDisconnect:
        raise RefusedError(400, "the client left before its request arrived") from None
    return bytes(body)


def multipart_files(body: bytes, content_type: str, max_files: int) -> list[tuple[str, bytes]]:
    """The (file name, bytes) of each file part of a multipart body, parsed in memory."""
    _, params = parse_options_header(content_type)
    boundary = params.get(b"boundary")
    if not boundary:
        raise RefusedError(400, "a multipart/form-data request without its boundary")
    parts: list[dict[str, Any]] = []
    header: dict[str, bytearray] = {}

    def begin() -> None:
        parts.append({"headers": {}, "data": bytearray()})
        if len(parts) > 4 * max_files + 16:  # form fields that are not files count in no limit else
            raise RefusedError(413, f"the request holds more than {4 * max_files + 16} parts, the limit")

    def field(data: bytes, start: int, end: int) -> None:
        header.setdefault("field", bytearray()).extend(data[start:end])

    def value(data: bytes, start: int, end: int) -> None:
        header.setdefault("value", bytearray()).extend(data[start:end])

    def header_end() -> None:
        parts[-1]["headers"][bytes(header.pop("field", b"")).lower()] = bytes(header.pop("value", b""))

    def data(chunk: bytes, start: int, end: int) -> None:
        parts[-1]["data"].extend(chunk[start:end])

    callbacks = {
        "on_part_begin": begin,
        "on_header_field": field,
        "on_header_value": value,
        "on_header_end": header_end,
        "on_part_data": data,
    }
    try:
        parser = MultipartParser(boundary, callbacks)
        parser.write(body)
        parser.finalize()
    except RefusedError:
        raise
    except Exception as error:  # python-multipart's errors for bodies that are not multipart
        raise RefusedError(400, f"the multipart body cannot be read ({' '.join(str(error).split())[:120]})") from None
    found = []
    for number, part in enumerate(parts, 1):
        name = file_name(part["headers"].get(b"content-disposition", b""))
        if name is not None:  # a file; other fields are ignored
            found.append((name or f"file {number}", bytes(part["data"])))
    if len(found) > max_files:
        raise RefusedError(413, f"the request holds {len(found)} files, over the limit of {max_files}")
    return found


def file_name(disposition: bytes) -> str | None:
    """The file name of a part's Content-Disposition, "" for a file without one, None for a field
    that is not a file. Browsers send a name's UTF-8 bytes as they are (RFC 7578 forbids the
    ``filename*`` form, which python-multipart ignores)."""
    _, params = parse_options_header(disposition)
    if b"filename" in params:
        return params[b"filename"].decode("utf-8", "replace")
    return None


def request_files(body: bytes, content_type: str, limits: Limits) -> list[tuple[str, bytes]]:
    """The images of a request: the files of a multipart form, or the raw bytes of one image."""
    kind = content_type.split(";", 1)[0].strip().lower()
    if kind == "multipart/form-data":
        found = multipart_files(body, content_type, limits.max_files)
    elif kind.startswith(IMAGE_TYPES):
        found = [("image", body)] if body else []
    else:
        raise RefusedError(
            415,
            f"a request of type {escaped(kind) or 'none'}: POST images as multipart/form-data, or the bytes of one "
            "image with an image/* content type",
        )
    if not found:
        raise RefusedError(422, "the request holds no image")
    return found


def top(probs: Any, names: list[str], k: int) -> list[dict[str, Any]]:
    values, indices = probs.float().topk(min(k, len(names)))
    return [{"class": names[i], "probability": round(float(p), 6)} for p, i in zip(values.tolist(), indices.tolist())]


def pixels_of(data: bytes) -> int:
    """The pixels of an image file, from its header; 0 when it is not one, or is one that decoding
    refuses by itself (a decompression bomb): decoding then says why."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data), formats=FORMATS) as image:
                return 0 if size_problem(image.size) else image.width * image.height
    except UNREADABLE:
        return 0


def create_app(
    classifier: Classifier, batcher: Batcher, limits: Limits, top_k: int, hosts: tuple[str, ...] | None = None
) -> FastAPI:
    """The application; ``batcher`` runs ``classifier``'s network. With ``hosts``, a request whose
    Host header names another host is refused: a page elsewhere cannot then reach a server on
    127.0.0.1 through a name of its own that resolves there (DNS rebinding)."""
    app = FastAPI(title="caltech", docs_url=None, redoc_url=None, openapi_url=None)
    page = files("caltech_cli.serve").joinpath("page.html").read_text(encoding="utf-8")
    info = describe(classifier, top_k)

    @app.exception_handler(RefusedError)
    async def refused(request: Request, error: RefusedError) -> JSONResponse:
        return JSONResponse({"error": str(error)}, status_code=error.status)

    @app.exception_handler(StarletteHTTPException)
    async def not_served(request: Request, error: StarletteHTTPException) -> JSONResponse:
        """An unknown path (404) or method (405), answered like every other refusal."""
        return JSONResponse({"error": f"{error.detail}: {request.method} {escaped(request.url.path[:200])}"},
                            status_code=error.status_code, headers=error.headers)  # fmt: skip

    if hosts is not None:

        @app.middleware("http")
        async def known_host(request: Request, call_next: Any) -> Any:
            host = request.headers.get("host", "").rsplit(":", 1)[0].strip("[]").lower()
            if host not in hosts:
                return JSONResponse(
                    {"error": f"a request for host {escaped(host[:100])}: this server answers {', '.join(hosts)}"},
                    status_code=421,
                )
            return await call_next(request)

    @app.get("/", response_class=HTMLResponse)
    async def index() -> HTMLResponse:
        return HTMLResponse(page, headers={"Content-Security-Policy": PAGE_POLICY})

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "network_calls": batcher.calls}

    @app.get("/info")
    async def about() -> dict[str, Any]:
        return info

    @app.post("/predict")
    async def predict(request: Request) -> dict[str, Any]:
        body = await read_body(request, limits)
        found = request_files(body, request.headers.get("content-type", ""), limits)
        pixels = sum(pixels_of(data) for _, data in found)
        if pixels > limits.max_pixels:
            raise RefusedError(
                413, f"the request's images hold {pixels:,} pixels, over the limit of {limits.max_pixels:,} a request"
            )
        inputs = []
        for name, data in found:
            if await request.is_disconnected():  # no decoding, and no network call, for a client that left
                raise RefusedError(400, "the client left before its answer")
            try:
                inputs.append(await asyncio.to_thread(classifier.prepare, data))
            except UNREADABLE as error:
                said = re.sub(r"\s*<[^>]*>", "", str(error))  # not the reader's object address
                reason = " ".join(f"{type(error).__name__}: {said}".split())[:200]
                raise RefusedError(422, f"{escaped(name)} is not an image the model can read ({reason})") from None
        if await request.is_disconnected():
            raise RefusedError(400, "the client left before its answer")
        probs = await batcher(inputs)
        return {
            "predictions": [
                {"file": name, "top": top(row, classifier.class_names, top_k)} for (name, _), row in zip(found, probs)
            ]
        }

    return app
