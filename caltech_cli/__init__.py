"""caltech: transfer learning on image folders from the command line (LightningCLI)."""

from caltech_cli.data import Caltech101DataModule, ImageClassificationDataModule, ImageFolderDataModule
from caltech_cli.finetuning import BackboneUnfreeze
from caltech_cli.model import TransferClassifier

__all__ = [
    "BackboneUnfreeze",
    "Caltech101DataModule",
    "ImageClassificationDataModule",
    "ImageFolderDataModule",
    "TransferClassifier",
]
__version__ = "0.1.0"
