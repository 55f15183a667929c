"""caltech: transfer learning on image folders from the command line (LightningCLI)."""

from caltech_cli.data import Caltech101DataModule, ImageClassificationDataModule
from caltech_cli.model import TransferClassifier

__all__ = ["Caltech101DataModule", "ImageClassificationDataModule", "TransferClassifier"]
__version__ = "0.1.0"
