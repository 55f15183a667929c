"""Options: a bad value is one line naming the option, the value and what it must be."""

from __future__ import annotations

import os
import sys

import pytest

from conftest import caltech, one_error, options, within


@pytest.mark.hostile
@pytest.mark.parametrize(
    ("bad", "says"),
    [
        (["--data.batch_size", "0"], "data.batch_size 0"),
        (["--data.feature_batch_size", "0"], "data.feature_batch_size 0"),
        (["--data.num_workers", "-1"], "data.num_workers -1"),
        (["--data.split", "[70, -10, 40]"], "data.split [70.0, -10.0, 40.0]"),
        (["--model.image_size", "0"], "model.image_size 0"),
        (["--data.crop_scale", "[1.0, 0.5]"], "data.crop_scale [1.0, 0.5]"),
        (["--optimizer.lr", "-0.001"], "optimizer.lr -0.001"),
        (["--data.cache_views", "-1"], "data.cache_views -1"),
        (["--data.batch_size", "many"], "--data.batch_size many: expected int"),
        (["--trainer.max_epochs", "x"], "--trainer.max_epochs x: expected int"),
        (["--data.batch_sise", "8"], "--data.batch_sise is not an option"),
        (["--model.weights", "IMAGENET9K"], "IMAGENET1K_V1"),
        (["--data.split", "[100, 0, 0]"], "leaves no images for val, test"),
        (["--data.split", "[.inf, 1, 1]"], "data.split [inf, 1.0, 1.0] cannot work"),
        (["--optimizer.init_args.lr", ".nan"], "optimizer.lr nan is not a number"),
        (["--optimizer.init_args.weight_decay", ".inf"], "optimizer.weight_decay inf is not a number"),
        (["--lr_scheduler.init_args.T_max", "0"], "lr_scheduler.T_max 0 cannot work: it must be 1 or more"),
        (["--data.max_extract_gb", ".nan"], "data.max_extract_gb nan cannot work"),
        (["--trainer.check_val_every_n_epoch", "0"], "trainer.check_val_every_n_epoch 0 cannot work"),
        (["--trainer.accumulate_grad_batches", "0"], "trainer.accumulate_grad_batches 0 cannot work"),
        (["--trainer.val_check_interval", "0"], "trainer.val_check_interval 0 cannot work"),
        (["--trainer.num_nodes", "0"], "trainer.num_nodes 0 cannot work"),
        (["--trainer.devices", "0"], "trainer.devices 0 runs on nothing"),
        (["--trainer.max_epochs", "-5"], "trainer.max_epochs -5 cannot work"),
        (["--trainer.limit_train_batches", "0"], "trainer.limit_train_batches 0 trains nothing"),
        (["--trainer.accelerator", "gpu"], "this machine has no GPU that PyTorch can use"),
        (["--trainer.precision", "bf16-true"], "trainer.precision bf16-true converts the network's weights"),
        (["--trainer.precision", "64"], "trainer.precision 64 converts the network's weights"),
        (["--checkpoint.save_top_k", "-5"], "checkpoint.save_top_k -5 cannot work"),
        (["--checkpoint.every_n_epochs", "-1"], "checkpoint.every_n_epochs -1 cannot work"),
        (["--checkpoint.monitor", "x/y"], "checkpoint.monitor x/y is not a figure the model logs"),
        (["--report.confused_examples", "1000000000"], "report.confused_examples 1000000000 cannot work"),
        (["--report.top_losses", "-3"], "report.top_losses -3 cannot work"),
        (["--wandb_samples.samples", "-1"], "wandb_samples.samples -1 cannot work"),
    ],
    ids=[
        "batch_size",
        "feature_batch_size",
        "num_workers",
        "split",
        "image_size",
        "crop_scale",
        "lr",
        "cache_views",
        "not-a-number",
        "trainer-type",
        "typo",
        "weights",
        "empty-split",
        "inf-split",
        "nan-lr",
        "inf-weight-decay",
        "zero-T_max",
        "nan-max_extract_gb",
        "check_val_every_n_epoch",
        "accumulate_grad_batches",
        "val_check_interval",
        "num_nodes",
        "devices",
        "max_epochs",
        "limit_train_batches",
        "no-gpu",
        "bf16-true",
        "64",
        "save_top_k",
        "every_n_epochs",
        "monitor",
        "confused_examples",
        "top_losses",
        "wandb_samples",
    ],
)
def test_a_bad_value_is_one_line(image_folder, tmp_path, capsys, bad, says):
    line = one_error(*caltech("fit", *options(tmp_path, image_folder, *bad), capsys=capsys))
    assert says in line
    assert not (tmp_path / "runs" / "checkpoints").exists(), "nothing was trained"


def laughs(levels: int = 9) -> str:
    """The "billion laughs": each level a list of nine aliases of the one before (9**levels values)."""
    lines = ['l0: &l0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    lines += [f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 9)}]" for i in range(1, levels + 1)]
    return "\n".join([*lines, "data:", "  init_args:", f"    classes: *l{levels}", ""])


@pytest.mark.hostile
def test_configs_and_values_past_the_limits_answer_at_once(image_folder, tmp_path, capsys):
    """A config of a few hundred bytes that expands to a billion values, an option value of
    megabytes, a value nested too deep for YAML: one line each, within seconds."""
    config = tmp_path / "laughs.yaml"
    config.write_text(laughs())
    assert config.stat().st_size < 1000
    with within(30):
        line = one_error(*caltech("fit", *options(tmp_path, image_folder), "--config", str(config), capsys=capsys))
        assert "expands to more than 100,000 values through its YAML aliases" in line
        many = "[" + ", ".join(f"c{i}" for i in range(200_000)) + "]"
        line = one_error(*caltech("fit", *options(tmp_path, image_folder), "--data.classes", many, capsys=capsys))
        assert "over the limit of 1,048,576" in line
        deep = "[" * 100_000 + "]" * 100_000
        line = one_error(*caltech("fit", *options(tmp_path, image_folder), "--data.classes", deep, capsys=capsys))
        assert "nests its values too deep" in line


@pytest.mark.hostile
def test_a_config_named_by_a_value_is_held_to_the_limits_too(image_folder, tmp_path, capsys):
    """jsonargparse reads a file that a group option (``--trainer``) or a config names, whatever
    its name ends in: the same limits hold there, and a FIFO is refused, not waited on."""
    bomb = tmp_path / "laughs"
    bomb.write_text(laughs().replace("data:\n  init_args:\n    classes:", "plugins:"))
    outer = tmp_path / "outer.yaml"
    outer.write_text(f"trainer: {bomb}\n")
    fifo = tmp_path / "fifo.yaml"
    os.mkfifo(fifo)
    nested_fifo = tmp_path / "nested.yaml"
    nested_fifo.write_text(f"trainer: {fifo}\n")
    with within(30):
        for more, says in [
            (["--trainer", str(bomb)], "expands to more than 100,000 values"),
            (["--config", str(outer)], "expands to more than 100,000 values"),
            (["--trainer", str(fifo)], f"--trainer: {fifo} is a FIFO, not a regular file"),
            (["--config", str(fifo)], f"--config: {fifo} is a FIFO"),
            (["--config", str(nested_fifo)], f"a config: {fifo} is a FIFO"),
        ]:
            assert says in one_error(*caltech("fit", *options(tmp_path, image_folder), *more, capsys=capsys))


EVIL = """import pathlib
pathlib.Path({marker!r}).write_text("imported")


class Evil:
    pass
"""


@pytest.mark.hostile
@pytest.mark.parametrize(
    ("config", "says"),
    [
        (
            "lr_scheduler:\n  class_path: torch.optim.lr_scheduler.LambdaLR\n  init_args:\n    lr_lambda: os._exit\n",
            "os._exit is not in a package caltech lets a config import",
        ),
        (
            "lr_scheduler:\n  class_path: torch.optim.lr_scheduler.LambdaLR\n  init_args:\n    lr_lambda: os.umask\n",
            "os.umask is not in a package caltech lets a config import",
        ),
        (
            "trainer:\n  callbacks:\n  - class_path: pytorch_lightning.callbacks.LambdaCallback\n    init_args:\n"
            "      on_fit_start: builtins.print\n",
            "builtins.print is not in a package caltech lets a config import",
        ),
        ("trainer:\n  callbacks:\n  - class_path: evilmod.Evil\n", "evilmod.Evil is not in a package"),
    ],
    ids=["os._exit", "os.umask", "builtins.print", "a-module-of-its-own"],
)
def test_a_config_names_only_what_caltech_trusts(image_folder, tmp_path, capsys, monkeypatch, config, says):
    """A callable-typed option takes no function outside torch, Lightning, torchmetrics, timm,
    caltech_cli and math, and a class path outside them is not even imported."""
    marker = tmp_path / "imported"
    (tmp_path / "evilmod.py").write_text(EVIL.format(marker=str(marker)))
    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "stranger.yaml").write_text(config)
    line = one_error(*caltech("fit", *options(tmp_path, image_folder), "--config", str(tmp_path / "stranger.yaml"),
                              capsys=capsys))  # fmt: skip
    assert says in line and "CALTECH_TRUSTED_IMPORTS" in line
    assert not marker.exists() and "evilmod" not in sys.modules
    assert not (tmp_path / "runs" / "checkpoints").exists()


def test_a_package_the_user_trusts_may_be_named(image_folder, tmp_path, capsys, monkeypatch):
    (tmp_path / "evilmod.py").write_text(EVIL.format(marker=str(tmp_path / "imported")))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("CALTECH_TRUSTED_IMPORTS", "evilmod")
    line = one_error(*caltech("fit", *options(tmp_path, image_folder), "--trainer.callbacks+=evilmod.Evil",
                              capsys=capsys))  # fmt: skip
    assert "not in a package" not in line, "imported; refused only as not a Callback"
    assert (tmp_path / "imported").exists()
    sys.modules.pop("evilmod", None)
