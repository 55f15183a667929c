"""Where configs of earlier versions find the fine-tuning callback (``caltech_cli.finetuning.BackboneUnfreeze``);
it lives in ``caltech_cli/callbacks/finetuning.py``."""

from caltech_cli.callbacks.finetuning import BackboneUnfreeze

__all__ = ["BackboneUnfreeze"]
