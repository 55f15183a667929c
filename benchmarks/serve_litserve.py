"""The classifier of ``caltech serve`` behind LitServe, for ``serve.py --litserve``: the same
decoding, preprocessing, network and batch limits, so that the two server libraries compare.

    python benchmarks/serve_litserve.py CKPT PORT
"""

from __future__ import annotations

import sys
from pathlib import Path

import common  # noqa: F401  (puts the repository on the path)
import litserve
import torch
from serve import BATCH, WAIT_S

from caltech_cli.serve.app import top
from caltech_cli.serve.classifier import from_checkpoint


class Classify(litserve.LitAPI):
    def setup(self, device: str) -> None:
        self.classifier = from_checkpoint(Path(sys.argv[1]), tta=False)

    def decode_request(self, request) -> torch.Tensor:
        return self.classifier.prepare(request["files"].file.read())

    def predict(self, images: torch.Tensor) -> torch.Tensor:
        return self.classifier.probabilities(images)

    def unbatch(self, output: torch.Tensor) -> list[torch.Tensor]:
        return list(output)

    def encode_response(self, probs: torch.Tensor) -> dict:
        return {"predictions": [{"top": top(probs, self.classifier.class_names, 5)}]}


if __name__ == "__main__":
    server = litserve.LitServer(Classify(max_batch_size=BATCH, batch_timeout=WAIT_S), accelerator="cpu")
    server.run(host="127.0.0.1", port=int(sys.argv[2]), generate_client_file=False, log_level="warning")
