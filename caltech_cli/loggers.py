"""Weights & Biases logging that never prompts and never hangs.

Without credentials, or without a route to the W&B server, the run logs offline into a local
folder that ``wandb sync`` uploads later, and says so in one line. ``WANDB_MODE`` (``offline``,
``disabled``) set by the user is respected as it is.
"""

from __future__ import annotations

import netrc
import os
import socket
from pathlib import Path
from urllib.parse import urlparse

from pytorch_lightning.loggers import WandbLogger as LightningWandbLogger
from pytorch_lightning.utilities import rank_zero_info

CONNECT_TIMEOUT_S = 3.0


def _wandb_host() -> tuple[str, int]:
    url = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai"))
    return url.hostname or "api.wandb.ai", url.port or (443 if url.scheme == "https" else 80)


def _has_credentials(host: str) -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    path = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    try:
        return path.is_file() and netrc.netrc(path).authenticators(host) is not None
    except (netrc.NetrcParseError, OSError):
        return False


def offline_reason() -> str | None:
    """Why this run cannot log online (no credentials, no route), or None when it can."""
    if os.environ.get("WANDB_MODE") in ("offline", "dryrun", "disabled"):
        return None  # the user chose; wandb itself honours it
    host, port = _wandb_host()
    if not _has_credentials(host):
        return f"no W&B credentials for {host} (run `wandb login` or set WANDB_API_KEY)"
    try:
        socket.create_connection((host, port), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as error:
        return f"cannot reach {host}:{port} ({error})"
    return None


class WandbLogger(LightningWandbLogger):
    """Lightning's ``WandbLogger`` that goes offline by itself when it cannot log online.

    Args:
        project: W&B project.
        name: Run name shown in W&B.
        save_dir: Folder for the local run files (``<save_dir>/wandb``); null means
            ``trainer.default_root_dir`` under ``caltech`` (the current folder in Python), so a
            run's folder holds all of it.
        offline: Force offline logging; null decides from credentials and network.
        log_model: Upload checkpoints as W&B artifacts (online only).
        entity: W&B user or team.
        tags: Tags for the run.
    """

    def __init__(
        self,
        project: str = "caltech",
        name: str | None = None,
        save_dir: str | None = None,
        offline: bool | None = None,
        log_model: bool = False,
        entity: str | None = None,
        tags: list[str] | None = None,
    ) -> None:
        save_dir = save_dir or "."
        if offline is None:
            reason = offline_reason()
            offline = reason is not None
            if reason:
                rank_zero_info(f"W&B: {reason}; logging offline to {save_dir}/wandb, upload later with `wandb sync`.")
        Path(save_dir).mkdir(parents=True, exist_ok=True)
        super().__init__(
            project=project,
            name=name,
            save_dir=save_dir,
            offline=offline,
            log_model=log_model and not offline,
            entity=entity,
            tags=tags,
        )
