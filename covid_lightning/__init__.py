"""covid-lightning: train, evaluate and serve chest X-ray models on the COVID-19 Radiography Database."""

import os

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

from covid_lightning.constants import CLASSES
from covid_lightning.data.datamodules import LungSegmentationDataModule, RadiographyDataModule, XRayDataModule
from covid_lightning.modules.classifier import XRayClassifier
from covid_lightning.modules.segmenter import LungSegmenter

__version__ = "0.1.0"

__all__ = [
    "CLASSES",
    "LungSegmentationDataModule",
    "LungSegmenter",
    "RadiographyDataModule",
    "XRayClassifier",
    "XRayDataModule",
    "__version__",
]
