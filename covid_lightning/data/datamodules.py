"""The two LightningDataModules (classification, lung segmentation) over one shared base."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, Sampler

from covid_lightning.constants import CLASSES, DATASET_DIRNAME
from covid_lightning.data.datasets import EpochSampler, FeatureDataset, ImageFolderDataset, XRayDataset
from covid_lightning.data.demo import make_demo_dataset
from covid_lightning.data.hygiene import screen_records
from covid_lightning.data.roi import WHOLE_FILM, LungRoi, RoiMode
from covid_lightning.data.scan import (
    DatasetError,
    Record,
    class_counts,
    list_predict_images,
    manifest_class_names,
    read_records,
)
from covid_lightning.data.split import SPLITS, Selection, select_records, write_manifest
from covid_lightning.data.transforms import Intensity, build_transform, eval_transform
from covid_lightning.runtime import usable_cpus

log = logging.getLogger(__name__)

MANIFEST_NAME = "split.csv"


def default_num_workers() -> int:
    """Workers sized from the CPUs this process may use: half of them, between 1 and 8."""
    return max(1, min(8, usable_cpus() // 2))


class XRayDataModule(L.LightningDataModule):
    """Shared base: reads one data source, screens and splits it, and serves loaders of sample dicts.

    Args:
        root: the Kaggle dataset folder (or its parent); None = the synthetic demo dataset.
        image_size: square size images (and masks) are resized to.
        batch_size: samples per batch (per device).
        num_workers: DataLoader workers; None sizes them from the CPU count.
        val_fraction: share of each class for validation.
        test_fraction: share of each class held out for testing.
        seed: seed of the split, of the shuffling and of the augmentation.
        split_file: a ``split.csv`` written by an earlier run: reuse that exact split.
        augment: train-time augmentation (X-ray-safe); ``acquisition`` adds resampling, JPEG, blur/noise and border
            crops that erase where a film was made and processed.
        intensity: ``clahe`` or ``equalize`` (histogram) after the resize, for every split; linked to the model, so
            export and serving apply it too.
        predict_root: for ``predict``: one PNG/JPEG/DICOM file, or a folder of them (recursive).
        demo_size: images per class of the demo dataset (``root`` None).
        on_bad_file: ``error`` stops naming each unreadable file, ``skip`` drops, counts and logs them.
        duplicates: duplicate images (``near``: exact + perceptual hash) are kept within one split.
        lung_masks: folder of predicted lung masks (``covid-lightning lungmasks``): the classifier sees the lungs.
        lung_segmenter: a LungSegmenter checkpoint: the CLI computes (once, cached) the lung masks.
        lung_roi: ``crop`` (the lungs' bounding box), ``mask`` (zero outside the lungs) or ``crop_mask``.
        lung_margin: margin around the lungs, a fraction of the box size (crop) or image size (mask).
        streaming: a LitData dataset from ``covid-lightning optimize`` (folder or URL); replaces ``root``.
        cache_images: ``memory`` or ``disk``: decode and resize every file once (invalidated when it changes).
        manifest: a CSV/Parquet with ``path``, ``label`` and/or ``mask_path``, optional ``split``, ``group``.
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
        augment: Literal["none", "light", "strong", "acquisition"] = "light",
        intensity: Intensity = "none",
        predict_root: str | None = None,
        demo_size: int = 100,
        on_bad_file: Literal["error", "skip"] = "error",
        duplicates: Literal["near", "exact", "none"] = "near",
        lung_masks: str | None = None,
        lung_segmenter: str | None = None,
        lung_roi: RoiMode = "crop",
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
        lung = "data.lung_segmenter" if lung_segmenter else "data.lung_masks" if lung_masks else None
        for refused, why in (  # at start, not after every lung mask was computed
            (self.with_masks, f"{lung} applies to classification data (RadiographyDataModule), not to lung "
             f"segmentation: the segmenter learns the lungs from whole images and their masks. Drop {lung}."),
            (streaming, f"{lung} cannot be combined with data.streaming: the stream holds whole images, the lung ROI "
             f"is applied to files. Train on files (--data.root) with {lung}, or drop it."),
            (cache_images != "none", f"data.cache_images {cache_images} cannot be combined with {lung}: the cache "
             "holds resized whole images, the lung ROI needs the original. Add --data.cache_images none."),
        ):  # fmt: skip
            if lung and refused:
                raise DatasetError(why)
        self.save_hyperparameters()
        self.records: dict[str, list[Record]] = {}
        self.datasets: dict[str, Any] = {}
        self.manifest_path: Path | None = None
        self._selection: Selection | None = None
        self._class_names: tuple[str, ...] | None = None

    def _data(self) -> str | Path:
        """The data source: the manifest, ``root``, or the demo data (generated on first use)."""
        hp = self.hparams
        if hp.manifest:
            if hp.root is not None:
                log.info("data.manifest %s is the data source: data.root %s is not used.", hp.manifest, hp.root)
            return hp.manifest
        return make_demo_dataset(n_per_class=hp.demo_size) if hp.root is None else hp.root

    def prepare_data(self) -> None:
        if not (self.hparams.root or self.hparams.streaming or self.hparams.manifest):
            self._data()

    def image_paths(self, stage: str | None = None) -> list[Path]:
        """Every image file the DataModule reads at ``stage`` (None: all stages): what lung masks must exist for."""
        predict_root = self.hparams.predict_root
        paths = [] if stage == "predict" and predict_root else [r.path for r in self.selection.screening.records]
        if predict_root and stage in ("predict", None):
            paths += list_predict_images(predict_root)
        return paths

    def data_classes(self) -> tuple[str, ...]:
        """The class names in label order: the stream's, the manifest's labels sorted, or the Kaggle four."""
        if self._class_names is None:
            hp = self.hparams
            if hp.streaming:
                from covid_lightning.data.streaming import read_meta

                self._class_names = tuple(read_meta(hp.streaming)["classes"])
            else:
                self._class_names = manifest_class_names(hp.manifest) if hp.manifest else CLASSES
        return self._class_names

    @property
    def selection(self) -> Selection:
        """The screened records and their split (computed once, on first use)."""
        if self._selection is None:
            hp = self.hparams
            keys = ("split_file", "val_fraction", "test_fraction", "seed", "on_bad_file", "duplicates")
            self._selection = select_records(self._data(), masks=self.with_masks, **{k: hp[k] for k in keys})
            self._class_names = self._selection.source.class_names
            self._check_classes(self._selection)
        return self._selection

    def _check_classes(self, sel: Selection) -> None:
        """Warn about a class without images; refuse, for a classifier, a class with none in train."""
        hp, base = self.hparams, sel.source.base
        total = class_counts(sel.screening.records, sel.source.class_names)
        for name in (c for c, n in total.items() if n == 0):
            folder = base / name
            where = (
                f"data.split_file {hp.split_file} lists none" if hp.split_file
                else f"nothing usable listed in data.manifest {hp.manifest}" if hp.manifest
                else f"nothing usable under {folder}" if folder.is_dir() else f"its folder {folder} does not exist"
            )  # fmt: skip
            log.warning(
                "Class %s has no %s (%s): the model gets no example of it. Add its files, or ignore this if the "
                "dataset lacks the class on purpose.",
                name,
                "image+mask pairs" if self.with_masks else "images",
                where,
            )
        train = class_counts(sel.records("train"), sel.source.class_names)
        starved = [c for c, n in total.items() if n > 0 and train[c] == 0]
        if self.with_masks or not starved:  # the segmenter learns lungs: the class only stratifies the split
            return
        if hp.split_file:
            fix = f"data.split_file {hp.split_file} puts none of them in train: edit it, or drop it for a fresh split"
        elif sel.given_split:
            fix = (
                f"the split column of data.manifest {hp.manifest} puts none of them in train: edit it, or drop the "
                "column for a seeded stratified split"
            )
        else:
            fix = (
                f"the split (val_fraction={hp.val_fraction}, test_fraction={hp.test_fraction}) sends them all to "
                "val/test: add images of the class, lower data.val_fraction/data.test_fraction, or remove the class "
                "folder (or its manifest rows) to train without it"
            )
        details = ", ".join(f"{c} ({total[c]} image(s))" for c in starved)
        raise DatasetError(f"Class(es) {details}: no training image under {base}; {fix}.")

    def _roi(self) -> LungRoi | None:
        hp = self.hparams
        if hp.lung_segmenter and not hp.lung_masks:
            raise DatasetError(
                "data.lung_segmenter is set but no lung masks were computed: call "
                "covid_lightning.lungs.attach_lung_masks(datamodule, ckpt) before setup (the CLI does)."
            )
        return LungRoi(hp.lung_masks, hp.lung_roi, hp.lung_margin) if hp.lung_masks else None

    @property
    def lung_region(self) -> dict[str, Any]:
        """The lung region images are cut to (``lung_roi`` none: whole films); a model records it at fit."""
        hp = self.hparams
        if not (hp.lung_masks or hp.lung_segmenter):
            return dict(WHOLE_FILM)
        return {"lung_roi": str(hp.lung_roi), "lung_margin": float(hp.lung_margin)}

    def _eval_transform(self) -> Any:
        """Resize (+ intensity standardisation): what every split but training, and predict, get."""
        return eval_transform(self.hparams.image_size, self.hparams.intensity)

    def setup(self, stage: str | None = None) -> None:
        hp = self.hparams
        if stage == "predict":
            if hp.predict_root is None:
                raise DatasetError(
                    "predict needs data.predict_root: one PNG/JPEG/DICOM image or a folder of them "
                    "(e.g. --data.predict_root path/to/images)."
                )
            paths = [Record(p, 0) for p in list_predict_images(hp.predict_root)]
            kept = screen_records(paths, on_bad_file=hp.on_bad_file, duplicates="none").records
            self.datasets["predict"] = ImageFolderDataset(
                [r.path for r in kept], self._eval_transform(), roi=self._roi()
            )
            return
        if "train" in self.datasets:
            return
        size = hp.image_size
        transforms = {"train": build_transform(size, train=True, augment=hp.augment, intensity=hp.intensity)}
        transforms |= {"val": self._eval_transform(), "test": self._eval_transform()}
        if hp.streaming:
            from covid_lightning.data.streaming import copy_manifest, streaming_datasets

            if hp.cache_images != "none":
                log.info("data.cache_images %s does not apply to data.streaming (LitData caches the chunks): "
                         "ignored.", hp.cache_images)  # fmt: skip
            self.datasets = streaming_datasets(hp.streaming, transforms=transforms, masks=self.with_masks, seed=hp.seed)
            self._keep_split(lambda path: copy_manifest(hp.streaming, path))
            return
        sel = self.selection
        records = sel.screening.records
        self.records = {s: sel.records(s) for s in SPLITS}
        self._keep_split(lambda path: write_manifest(path, records, sel.splits, sel.source.base, sel.groups))
        counts = ", ".join(f"{s}={len(v)}" for s, v in self.records.items())
        log.info("%s split of %s: %s", type(self).__name__, sel.source.base, counts)
        roi, caches = self._roi(), self._decoded_caches(records) if hp.cache_images != "none" else {}
        row = {r.path: i for i, r in enumerate(records)}
        self.datasets = {
            s: XRayDataset(
                self.records[s],
                transforms[s],
                self.with_masks,
                roi=roi,
                cache_index=[row[r.path] for r in self.records[s]] if caches else None,
                **caches,
            )
            for s in SPLITS
        }

    def _keep_split(self, write: Callable[[Path], Path]) -> None:
        """Write the split as ``split.csv`` of the run (rank 0; every rank asks ``log_dir``: loggers may sync it)."""
        trainer = self.trainer
        log_dir = trainer.log_dir if trainer is not None else None
        if log_dir is not None and trainer.is_global_zero:
            self.manifest_path = write(Path(log_dir) / MANIFEST_NAME)
            log.info("Split manifest written to %s (pass it as data.split_file to reuse it).", self.manifest_path)

    def _decoded_caches(self, records: list[Record]) -> dict[str, Any]:
        """One decoded, resized cache over every screened record; local rank 0 builds a disk cache first."""
        from covid_lightning.data.image_cache import DecodedCache

        hp, trainer = self.hparams, self.trainer
        shared = trainer is not None and trainer.world_size > 1
        if shared and trainer.local_rank != 0:
            trainer.strategy.barrier()
        caches = {"image_cache": DecodedCache.build([r.path for r in records], hp.image_size, storage=hp.cache_images)}
        if self.with_masks:
            masks = [r.mask_path for r in records]
            caches["mask_cache"] = DecodedCache.build(masks, hp.image_size, kind="mask", storage=hp.cache_images)
        if shared and trainer.local_rank == 0:
            trainer.strategy.barrier()
        return caches

    @property
    def class_counts(self) -> dict[str, int]:
        """Images per class in the train split."""
        if self.hparams.streaming:
            from covid_lightning.data.streaming import read_meta

            train = read_meta(self.hparams.streaming)["class_counts"].get("train", {})
            return {name: int(train.get(name, 0)) for name in self.data_classes()}
        return class_counts(self.selection.records("train"), self.data_classes())

    def _loader(self, split: str, sampler: Sampler | None = None) -> DataLoader:
        if split not in self.datasets:
            raise RuntimeError(f"No {split} data: call setup() first (or set predict_root for predict).")
        dataset, hp = self.datasets[split], self.hparams
        workers = default_num_workers() if hp.num_workers is None else hp.num_workers
        if isinstance(dataset, FeatureDataset):
            workers = 0  # cached activations are in memory: worker processes would only add IPC
        if isinstance(dataset, IterableDataset):  # a LitData stream: its own loader (epochs, resumable state)
            from covid_lightning.data.streaming import streaming_loader

            return streaming_loader(dataset, hp.batch_size, workers)
        return DataLoader(
            dataset,
            batch_size=hp.batch_size,
            sampler=sampler,
            num_workers=workers,
            persistent_workers=workers > 0,
            pin_memory=torch.cuda.is_available(),
        )

    def train_dataloader(self) -> DataLoader:
        """Shuffled by :class:`EpochSampler`: order and augmentation a function of (seed, epoch), sharded by rank."""
        dataset, trainer, seed = self.datasets.get("train"), self.trainer, self.hparams.seed
        if dataset is None or isinstance(dataset, IterableDataset):
            return self._loader("train")
        if len(dataset) == 0:
            raise DatasetError("The train split is empty: check data.root, val_fraction and test_fraction.")
        dataset.seed = seed if self.hparams.augment != "none" else None
        if trainer is None:
            return self._loader("train", EpochSampler(dataset, 1, 0, seed, lambda: 0, self._sample_weights()))
        # the epoch Lightning hands to samplers, also when a resumed run builds its iterator before set_epoch
        epoch = lambda: trainer.fit_loop.epoch_progress.current.processed  # noqa: E731
        weights = self._sample_weights()
        sampler = EpochSampler(dataset, trainer.world_size, trainer.global_rank, seed, epoch, weights)
        return self._loader("train", sampler)

    def _sample_weights(self) -> list[float] | None:
        """Per train item, how likely an epoch draws it (None: each once, shuffled)."""
        return None

    def val_dataloader(self) -> DataLoader:
        return self._loader("val")

    @property
    def has_test_split(self) -> bool:
        """Whether the data has a test split (after ``setup``): test records, or a stream's test part."""
        return "test" in self.datasets if self.hparams.streaming else bool(self.records.get("test"))

    def test_dataloader(self) -> DataLoader:
        if not self.has_test_split:
            stream = self.hparams.streaming
            raise DatasetError(
                f"{stream} has no test split: optimize it with --test_fraction > 0 (or use validate)."
                if stream
                else "No test split: set data.test_fraction > 0 (or use validate)."
            )
        return self._loader("test")

    def predict_dataloader(self) -> DataLoader:
        return self._loader("predict")


class RadiographyDataModule(XRayDataModule):
    """Classification samples ``{"image": uint8 (3, S, S), "label": int, "path": str}`` from any data source.

    Args:
        balance: ``none``; ``loss`` / ``loss_sqrt`` (class-weighted loss, inverse frequency or its square root);
            ``sampler`` (class-balanced epochs); ``logit_adjust`` (the loss adds the log train-class prior to the
            logits, Menon et al. 2021: predictions favour rare classes by their rarity); or per-class loss weights.
        external: external test sets (dataset folders or manifests), each scored apart by ``test``, all its images.
    """

    def __init__(
        self,
        balance: Literal["none", "loss", "loss_sqrt", "sampler", "logit_adjust"] | Sequence[float] = "none",
        external: Sequence[str] = (),
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if balance == "sampler" and self.hparams.streaming:
            raise DatasetError("data.balance sampler draws from files; a stream is read in its own order. Use files.")
        #: the test loaders' sources, in order: ``in-distribution`` (when there is a test split), then external ones
        self.test_sources: list[str] = ["in-distribution"]
        self._external: dict[str, list[Record]] | None = None

    def image_paths(self, stage: str | None = None) -> list[Path]:
        """The split's (or predict's) files, and at ``test`` the external test sets' (same lung ROI for all)."""
        paths = super().image_paths(stage)
        if stage in ("test", None):
            paths += [r.path for records in self._external_records().values() for r in records]
        return paths

    def setup(self, stage: str | None = None) -> None:
        super().setup(stage)
        if stage in ("test", None) and not any(k.startswith("external/") for k in self.datasets):
            for name, records in self._external_records().items():
                self.datasets[f"external/{name}"] = XRayDataset(records, self._eval_transform(), roi=self._roi())

    def _external_records(self) -> dict[str, list[Record]]:
        """Each external source's screened records, labelled in the data's classes, by source name (read once)."""
        if self._external is not None:
            return self._external
        classes, found = self.data_classes(), {}
        for entry in self.hparams.external:
            source = read_records(entry, with_masks=False)
            base = source.base.parent if source.base.name == DATASET_DIRNAME else source.base
            name = Path(entry).stem if source.manifest else base.name
            name = f"{name}_{len(found)}" if name in found else name
            unknown = sorted({r.class_name for r in source.records} - set(classes))
            if unknown:
                raise DatasetError(
                    f"data.external {entry} has images of class(es) {', '.join(unknown)}, which the model does not "
                    f"know ({', '.join(classes)}): drop those images (or rows) or use a model of those classes."
                )
            kept = screen_records(source.records, on_bad_file=self.hparams.on_bad_file, duplicates="none").records
            found[name] = [Record(r.path, classes.index(r.class_name), None, r.class_name) for r in kept]
            log.info("External test set %s (%s): %s", name, entry, class_counts(found[name], classes))
        self._external = found
        return found

    def test_dataloader(self) -> DataLoader | list[DataLoader]:
        """The test split's loader; with external sets a list: the test split's (when there is one), then theirs."""
        external = [k for k in self.datasets if k.startswith("external/")]
        if not external:
            self.test_sources = ["in-distribution"]
            return super().test_dataloader()
        has_test = self.has_test_split
        self.test_sources = ["in-distribution"] * has_test + [k.removeprefix("external/") for k in external]
        return [self._loader(k) for k in ["test"] * has_test + external]

    def _sample_weights(self) -> list[float] | None:
        if self.hparams.balance != "sampler":
            return None
        labels = [r.label for r in self.records["train"]]
        counts = np.bincount(labels, minlength=len(self.data_classes()))
        return [1.0 / counts[label] for label in labels]

    @property
    def class_names(self) -> tuple[str, ...]:
        """The data's classes, linked by the CLI to the classifier's ``class_names`` and ``num_classes``."""
        return self.data_classes()

    @property
    def class_weights(self) -> list[float] | None:
        """The classifier's loss weights (linked to ``model.class_weights``): None unless ``balance`` asks."""
        weights = self.hparams.balance
        if weights in ("none", "sampler", "logit_adjust"):
            return None
        if weights not in ("loss", "loss_sqrt"):
            return [float(w) for w in weights]
        counts = list(self.class_counts.values())
        present = sum(1 for c in counts if c > 0)
        power = 0.5 if weights == "loss_sqrt" else 1.0  # the square root corrects less: fewer false minority calls
        return [(sum(counts) / (present * c)) ** power if c > 0 else 0.0 for c in counts]

    @property
    def class_prior(self) -> list[float] | None:
        """The train split's class frequencies for ``balance: logit_adjust`` (linked to ``model.class_prior``)."""
        if self.hparams.balance != "logit_adjust":
            return None
        counts = np.asarray(list(self.class_counts.values()), dtype=float)
        return (counts.clip(min=1) / counts.clip(min=1).sum()).tolist()


class LungSegmentationDataModule(XRayDataModule):
    """Lung segmentation: images paired with ``<Class>/masks/<same name>`` (or a manifest's ``mask_path``);
    unpaired images skipped. Samples add ``"mask"``: float (1, S, S) in {0, 1}. Defaults follow the lab."""

    with_masks = True

    def __init__(self, image_size: int = 128, batch_size: int = 16, **kwargs: Any) -> None:
        super().__init__(image_size=image_size, batch_size=batch_size, **kwargs)
