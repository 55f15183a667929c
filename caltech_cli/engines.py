"""A backbone that does not train, run on the fastest inference engine the CPU has.

On a CPU, ONNX Runtime and OpenVINO run a frozen backbone's forward pass faster than PyTorch's
eager mode, and ONNX Runtime keeps its pace when another process shares the cores, where
PyTorch's thread pool stalls (docs/performance.md#engines). What does not train goes through
:func:`backbone_runner`: the feature cache's pass, ``validate``, ``test`` and ``predict`` on
images, ``serve`` of a checkpoint. On a GPU the backbone runs on PyTorch, as it trains.

The engine's graph is exported by ``caltech`` from the backbone it holds: one ONNX file per
backbone weights (hashed), input size and exporter version, kept beside the feature cache under
the same lock, written to a temporary name and renamed when complete, and trusted as the feature
cache is (a folder of the user's). Before a pass the engine runs a probe batch beside PyTorch; a
graph that does not give PyTorch's features (within ``1e-4`` of the largest for float32) is
exported again, and one that still does not is left for PyTorch, saying so.
"""

from __future__ import annotations

import contextlib
import copy
import ctypes
import functools
import hashlib
import importlib
import importlib.metadata
import importlib.util
import logging
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from caltech_cli.devices import CPU_BATCH, Extractor
from caltech_cli.files import folder_lock, written_whole
from caltech_cli.text import reason

log = logging.getLogger(__name__)

Engine = Literal["auto", "torch", "onnxruntime", "openvino"]
# The engines ``auto`` tries on a CPU, fastest first as measured (docs/performance.md#engines):
# OpenVINO in bfloat16 where the CPU computes bfloat16 itself (twice ONNX Runtime's pace, the
# same test accuracy on Caltech-101), then ONNX Runtime, which keeps its pace beside a busy
# process better than OpenVINO in float32 does.
AUTO_ORDER = (("openvino", True), ("onnxruntime", False), ("openvino", False))
# Below this many images, ``auto`` runs a backbone whose graph is not built yet on PyTorch:
# exporting it costs about what an engine saves on that many (docs/performance.md#engines).
AUTO_MIN_IMAGES = 512
# How far an engine's float32 features may be from PyTorch's, as a share of the largest.
FP32_TOLERANCE = 1e-4
# A bfloat16 engine keeps 8 bits of mantissa: a few percent of the largest feature.
BF16_TOLERANCE = 0.1
GRAPH_VERSION = 1


@dataclass(frozen=True)
class Runner:
    """How a backbone pass runs: ``extract`` maps an image batch to features; ``name`` says on
    what (``torch``, ``onnxruntime 1.23.0 fp32``), for the feature cache's key and the logs."""

    extract: Extractor
    name: str


def weights_fingerprint(module: nn.Module) -> str:
    """sha256 over a module's class, parameter and buffer names, shapes, dtypes and bytes."""
    digest = hashlib.sha256(type(module).__qualname__.encode())
    for name, tensor in module.state_dict().items():
        flat = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        digest.update(flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b"")
    return digest.hexdigest()


def installed(engine: str) -> bool:
    return importlib.util.find_spec(engine) is not None


def save_onnx(network: nn.Module, example: torch.Tensor, path: Path, output_name: str) -> None:
    """Export ``network`` with torch's ONNX exporter (a dynamic batch), optimised, to ``path``."""
    missing = [m for m in ("onnx", "onnxscript") if not installed(m)]
    if missing:
        raise ImportError(f"the ONNX exporter needs {', '.join(missing)}")
    batch = torch.export.Dim("batch", min=1)
    program = torch.onnx.export(
        network,
        (example,),
        input_names=["images"],
        output_names=[output_name],
        dynamic_shapes=({0: batch},),
        dynamo=True,
        verbose=False,
    )
    program.optimize()
    program.save(str(path))


def graph_path(folder: Path, fingerprint: str, crop_size: int) -> Path:
    """Where the graph of a backbone with these weights and this input size is kept."""
    key = f"{GRAPH_VERSION}:{fingerprint}:{crop_size}:{torch.__version__}"
    return folder / "engines" / f"backbone-{hashlib.sha256(key.encode()).hexdigest()[:24]}.onnx"


def label(engine: str, bf16: bool) -> str:
    """What the features of ``engine`` are keyed and logged by: ``torch``, ``onnxruntime 1.23.0 fp32``."""
    if engine == "torch":
        return "torch"
    precision = "bf16" if bf16 and engine == "openvino" else "fp32"  # ONNX Runtime's CPU kernels are fp32
    try:
        version = importlib.metadata.version(engine)
    except importlib.metadata.PackageNotFoundError:  # installed under another name (onnxruntime-openvino, ...)
        version = importlib.import_module(engine).__version__
    return f"{engine} {version} {precision}"


def _session(engine: str, path: Path, bf16: bool) -> Callable[[torch.Tensor], torch.Tensor]:
    """An engine's compiled graph, as a function of one CPU batch."""
    threads = torch.get_num_threads()
    if engine == "onnxruntime":
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        # A spinning pool keeps its cores busy between calls, starving the loader's workers and any
        # other process on the machine (measured: a few images/s where it runs hundreds).
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.log_severity_level = 3
        session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        return lambda images: torch.from_numpy(session.run(None, {"images": images.numpy()})[0])
    import openvino
    from openvino.frontend import FrontEndManager

    precision = "bf16" if bf16 else "f32"
    # Read as ONNX, the only format caltech writes there: a damaged file is one error, where
    # OpenVINO's other readers would each try it and log their own.
    frontend = FrontEndManager().load_by_framework("onnx")
    compiled = openvino.Core().compile_model(
        frontend.convert(frontend.load(str(path))),
        "CPU",
        {"INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": precision},
    )
    request = compiled.create_infer_request()
    roomy_signal_stack()

    def run(images: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(request.infer([images.numpy()])[0].copy())

    return run


class _SignalStack(ctypes.Structure):
    """Linux's ``stack_t``, what ``sigaltstack`` takes and gives."""

    _fields_ = [("ss_sp", ctypes.c_void_p), ("ss_flags", ctypes.c_int), ("ss_size", ctypes.c_size_t)]


SS_ONSTACK, SS_DISABLE = 1, 2
# The alternate signal stack a thread is given instead of a smaller one, and the ones given so far
# (a stack must outlive every signal handled on it: they are kept for the life of the process).
SIGNAL_STACK_BYTES = 1 << 18
_signal_stacks: list[ctypes.Array] = []


def roomy_signal_stack() -> None:
    """Give this thread an alternate signal stack with room to spare, where it has a small one.

    OpenVINO's CPU plugin gives the thread that compiles a model an alternate signal stack of
    20,144 bytes here, the least the kernel asks for with AMX's tile registers. Once OpenVINO has
    used them (bfloat16 on an AMX CPU), a signal that Python handles on that stack, SIGCHLD when a
    loader worker ends, does not fit, and the kernel kills the process: `caltech predict`,
    `validate` and `test` on images ended in exit status 139 after their last batch, with or
    without persistent workers, and with the stack disabled or this one they end normally.
    """
    if not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    current = _SignalStack()
    if libc.sigaltstack(None, ctypes.byref(current)) != 0 or current.ss_flags & (SS_DISABLE | SS_ONSTACK):
        return  # none to widen, or a handler is running on it now
    if current.ss_size >= SIGNAL_STACK_BYTES:
        return
    stack = ctypes.create_string_buffer(SIGNAL_STACK_BYTES)
    wider = _SignalStack(ctypes.cast(stack, ctypes.c_void_p), 0, SIGNAL_STACK_BYTES)
    if libc.sigaltstack(ctypes.byref(wider), None) == 0:
        _signal_stacks.append(stack)


def _chunked(run: Callable[[torch.Tensor], torch.Tensor]) -> Extractor:
    """Batches in chunks of ``CPU_BATCH`` (an engine too is fastest on small batches on a CPU)."""

    def extract(images: torch.Tensor) -> torch.Tensor:
        images = images.float().contiguous()
        return torch.cat([run(chunk.contiguous()) for chunk in images.split(CPU_BATCH)])

    return extract


def _probe_gap(run: Callable[[torch.Tensor], torch.Tensor], backbone: nn.Module, crop_size: int) -> float:
    """How far the engine's features of a fixed probe batch are from PyTorch's, as a share of the largest."""
    probe = torch.randn(2, 3, crop_size, crop_size, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        expected = backbone(probe.to(next(backbone.parameters()).dtype)).float()
    got = run(probe)
    if got.shape != expected.shape or not torch.isfinite(got).all():
        return float("inf")
    return float((got - expected).abs().max() / expected.abs().max().clamp(min=torch.finfo(torch.float32).tiny))


@functools.cache
def native_bf16() -> bool:
    """Whether OpenVINO computes bfloat16 on this CPU itself (AVX-512 BF16, AMX), rather than
    emulating it in float32."""
    try:
        import openvino

        return "BF16" in openvino.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    except Exception:  # an OpenVINO that cannot say (no CPU plugin, a broken install): not asked to
        return False


@dataclass(frozen=True)
class Choice:
    """An engine and whether it runs in bfloat16."""

    engine: str
    bf16: bool = False


@dataclass(frozen=True)
class Options:
    """The options that messages name: ``predict``'s and ``fit``'s, or ``serve``'s own."""

    engine: str = "model.engine"
    folder: str = "data.cache_dir"


CLI_OPTIONS = Options()


def chosen(
    engine: str,
    device: torch.device,
    images: int,
    graph: Path | None,
    bf16: bool = False,
    quiet: bool = False,
    options: Options = CLI_OPTIONS,
) -> Choice:
    """What a pass runs on: ``auto`` is the fastest installed engine on a CPU (``AUTO_ORDER``;
    PyTorch for a short pass whose graph is not built yet); a GPU, or an engine not installed,
    runs PyTorch. ``bf16``: the trainer's precision is bfloat16, which a named engine keeps."""
    if engine == "torch":
        return Choice("torch", bf16)
    if device.type != "cpu":
        if engine != "auto" and not quiet:
            log.warning("%s %s runs on a CPU only; the backbone runs on PyTorch on %s", options.engine, engine, device)
        return Choice("torch", bf16)
    if engine == "auto":
        if images < AUTO_MIN_IMAGES and (graph is None or not graph.is_file()):
            return Choice("torch", bf16)
        for name, in_bf16 in AUTO_ORDER:
            if installed(name) and (not in_bf16 or native_bf16()):
                return Choice(name, bf16 or in_bf16)
        return Choice("torch", bf16)
    if not installed(engine):
        if not quiet:
            log.warning(
                "%s %s is not installed, so the backbone runs on PyTorch. Fix: pip install %s, or pass --%s auto",
                options.engine,
                engine,
                engine,
                options.engine.lstrip("-"),
            )
        return Choice("torch", bf16)
    return Choice(engine, bf16)


def planned(
    engine: str, device: torch.device, images: int, folder: Path | None, fingerprint: str, crop_size: int, bf16: bool
) -> str:
    """The label of the engine a pass of ``images`` images would run on, without building it."""
    graph = graph_path(folder, fingerprint, crop_size) if folder is not None else None
    choice = chosen(engine, device, images, graph, bf16, quiet=True)
    return label(choice.engine, choice.bf16)


def backbone_runner(
    backbone: nn.Module,
    fingerprint: str,
    crop_size: int,
    engine: str,
    torch_extract: Extractor,
    images: int,
    folder: Path | None,
    bf16: bool = False,
    options: Options = CLI_OPTIONS,
    part: str = "backbone",
) -> Runner:
    """The runner of a pass of ``images`` images through a backbone that does not train (or a
    ``part`` of it: partial fine-tuning's trunk): ``torch_extract`` (PyTorch, as the trainer runs
    the model), or the graph of ``engine`` for this backbone, kept in ``folder`` (a temporary
    folder when None), built when missing or damaged and checked against PyTorch before it runs."""
    device = next(backbone.parameters()).device
    graph = graph_path(folder, fingerprint, crop_size) if folder is not None else None
    choice = chosen(engine, device, images, graph, bf16, options=options)
    if choice.engine == "torch":
        return Runner(torch_extract, "torch")
    described = label(choice.engine, choice.bf16)
    # Without a folder to keep it in, the graph lives in a temporary one for this call.
    scratch = tempfile.TemporaryDirectory(prefix="caltech-engine-") if graph is None else contextlib.nullcontext()
    with scratch as where:
        graph = graph or graph_path(Path(where), fingerprint, crop_size)
        try:
            run = _checked_session(choice.engine, backbone, crop_size, graph, choice.bf16, options.folder)
        except Exception as error:  # the exporter or the engine failed: PyTorch runs the pass as before
            log.warning("The %s cannot run on %s (%s); it runs on PyTorch", part, described, reason(error))
            return Runner(torch_extract, "torch")
    log.info("The %s runs on %s", part, described)
    return Runner(_chunked(run), described)


def _checked_session(
    engine: str, backbone: nn.Module, crop_size: int, graph: Path, bf16: bool, option: str
) -> Callable[[torch.Tensor], torch.Tensor]:
    """The engine's session of ``graph``, exported first when missing, and again when the kept
    file is damaged or gives other features than PyTorch (``option`` names its folder's option)."""
    for path in (graph.parent, graph):
        if path.is_symlink():  # what is read or written through it would be wherever it points
            raise ValueError(f"{path} is a symbolic link; remove it, caltech makes it anew")
    graph.parent.mkdir(parents=True, exist_ok=True)
    with folder_lock(graph.parent / ".lock", option):
        if graph.is_file():
            try:
                return _verified(engine, backbone, crop_size, graph, bf16)
            except Exception as error:
                why = reason(error)
            log.warning("The engine graph %s cannot be used (%s); exporting it again", graph, why)
        network = copy.deepcopy(backbone).cpu().float().eval().to(memory_format=torch.contiguous_format)
        with written_whole(graph, option) as scratch:
            save_onnx(network, torch.zeros(2, 3, crop_size, crop_size), scratch, "features")
        return _verified(engine, backbone, crop_size, graph, bf16)


def _verified(
    engine: str, backbone: nn.Module, crop_size: int, graph: Path, bf16: bool
) -> Callable[[torch.Tensor], torch.Tensor]:
    """The engine's session of ``graph`` once the graph gives PyTorch's features in float32 (a
    graph changed by a few percent would pass bfloat16's looser check), and, for bfloat16, once
    its bfloat16 session stays near them too."""
    dtype = next(backbone.parameters()).dtype
    exact = _session(engine, graph, False)
    gap = _probe_gap(exact, backbone, crop_size)
    if gap > (FP32_TOLERANCE if dtype == torch.float32 else BF16_TOLERANCE):  # against a bfloat16 PyTorch too
        raise ValueError(f"its features are {gap:.2g} of the largest from PyTorch's")
    if not bf16:
        return exact
    run = _session(engine, graph, True)
    gap = _probe_gap(run, backbone, crop_size)
    if gap > BF16_TOLERANCE:
        raise ValueError(f"its bfloat16 features are {gap:.2g} of the largest from PyTorch's")
    return run
