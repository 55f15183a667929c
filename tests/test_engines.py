"""engines: a backbone that does not train, on ONNX Runtime or OpenVINO, with PyTorch's features."""

from __future__ import annotations

import ctypes
import logging
import shutil
import sys
from pathlib import Path

import pytest
import torch

from caltech_cli import engines
from caltech_cli.backbones import resolve_backbone
from caltech_cli.engines import Choice, backbone_runner, chosen, graph_path, weights_fingerprint
from caltech_cli.model import TransferClassifier

from conftest import FINETUNE, TRANSFER, caltech, csv_rows, options, run_caltech, small_run

INSTALLED = [name for name in ("onnxruntime", "openvino") if engines.installed(name)]
CROP = 64


def backbone(seed: int = 0) -> torch.nn.Module:
    """MobileNetV2 with its ImageNet weights, without its classifier, as caltech holds it; with
    ``seed``, its last layer's scale changed (other weights, other features)."""
    network = resolve_backbone("mobilenet_v2", "IMAGENET1K_V1", CROP).module
    if seed:
        with torch.no_grad():
            network.features[-1][1].weight.mul_(1 + 0.5 * seed)
    return network.eval().requires_grad_(False).to(memory_format=torch.channels_last)


def on_torch(network: torch.nn.Module):
    def extract(images: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return network(images.contiguous(memory_format=torch.channels_last))

    return extract


def runner_of(network: torch.nn.Module, engine: str, folder: Path, bf16: bool = False) -> engines.Runner:
    fingerprint = weights_fingerprint(network)
    return backbone_runner(network, fingerprint, CROP, engine, on_torch(network), 10_000, folder, bf16)


@pytest.fixture(scope="session")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder with the graphs of ``backbone(0)`` and ``backbone(1)``, exported once (an export
    takes seconds); tests copy it, and each engine then runs a kept graph."""
    folder = tmp_path_factory.mktemp("graphs")
    if INSTALLED:
        for seed in (0, 1):
            assert runner_of(backbone(seed), INSTALLED[0], folder).name != "torch"
    return folder


def kept(exported: Path, folder: Path) -> Path:
    shutil.copytree(exported, folder, dirs_exist_ok=True)
    return folder


def images(count: int = 6) -> torch.Tensor:
    return torch.randn(count, 3, CROP, CROP, generator=torch.Generator().manual_seed(1))


def gap(got: torch.Tensor, expected: torch.Tensor) -> float:
    return float((got - expected).abs().max() / expected.abs().max())


@pytest.mark.parametrize("engine", INSTALLED)
def test_an_engine_gives_the_features_of_pytorch(engine, exported, tmp_path, caplog):
    """Each engine runs the graph caltech exported (the fixture) with PyTorch's features; a kept
    graph is not exported again, and other weights have a graph of their own."""
    kept(exported, tmp_path)
    network, other = backbone(), backbone(seed=1)
    graphs = {graph_path(tmp_path, weights_fingerprint(n), CROP) for n in (network, other)}
    assert len(graphs) == 2 and all(graph.is_file() for graph in graphs)
    built = {graph: graph.stat().st_mtime_ns for graph in graphs}
    with caplog.at_level(logging.INFO, logger="caltech_cli"):
        runner = runner_of(network, engine, tmp_path)
    assert runner.name.startswith(engine) and runner.name.endswith("fp32"), runner.name
    batch = images(7)  # not a multiple of the chunk
    assert gap(runner.extract(batch), on_torch(network)(batch)) < 1e-4
    assert gap(runner_of(other, engine, tmp_path).extract(batch), on_torch(other)(batch)) < 1e-4
    assert {graph: graph.stat().st_mtime_ns for graph in graphs} == built, "a kept graph is not exported again"
    assert "exporting" not in caplog.text


@pytest.mark.skipif("openvino" not in INSTALLED, reason="OpenVINO is not installed")
def test_openvino_in_bf16_is_named_so_and_stays_near(exported, tmp_path):
    network = backbone()
    runner = runner_of(network, "openvino", kept(exported, tmp_path), bf16=True)
    assert runner.name.endswith("bf16")
    batch = images()
    assert gap(runner.extract(batch), on_torch(network)(batch)) < engines.BF16_TOLERANCE


@pytest.mark.hostile
@pytest.mark.skipif("onnxruntime" not in INSTALLED, reason="ONNX Runtime is not installed")
@pytest.mark.parametrize("damage", ["truncated", "another backbone's"])  # each exports again: seconds
def test_a_damaged_or_altered_graph_is_exported_again(damage, exported, tmp_path, caplog):
    """A kept graph is checked against PyTorch before it runs: one that fails to load, or gives
    other features (another backbone's graph put in its place), is exported again."""
    network = backbone()
    graph = graph_path(kept(exported, tmp_path), weights_fingerprint(network), CROP)
    if damage == "truncated":
        graph.write_bytes(graph.read_bytes()[:5000])
    else:
        graph.write_bytes(graph_path(tmp_path, weights_fingerprint(backbone(seed=1)), CROP).read_bytes())
    with caplog.at_level(logging.WARNING, logger="caltech_cli"):
        runner = runner_of(network, "onnxruntime", tmp_path)
    said = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(said) == 1 and "cannot be used" in said[0] and "exporting it again" in said[0], caplog.text
    batch = images()
    assert gap(runner.extract(batch), on_torch(network)(batch)) < 1e-4


def scaled(graph: Path, factor: float) -> None:
    """The graph at ``graph``, its output multiplied by ``factor``: an altered graph."""
    import numpy as np
    import onnx

    model = onnx.load(str(graph))
    out = model.graph.output[0].name
    for node in model.graph.node:
        node.output[:] = [f"{name}_raw" if name == out else name for name in node.output]
    model.graph.initializer.append(onnx.numpy_helper.from_array(np.array(factor, dtype=np.float32), "factor"))
    model.graph.node.append(onnx.helper.make_node("Mul", [f"{out}_raw", "factor"], [out]))
    onnx.save(model, str(graph))


@pytest.mark.hostile
@pytest.mark.skipif("openvino" not in INSTALLED, reason="OpenVINO is not installed")
def test_a_graph_altered_within_bfloat16s_tolerance_is_exported_again(exported, tmp_path, caplog):
    """A bfloat16 engine's features are a few percent off PyTorch's, so the graph itself is checked
    in float32: one whose features were scaled by 8% is exported again, not run in bfloat16."""
    network = backbone()
    graph = graph_path(kept(exported, tmp_path), weights_fingerprint(network), CROP)
    scaled(graph, 1.08)
    with caplog.at_level(logging.WARNING, logger="caltech_cli"):
        runner = runner_of(network, "openvino", tmp_path, bf16=True)
    said = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(said) == 1 and "exporting it again" in said[0], caplog.text
    assert runner.name.endswith("bf16")
    batch = images()
    assert gap(runner.extract(batch), on_torch(network)(batch)) < 0.06


def test_serve_names_its_own_options_in_the_engines_messages(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(engines, "installed", lambda name: False)
    with caplog.at_level(logging.WARNING, logger="caltech_cli"):
        chosen("openvino", torch.device("cpu"), 10, None, options=engines.Options("--engine", "cache_dir"))
    said = caplog.records[0].getMessage()
    assert said.startswith("--engine openvino is not installed") and said.endswith("pass --engine auto"), said


def test_an_engine_that_is_not_installed_leaves_the_pass_to_pytorch_in_one_line(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(engines, "installed", lambda name: False)
    with caplog.at_level(logging.WARNING, logger="caltech_cli"):
        runner = runner_of(backbone(), "openvino", tmp_path)
    said = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert runner.name == "torch" and len(said) == 1 and "pip install openvino" in said[0], said
    assert runner_of(backbone(), "auto", tmp_path).name == "torch"


def test_auto_runs_short_passes_on_pytorch_and_gpus_on_pytorch(tmp_path, caplog):
    graph = tmp_path / "graph.onnx"
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    fastest = chosen("auto", cpu, engines.AUTO_MIN_IMAGES, graph)
    assert fastest.engine in (*INSTALLED, "torch")
    assert chosen("auto", cpu, 10, graph) == Choice("torch"), "exporting costs more than a short pass saves"
    graph.write_bytes(b"kept")
    assert chosen("auto", cpu, 10, graph) == fastest, "a kept graph costs nothing to build"
    assert chosen("torch", cpu, 10_000, graph) == Choice("torch")
    with caplog.at_level(logging.WARNING, logger="caltech_cli"):
        assert chosen("auto", gpu, 10_000, graph) == Choice("torch") and not caplog.records
        assert chosen("onnxruntime", gpu, 10_000, graph) == Choice("torch")
    assert "runs on a CPU only" in caplog.records[0].getMessage()


@pytest.mark.parametrize("native", [True, False])
def test_auto_runs_openvino_in_bf16_only_where_the_cpu_computes_bf16(native, tmp_path, monkeypatch):
    """auto: OpenVINO in bfloat16 where the CPU computes it (measured: the same accuracy, twice
    ONNX Runtime's pace), else ONNX Runtime in float32; a named engine keeps the trainer's precision."""
    monkeypatch.setattr(engines, "installed", lambda name: True)
    monkeypatch.setattr(engines, "native_bf16", lambda: native)
    cpu = torch.device("cpu")
    expected = Choice("openvino", True) if native else Choice("onnxruntime", False)
    assert chosen("auto", cpu, 10_000, None) == expected
    assert chosen("openvino", cpu, 10_000, None) == Choice("openvino", False)
    assert chosen("openvino", cpu, 10_000, None, bf16=True) == Choice("openvino", True)
    assert chosen("onnxruntime", cpu, 10_000, None, bf16=True).engine == "onnxruntime"
    monkeypatch.setattr(engines, "installed", lambda name: name == "openvino")
    assert chosen("auto", cpu, 10_000, None) == Choice("openvino", native)


@pytest.mark.skipif(not INSTALLED, reason="no engine is installed")
def test_auto_names_for_the_cache_key_the_engine_it_runs(exported, tmp_path):
    """The feature cache's key is chosen before the pass (``planned``): it names what then runs."""
    network, folder = backbone(), kept(exported, tmp_path)
    fingerprint = weights_fingerprint(network)
    plan = engines.planned("auto", torch.device("cpu"), 10_000, folder, fingerprint, CROP, False)
    assert plan == runner_of(network, "auto", folder).name != "torch"


@pytest.mark.skipif("openvino" not in INSTALLED, reason="OpenVINO is not installed")
def test_the_cpu_is_asked_whether_it_computes_bf16():
    flags = Path("/proc/cpuinfo").read_text().split() if Path("/proc/cpuinfo").is_file() else None
    if flags is None:
        pytest.skip("no /proc/cpuinfo to compare with")
    assert engines.native_bf16() == any(flag in flags for flag in ("avx512_bf16", "amx_bf16"))


@pytest.mark.e2e
@pytest.mark.skipif("onnxruntime" not in INSTALLED, reason="ONNX Runtime is not installed")
def test_the_feature_cache_keys_the_engine_and_predict_agrees_across_engines(image_folder, tmp_path, capsys):
    """The same fit on PyTorch and on ONNX Runtime caches features under two keys (the engine and its
    precision are part of the key), and predict on either engine gives the same probabilities."""
    for engine in ("torch", "onnxruntime"):
        status, stderr = caltech("fit", *options(tmp_path, image_folder, "--model.engine", engine), capsys=capsys)
        assert status == 0, stderr[-3000:]
    cache = tmp_path / "data" / "feature-cache"
    assert len(list(cache.glob("train-*.pt"))) == 2 and len(list(cache.glob("engines/*.onnx"))) == 1
    photos = image_folder / "circles"
    probabilities = {}
    for engine in ("torch", "onnxruntime"):
        status, stderr = caltech(
            "predict", *options(tmp_path, image_folder), "--ckpt_path", str(tmp_path / "runs" / "best.ckpt"),
            "--data.predict_dir", str(photos), "--model.engine", engine,
            "--trainer.default_root_dir", str(tmp_path / engine), capsys=capsys,
        )  # fmt: skip
        assert status == 0, stderr[-3000:]
        assert ("The backbone runs on onnxruntime" in stderr) == (engine == "onnxruntime"), stderr[-3000:]
        rows = csv_rows(tmp_path / engine / "predictions.csv")
        probabilities[engine] = torch.tensor([float(row["probability"]) for row in rows])
        assert len(rows) == 13
    assert torch.allclose(probabilities["torch"], probabilities["onnxruntime"], atol=1e-4)


def test_other_weights_never_meet_the_engine_of_the_ones_before(exported, tmp_path):
    """Loading other weights into the model drops its engine: the features are those of the new weights."""
    model = TransferClassifier(image_size=CROP, class_names=["a", "b"])
    runner = model.backbone_runner(10_000, kept(exported, tmp_path))
    assert runner.name != "torch"
    batch = images()
    state = {name: tensor * 0.5 if name.endswith("features.18.1.weight") else tensor
             for name, tensor in model.state_dict().items()}  # fmt: skip
    model.load_state_dict(state)
    assert gap(model.features(batch), on_torch(model.backbone)(batch)) < 1e-6


@pytest.mark.hostile
def test_a_link_in_the_engines_folder_is_not_followed(tmp_path, caplog):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "engines").symlink_to(elsewhere)
    with caplog.at_level(logging.WARNING, logger="caltech_cli"):
        runner = runner_of(backbone(), INSTALLED[0], tmp_path / "cache")
    said = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert runner.name == "torch" and len(said) == 1 and "symbolic link" in said[0], said
    assert not list(elsewhere.iterdir())


@pytest.mark.e2e
def test_a_fit_says_once_that_its_engine_is_missing_and_a_backbone_that_trains_gets_none(
    image_folder, tmp_path, monkeypatch, capsys
):
    """Without the cache every epoch's training and validation see images: the missing engine is
    said once. A backbone that fine-tuning unfreezes later in the fit never runs on an engine,
    not even in its frozen epochs, and gets no graph exported."""
    monkeypatch.setattr(engines, "installed", lambda name: False)
    run = options(tmp_path / "frozen", image_folder, "--data.cache_features", "false", "--trainer.max_epochs", "2")
    status, stderr = caltech("fit", *run, "--model.engine", "openvino", capsys=capsys)
    assert status == 0, stderr[-3000:]
    assert stderr.count("model.engine openvino is not installed") == 1, stderr[-3000:]
    monkeypatch.undo()
    run = [*small_run(tmp_path / "tuned", str(image_folder), config=FINETUNE), "--trainer.logger", "false"]
    run += ["--trainer.max_epochs", "2", "--trainer.callbacks.unfreeze_at_epoch", "1"]
    status, stderr = caltech("fit", *run, "--model.engine", "onnxruntime", capsys=capsys)
    assert status == 0, stderr[-3000:]
    assert "runs on onnxruntime" not in stderr and not list((tmp_path / "tuned").rglob("*.onnx"))
    checkpoint = str(tmp_path / "tuned" / "runs" / "best.ckpt")
    status, stderr = caltech("test", *run, "--model.engine", "onnxruntime", "--ckpt_path", checkpoint, capsys=capsys)
    assert status == 0 and "The backbone runs on onnxruntime" in stderr, "its checkpoint tests on the engine"


class SignalStack(ctypes.Structure):
    _fields_ = [("ss_sp", ctypes.c_void_p), ("ss_flags", ctypes.c_int), ("ss_size", ctypes.c_size_t)]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="sigaltstack as Linux has it")
def test_a_small_alternate_signal_stack_is_widened():
    """The 20,144 bytes OpenVINO gives the thread that compiles a model: widened; the thread's own
    stack put back afterwards (pytest's fault handler has one)."""
    libc = ctypes.CDLL(None, use_errno=True)
    before = SignalStack()
    assert libc.sigaltstack(None, ctypes.byref(before)) == 0
    small = ctypes.create_string_buffer(20_144)
    try:
        assert libc.sigaltstack(ctypes.byref(SignalStack(ctypes.cast(small, ctypes.c_void_p), 0, 20_144)), None) == 0
        engines.roomy_signal_stack()
        now = SignalStack()
        libc.sigaltstack(None, ctypes.byref(now))
        assert now.ss_size == engines.SIGNAL_STACK_BYTES and now.ss_sp != ctypes.cast(small, ctypes.c_void_p).value
    finally:
        libc.sigaltstack(ctypes.byref(before), None)


@pytest.mark.e2e
@pytest.mark.skipif("openvino" not in INSTALLED, reason="OpenVINO is not installed")
def test_predict_on_openvino_in_bf16_beside_loader_workers_ends_normally(trained_run, tmp_path):
    """OpenVINO in bfloat16 (AMX where the CPU has it) in the process whose loader workers end as
    the last batch is read: the command ends with status 0, its predictions written."""
    photos = tmp_path / "photos"
    photos.mkdir()
    for path in sorted((trained_run.root / "data").glob("**/image_000*.jpg"))[:24]:
        shutil.copy(path, photos / f"{path.parent.name}-{path.name}")
    run = [
        "predict", "--config", TRANSFER, "--ckpt_path", str(trained_run.best), "--data.predict_dir", str(photos),
        "--trainer.logger", "false", "--trainer.default_root_dir", str(tmp_path / "out"), "--model.engine", "openvino",
        "--trainer.precision", "bf16-mixed", "--data.batch_size", "4", "--data.num_workers", "2",
    ]  # fmt: skip
    result = run_caltech(*run, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "runs on openvino" in result.stderr and len(csv_rows(tmp_path / "out" / "predictions.csv")) == 24
