"""What a device asks of the batches a backbone runs: their size on a CPU, one shape on a GPU."""

from __future__ import annotations

from collections.abc import Callable

import torch

# Images per forward pass of a backbone that does not train, on a CPU. MobileNetV2's largest
# activation is about 5 MB an image at 224 pixels, so small channels-last batches keep them in the
# last-level cache (docs/performance.md has the measurements).
CPU_BATCH = 4
Extractor = Callable[[torch.Tensor], torch.Tensor]


def cpu_computes_bf16() -> bool:
    """Whether this CPU computes bfloat16 itself (AVX-512 BF16 or AMX), where PyTorch's bf16
    autocast trains faster than float32 rather than emulating it more slowly."""
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, check, lambda: False)() for check in checks)


def runs_on_cpu(accelerator: object) -> bool:
    """Whether a trainer with this ``trainer.accelerator`` runs on the CPU."""
    if accelerator == "cpu":
        return True
    return accelerator in (None, "auto") and not torch.cuda.is_available() and not torch.backends.mps.is_available()


def warm_up(extract: Extractor, device: torch.device, batch_size: int, crop_size: int) -> None:
    """On a GPU, one forward pass of a blank batch of the pass's shape while the loader workers
    decode the first real batches. The first batch of each new shape costs the device seconds of
    set-up (measured on an H200, torch 2.11: about 1.7 s for MobileNetV2 in bf16, where a warm
    batch takes 5 ms); this way it overlaps the decoding instead of following it."""
    if device.type == "cuda":
        with torch.inference_mode():
            extract(torch.zeros(batch_size, 3, crop_size, crop_size, device=device))


def full_batch(images: torch.Tensor, batch_size: int) -> torch.Tensor:
    """A short last batch padded with blank images to ``batch_size`` on a GPU, so the whole pass
    keeps one shape and pays the device's set-up once (see ``warm_up``); callers drop the extra
    rows. On a CPU a new shape costs nothing, and the batch stays as it is."""
    missing = batch_size - len(images)
    if images.device.type != "cuda" or missing <= 0:
        return images
    return torch.cat([images, images.new_zeros(missing, *images.shape[1:])])
