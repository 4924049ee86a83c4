"""The two LightningDataModules (classification, lung segmentation) over one shared base."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from torch.utils.data import DataLoader, Sampler

from covid_lightning.data.datasets import EpochSampler, FeatureDataset, ImageFolderDataset, XRayDataset
from covid_lightning.data.demo import default_demo_dir, make_demo_dataset
from covid_lightning.data.hygiene import inspection_cache_file, screen_records
from covid_lightning.data.roi import ROI_MODES, LungRoi
from covid_lightning.data.scan import (
    CLASSES,
    DatasetError,
    Record,
    Source,
    class_counts,
    find_dataset_root,
    list_predict_images,
    manifest_class_names,
    read_records,
)
from covid_lightning.data.split import SPLITS, read_manifest, split_records, write_manifest
from covid_lightning.data.transforms import AUGMENTS, build_transform, eval_transform
from covid_lightning.runtime import usable_cpus

log = logging.getLogger(__name__)

MANIFEST_NAME = "split.csv"


def default_num_workers() -> int:
    """Workers sized from the CPUs this process may use: half of them, between 1 and 8."""
    return max(1, min(8, usable_cpus() // 2))


class XRayDataModule(L.LightningDataModule):
    """Shared base: finds the data, splits it (seeded, stratified), builds loaders of sample dicts.

    Nothing touches the disk in ``__init__``; ``prepare_data`` writes the demo data when ``root`` is
    None, ``setup`` reads the records (:func:`~covid_lightning.data.scan.read_records`), screens and splits
    them and writes the split manifest next to the run's logs.

    Args:
        root: the Kaggle dataset folder (or a folder containing ``COVID-19_Radiography_Dataset``);
            None = the synthetic demo dataset, generated on first use. Unused with ``manifest``.
        image_size: square size images (and masks) are resized to.
        batch_size: samples per batch (per device).
        num_workers: DataLoader workers; None sizes them from the CPU count.
        val_fraction: share of each class for validation (0.3 as the lab).
        test_fraction: share of each class held out for testing.
        seed: seed of the split.
        split_file: a manifest CSV written by an earlier run: reuse that exact split.
        augment: train-time augmentation, ``none``, ``light`` or ``strong`` (X-ray-safe).
        predict_root: for ``predict``: one PNG/JPEG/DICOM file, or a folder of them (any layout, recursive); the
            lung masks of a dataset (``masks`` folders next to an ``images`` folder) are skipped, counted and logged.
        demo_size: images per class of the demo dataset (used when ``root`` is None).
        on_bad_file: every file is decoded once in ``setup`` (results cached per file); ``error`` stops
            before training, listing each unreadable file and why; ``skip`` drops, counts and logs them.
        duplicates: ``near`` (exact + perceptual-hash duplicates), ``exact`` or ``none``: duplicate
            groups are kept within one split, so a re-encoded copy cannot leak from train to val.
        lung_masks: folder of predicted lung masks (``covid-lightning lungmasks``): the classifier sees
            the lungs only, at train, validation, test and predict time.
        lung_segmenter: a LungSegmenter checkpoint: the CLI computes (once, cached) the lung masks of
            every image and sets ``lung_masks``.
        lung_roi: ``crop`` (the lungs' bounding box), ``mask`` (zero outside the lungs) or ``crop_mask``.
        lung_margin: margin around the lungs, a fraction of the box size (crop) or image size (mask).
        cache_images: ``memory`` or ``disk``: decode and resize every image (and mask) once, then serve
            epochs from the cache (invalidated when a file changes); ``none`` decodes every time.
        streaming: a LitData optimized dataset (folder or object-store URL written by
            ``covid-lightning optimize``) to stream train/val/test from instead of ``root``.
        manifest: your own data: a CSV (or ``.parquet``) with the columns ``path``, ``label``
            (classification) and/or ``mask_path`` (segmentation), optional ``split`` (train/val/test, used as
            is) and ``group`` (a patient: kept in one split). Relative paths resolve against its folder; the
            class names are its labels, sorted. Replaces ``root``.
    """

    with_masks = False

    def __init__(
        self,
        root: str | None = None,
        image_size: int = 224,
        batch_size: int = 32,
        num_workers: int | None = None,
        val_fraction: float = 0.3,
        test_fraction: float = 0.0,
        seed: int = 42,
        split_file: str | None = None,
        augment: str = "light",
        predict_root: str | None = None,
        demo_size: int = 100,
        on_bad_file: Literal["error", "skip"] = "error",
        duplicates: Literal["near", "exact", "none"] = "near",
        lung_masks: str | None = None,
        lung_segmenter: str | None = None,
        lung_roi: Literal["crop", "mask", "crop_mask"] = "crop",
        lung_margin: float = 0.1,
        streaming: str | None = None,
        cache_images: Literal["none", "memory", "disk"] = "none",
        manifest: str | None = None,
    ) -> None:
        super().__init__()
        if manifest and streaming:
            raise DatasetError(
                f"data.manifest {manifest} and data.streaming {streaming} are two data sources: a stream holds the "
                "records it was written from. Write the manifest's data as a stream (covid-lightning optimize "
                f"{manifest} OUT) and pass --data.streaming OUT alone, or drop data.streaming to read the files."
            )
        if augment not in AUGMENTS:
            raise ValueError(f"Unknown augment {augment!r}; choose one of {', '.join(AUGMENTS)}.")
        if lung_roi not in ROI_MODES:
            raise ValueError(f"Unknown lung_roi {lung_roi!r}; choose one of {', '.join(ROI_MODES)}.")
        if lung_margin < 0:
            raise ValueError(f"lung_margin must be >= 0, got {lung_margin}.")
        if self.with_masks and (lung_masks or lung_segmenter):
            given = "data.lung_segmenter" if lung_segmenter else "data.lung_masks"
            raise DatasetError(
                f"{given} applies to classification data (RadiographyDataModule), not to lung segmentation: "
                f"the segmenter learns the lungs from whole images and their ground-truth masks. Drop {given}."
            )
        if lung_masks or lung_segmenter:  # refused here, at start: not after every lung mask was computed
            given = "data.lung_segmenter" if lung_segmenter else "data.lung_masks"
            if streaming:
                raise DatasetError(
                    f"{given} cannot be combined with data.streaming: the stream holds whole images, the lung ROI "
                    f"is applied to files. Train on files (--data.root) with {given}, or drop it."
                )
            if cache_images != "none":
                raise DatasetError(
                    f"data.cache_images {cache_images} cannot be combined with {given}: the cache holds resized "
                    "whole images and the lung ROI needs the original image. Add --data.cache_images none."
                )
        self.save_hyperparameters()
        self.records: dict[str, list[Record]] = {}
        self.datasets: dict[str, Any] = {}
        self.manifest_path: Path | None = None
        self.dataset_root: Path | None = None
        self._class_names: tuple[str, ...] | None = None
        self._given_split = False

    # preparation -----------------------------------------------------------------------------
    def _demo_root(self) -> Path:
        return make_demo_dataset(default_demo_dir(), n_per_class=self.hparams.demo_size)

    def prepare_data(self) -> None:
        hp = self.hparams
        if hp.root is None and not hp.streaming and not hp.get("manifest"):  # another source: no demo needed
            self._demo_root()

    def _resolve_root(self) -> Path:
        root = self.hparams.root
        return find_dataset_root(self._demo_root() if root is None else root)

    def _base(self) -> Path:
        """Where relative paths start: the manifest's folder, or the dataset root."""
        manifest = self.hparams.get("manifest")
        return Path(os.path.abspath(Path(manifest).expanduser().parent)) if manifest else self._resolve_root()

    def _source(self) -> Source:
        """The records of the data source (the manifest, or the Kaggle layout under ``root`` or the demo)."""
        manifest = self.hparams.get("manifest")
        if manifest:
            return read_records(manifest=manifest, with_masks=self.with_masks)
        return read_records(self._resolve_root(), with_masks=self.with_masks)

    def data_classes(self) -> tuple[str, ...]:
        """The class names, in label order, of the data: the manifest's labels sorted, the stream's, or the four
        :data:`CLASSES` of the Kaggle layout (read once: a manifest's rows, not its images)."""
        if self._class_names is None:
            hp = self.hparams
            if hp.streaming:
                from covid_lightning.data.streaming import read_meta

                self._class_names = tuple(read_meta(hp.streaming).get("classes", CLASSES))
            elif hp.get("manifest"):
                self._class_names = manifest_class_names(hp.manifest)
            else:
                self._class_names = CLASSES
        return self._class_names

    def _roi(self) -> LungRoi | None:
        """The lung ROI loader when ``lung_masks`` is set (directly or by the CLI from ``lung_segmenter``)."""
        hp = self.hparams
        if hp.get("lung_segmenter") and not hp.get("lung_masks"):
            raise DatasetError(
                "data.lung_segmenter is set but no lung masks were computed: call "
                "covid_lightning.lungs.attach_lung_masks(datamodule, ckpt) before setup (the CLI does)."
            )
        if not hp.get("lung_masks"):
            return None
        return LungRoi(hp.lung_masks, hp.get("lung_roi", "crop"), hp.get("lung_margin", 0.1))

    def setup(self, stage: str | None = None) -> None:
        if stage == "predict":
            if self.hparams.predict_root is None:
                raise DatasetError(
                    "predict needs data.predict_root: one PNG/JPEG/DICOM image or a folder of them "
                    "(e.g. --data.predict_root path/to/images)."
                )
            self._setup_predict()
            return
        if "train" in self.datasets:
            return
        if self.hparams.streaming:
            self._setup_streaming()
            return
        hp = self.hparams
        if hp.root is not None and hp.get("manifest"):
            log.info("data.manifest %s is the data source: data.root %s is not used.", hp.manifest, hp.root)
        base = self._base()
        self.dataset_root = base
        if hp.split_file:
            records, splits = read_manifest(hp.split_file, base, self.data_classes())
            if self.with_masks and any(r.mask_path is None for r in records):
                raise DatasetError(f"{hp.split_file} has rows without a mask_path; it is not a segmentation split.")
        else:
            source = self._source()
            records, splits = source.records, source.splits
            self._class_names = source.class_names
        self._given_split = splits is not None and not hp.split_file
        screened, splits, groups = split_records(
            records,
            splits=splits,
            val_fraction=hp.val_fraction,
            test_fraction=hp.test_fraction,
            seed=hp.seed,
            on_bad_file=hp.on_bad_file,
            duplicates=hp.duplicates,
            cache_file=inspection_cache_file(base),
        )
        records = screened.records
        self.screening = screened
        self.records = {s: [r for r, sp in zip(records, splits) if sp == s] for s in SPLITS}
        self._check_classes(base, records)
        self._write_manifest(records, splits, base, groups)
        log.info(
            "%s split of %s: %s",
            type(self).__name__,
            base,
            ", ".join(f"{s}={len(v)}" for s, v in self.records.items()),
        )
        size, aug, roi = self.hparams.image_size, self.hparams.augment, self._roi()
        caches = self._decoded_caches(records) if self.hparams.cache_images != "none" else {}
        position = {r.path: i for i, r in enumerate(records)}
        transforms = {
            "train": build_transform(size, train=True, augment=aug),
            "val": eval_transform(size),
            "test": eval_transform(size),
        }
        self.datasets = {
            split: XRayDataset(
                self.records[split],
                transforms[split],
                self.with_masks,
                roi=roi,
                cache_index=[position[r.path] for r in self.records[split]] if caches else None,
                **caches,
            )
            for split in SPLITS
        }

    def _check_classes(self, base: Path, records: list[Record]) -> None:
        """Warn about each class without images; for a classifier, refuse a class that has images but none in
        the train split (it could never be learned, and its loss weight would silently be 0)."""
        split_file, manifest = self.hparams.split_file, self.hparams.get("manifest")
        total = class_counts(records, self.data_classes())
        pairs = "image+mask pairs" if self.with_masks else "images"
        for name in (c for c, n in total.items() if n == 0):
            folder = base / name
            if split_file:
                where = f"data.split_file {split_file} lists none"
            elif manifest:
                where = f"nothing usable listed in data.manifest {manifest}"
            elif folder.is_dir():
                where = f"nothing usable under {folder}"
            else:
                where = f"its folder {folder} does not exist"
            log.warning(
                "Class %s has no %s (%s): the model gets no example of it. Add its files, or ignore this if the "
                "dataset lacks the class on purpose.",
                name,
                pairs,
                where,
            )
        if self.with_masks:
            return  # the segmenter learns lungs, not classes: the class only stratifies the split
        train = class_counts(self.records["train"], self.data_classes())
        starved = [c for c, n in total.items() if n > 0 and train[c] == 0]
        if not starved:
            return
        details = ", ".join(f"{c} ({total[c]} image(s))" for c in starved)
        if split_file:
            fix = (
                f"data.split_file {split_file} puts none of them in train: edit it so that train holds some, or "
                "drop data.split_file for a fresh split"
            )
        elif self._given_split:
            fix = (
                f"the split column of data.manifest {manifest} puts none of them in train: edit it so that train "
                "holds some, or drop the column for a seeded stratified split"
            )
        else:
            hp = self.hparams
            fix = (
                f"the split (val_fraction={hp.val_fraction}, test_fraction={hp.test_fraction}) sends them all to "
                "val/test: add images of the class, lower data.val_fraction/data.test_fraction, or remove the class "
                "folder (or its manifest rows) to train without it"
            )
        what = "Class" if len(starved) == 1 else "Classes"
        raise DatasetError(f"{what} {details}: no training image under {base}; {fix}.")

    def _decoded_caches(self, records: list[Record]) -> dict[str, Any]:
        """One decoded, resized cache over every screened record (scan order: stable across splits/seeds)."""
        from covid_lightning.data.image_cache import DecodedCache

        if self.hparams.get("lung_masks") or self.hparams.get("lung_segmenter"):
            raise ValueError("cache_images cannot be combined with lung_masks (the ROI needs the original image).")
        storage, size = self.hparams.cache_images, self.hparams.image_size
        trainer = self.trainer
        if trainer is not None and trainer.world_size > 1 and trainer.local_rank != 0:
            trainer.strategy.barrier()  # local rank 0 builds the disk cache first; the others then reopen it
        caches = {"image_cache": DecodedCache.build([r.path for r in records], size, storage=storage)}
        if self.with_masks:
            caches["mask_cache"] = DecodedCache.build(
                [r.mask_path for r in records], size, kind="mask", storage=storage
            )
        if trainer is not None and trainer.world_size > 1 and trainer.local_rank == 0:
            trainer.strategy.barrier()
        return caches

    def _setup_streaming(self) -> None:
        """Datasets read from a LitData optimized dataset (``covid-lightning optimize``) instead of files."""
        from covid_lightning.data.streaming import copy_manifest, read_meta, streaming_datasets

        url, size, aug = self.hparams.streaming, self.hparams.image_size, self.hparams.augment
        transforms = {
            "train": build_transform(size, train=True, augment=aug),
            "val": eval_transform(size),
            "test": eval_transform(size),
        }
        if self.hparams.cache_images != "none":
            log.info(
                "data.cache_images %s does not apply to data.streaming (LitData caches the chunks): ignored.",
                self.hparams.cache_images,
            )
        self.datasets = streaming_datasets(url, transforms=transforms, masks=self.with_masks, seed=self.run_seed)
        self._streaming_counts = read_meta(url)["class_counts"].get("train", {})
        log.info("%s streams %s: %s", type(self).__name__, url, {k: len(v) for k, v in self.datasets.items()})
        trainer = self.trainer
        if trainer is not None:
            log_dir = trainer.log_dir  # every rank must ask: the loggers may synchronise the version
            if trainer.is_global_zero and log_dir is not None:  # the stream's split, as split.csv of the run
                self.manifest_path = copy_manifest(url, Path(log_dir) / MANIFEST_NAME)

    def _write_manifest(self, records: list[Record], splits: list[str], base: Path, groups: list[int]) -> None:
        trainer = self.trainer
        if trainer is None:
            return
        log_dir = trainer.log_dir  # every rank must ask: the loggers may synchronise the version
        if trainer.is_global_zero and log_dir is not None:
            self.manifest_path = write_manifest(Path(log_dir) / MANIFEST_NAME, records, splits, base, groups)
            log.info("Split manifest written to %s (pass it as data.split_file to reuse it).", self.manifest_path)

    def _setup_predict(self) -> None:
        """The predict inputs (:func:`~covid_lightning.data.scan.list_predict_images`), screened like training
        files: one image file, or a folder without the lung masks of a dataset."""
        paths = list_predict_images(self.hparams.predict_root)
        screened = screen_records(
            [Record(p, 0) for p in paths], on_bad_file=self.hparams.on_bad_file, duplicates="none"
        )
        paths = [r.path for r in screened.records]
        self.datasets["predict"] = ImageFolderDataset(paths, eval_transform(self.hparams.image_size), roi=self._roi())

    # statistics ------------------------------------------------------------------------------
    @property
    def class_counts(self) -> dict[str, int]:
        """Images per class in the train split (after ``setup``)."""
        if self.hparams.streaming:
            return {name: int(self._streaming_counts.get(name, 0)) for name in self.data_classes()}
        return class_counts(self.records["train"], self.data_classes())

    @property
    def class_weights(self) -> list[float]:
        """Balanced loss weights of the train split: n / (n_classes_present * n_c); 0 for absent classes."""
        counts = list(self.class_counts.values())
        present = [c for c in counts if c > 0]
        total = sum(counts)
        return [total / (len(present) * c) if c > 0 else 0.0 for c in counts]

    # loaders ---------------------------------------------------------------------------------
    @property
    def run_seed(self) -> int:
        """The seed of shuffling and augmentation: ``seed_everything``'s when set, else the split seed."""
        return int(os.environ.get("PL_GLOBAL_SEED", self.hparams.seed))

    def _loader(self, split: str, sampler: Sampler | None = None) -> DataLoader:
        if split not in self.datasets:
            raise RuntimeError(f"No {split} data: call setup() first (or set predict_root for predict).")
        workers = default_num_workers() if self.hparams.num_workers is None else self.hparams.num_workers
        cached = isinstance(self.datasets[split], FeatureDataset)
        if cached:
            workers = 0  # cached activations are in memory: worker processes would only add IPC
        if self.hparams.streaming and split != "predict" and not cached:
            from covid_lightning.data.streaming import streaming_loader

            return streaming_loader(self.datasets[split], self.hparams.batch_size, workers)
        return DataLoader(
            self.datasets[split],
            batch_size=self.hparams.batch_size,
            sampler=sampler,
            num_workers=workers,
            persistent_workers=workers > 0,
            pin_memory=torch.cuda.is_available(),
        )

    def train_dataloader(self) -> DataLoader:
        """Shuffled by :class:`EpochSampler` (order and augmentation a function of seed and epoch)."""
        dataset = self.datasets.get("train")
        if self.hparams.streaming and not isinstance(dataset, FeatureDataset):  # cached features: in memory
            return self._loader("train")
        if dataset is None:
            raise RuntimeError("No train data: call setup() first.")
        if len(dataset) == 0:
            raise DatasetError("The train split is empty: check data.root, val_fraction and test_fraction.")
        trainer = self.trainer
        world, rank = (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
        dataset.seed = self.run_seed if self.hparams.augment != "none" else None
        sampler = EpochSampler(
            dataset,
            num_replicas=world,
            rank=rank,
            seed=self.run_seed,
            # the epoch Lightning itself hands to samplers (right after a restart too)
            epoch_source=(lambda: trainer.fit_loop.epoch_progress.current.processed) if trainer is not None else None,
        )
        return self._loader("train", sampler)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val")

    def test_dataloader(self) -> DataLoader:
        if self.hparams.streaming:  # the stream's own split: a test split when it was optimized with one
            if "test" not in self.datasets:
                raise DatasetError(
                    f"{self.hparams.streaming} has no test split: optimize it with --test-fraction > 0 "
                    "(or use validate)."
                )
        elif not self.records.get("test"):
            raise DatasetError("No test split: set data.test_fraction > 0 (or use validate).")
        return self._loader("test")

    def predict_dataloader(self) -> DataLoader:
        return self._loader("predict")


class RadiographyDataModule(XRayDataModule):
    """Classification over the COVID-19 Radiography Database (4 classes, order :data:`CLASSES`), the demo data,
    or a manifest (its own labels, sorted).

    Samples: ``{"image": uint8 (3, S, S), "label": int, "path": str}``. Class order: :attr:`class_names`.
    """

    @property
    def class_names(self) -> tuple[str, ...]:
        """The data's classes (:meth:`data_classes`). The CLI links them to the classifier (``num_classes``,
        ``class_names``) when it builds the model, before ``setup``. Only classification data has this attribute:
        the link then skips a segmenter (the lung masks' data is split by class, but the model has none)."""
        return self.data_classes()


class LungSegmentationDataModule(XRayDataModule):
    """Lung segmentation: images paired with ``<Class>/masks/<same name>`` (or a manifest's ``mask_path``);
    unpaired images skipped.

    Samples add ``"mask"``: float (1, S, S) with values {0, 1}. Defaults follow the lab: 128 px,
    batch 16, 70/30 split stratified by class. ``lung_masks``/``lung_segmenter`` (classification options) are
    accepted only to be refused at start with one clear error (the segmenter learns the lungs from whole images).
    """

    with_masks = True

    def __init__(
        self,
        root: str | None = None,
        image_size: int = 128,
        batch_size: int = 16,
        num_workers: int | None = None,
        val_fraction: float = 0.3,
        test_fraction: float = 0.0,
        seed: int = 42,
        split_file: str | None = None,
        augment: str = "light",
        predict_root: str | None = None,
        demo_size: int = 100,
        on_bad_file: Literal["error", "skip"] = "error",
        duplicates: Literal["near", "exact", "none"] = "near",
        streaming: str | None = None,
        cache_images: Literal["none", "memory", "disk"] = "none",
        lung_masks: str | None = None,
        lung_segmenter: str | None = None,
        manifest: str | None = None,
    ) -> None:
        super().__init__(
            root=root,
            image_size=image_size,
            batch_size=batch_size,
            num_workers=num_workers,
            val_fraction=val_fraction,
            test_fraction=test_fraction,
            seed=seed,
            split_file=split_file,
            augment=augment,
            predict_root=predict_root,
            demo_size=demo_size,
            on_bad_file=on_bad_file,
            duplicates=duplicates,
            streaming=streaming,
            cache_images=cache_images,
            lung_masks=lung_masks,
            lung_segmenter=lung_segmenter,
            manifest=manifest,
        )
