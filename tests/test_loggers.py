"""W&B logging goes offline by itself and never prompts."""

from __future__ import annotations

import time

import pytest

from caltech_cli import loggers


@pytest.fixture
def no_credentials(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_BASE_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))


def test_no_credentials_means_offline(no_credentials):
    reason = loggers.offline_reason()
    assert reason is not None and "wandb login" in reason


def test_unreachable_server_means_offline_quickly(no_credentials, monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    monkeypatch.setenv("WANDB_BASE_URL", "https://127.0.0.1:9")  # nothing listens on the discard port
    start = time.monotonic()
    reason = loggers.offline_reason()
    assert reason is not None and "cannot reach 127.0.0.1:9" in reason
    assert time.monotonic() - start < loggers.CONNECT_TIMEOUT_S + 1


def test_netrc_entry_counts_as_credentials(no_credentials, tmp_path, monkeypatch):
    (tmp_path / "netrc").write_text("machine api.wandb.ai login user password " + "k" * 40 + "\n")
    assert loggers._has_credentials("api.wandb.ai")


def test_user_choice_is_respected(no_credentials, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert loggers.offline_reason() is None


def test_logger_goes_offline_and_says_so(no_credentials, tmp_path, caplog):
    with caplog.at_level("INFO"):
        logger = loggers.WandbLogger(save_dir=str(tmp_path / "runs"))
    assert logger._offline is True
    assert "logging offline to" in caplog.text and "wandb sync" in caplog.text
