"""caltech: transfer learning on image folders from the command line (LightningCLI).

The classes below load on first use (PEP 562), so that importing the package costs nothing and
the ``caltech`` command can set the interpreter up before torch and Lightning load (``__main__``).
"""

import importlib

_EXPORTS = {
    "BackboneUnfreeze": "caltech_cli.callbacks.finetuning",
    "Caltech101DataModule": "caltech_cli.data",
    "ImageClassificationDataModule": "caltech_cli.data",
    "ImageFolderDataModule": "caltech_cli.data",
    "TransferClassifier": "caltech_cli.model",
}
__all__ = sorted(_EXPORTS)
__version__ = "0.1.0"


def __getattr__(name: str) -> object:
    """An exported class, or a submodule (``caltech_cli.data``), imported on first use."""
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    if not name.startswith("_"):
        try:
            return importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as error:
            if error.name != f"{__name__}.{name}":
                raise
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
