"""The Kaggle COVID-19 Radiography Database's fixed facts, in one place (data, models and tools import them)."""

#: the four classes in the canonical order (label = index); a manifest's class names are its own labels, sorted
CLASSES: tuple[str, ...] = ("COVID", "Lung_Opacity", "Normal", "Viral Pneumonia")
#: the folder the Kaggle archive unpacks to
DATASET_DIRNAME = "COVID-19_Radiography_Dataset"
#: side of the database's images and of its lung masks, in pixels
IMAGE_SIZE = 299
MASK_SIZE = 256
