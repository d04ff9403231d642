"""Downstream noisy classification: a frozen front end (pixels, LCA or WARP-LCA codes) + a trained backbone.

Train on clean images through each front end; report the accuracy on clean and corrupted test sets
per (corruption, level), the mean corruption accuracy (mCA, unweighted over corrupted conditions) and the
front end's ms per image. Accuracy is micro-averaged everywhere (correct / images, not balanced accuracy).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset
from torchmetrics.classification import MulticlassAccuracy

from warplca.evaluation.robustness import CLEAN, CorruptedDataset, condition_name, robustness_conditions
from warplca.frontends import FrontEnd
from warplca.models.classifiers import BACKBONES, build_backbone
from warplca.settings import Annotated, Doc, Ge, Gt, Lt, OneOf, checked

__all__ = ["FeatureDataset", "FrontEndDataModule", "NoisyClassification", "precompute_features"]

log = logging.getLogger(__name__)


def _normalize_conditions(conditions: Sequence[Sequence[Any]] | Mapping[str, Sequence[float]] | None
                          ) -> list[tuple[str, float]]:
    if conditions is None or isinstance(conditions, Mapping):
        return robustness_conditions(conditions)
    out = [(str(name), float(level)) for name, level in conditions]
    if not out:
        raise ValueError("conditions must not be empty")
    return out


class NoisyClassification(pl.LightningModule):
    """Front end (frozen) + backbone classifier; tested per (corruption, level).

    Train / val batches are images ``(images, labels)`` or cached ``{"features", "labels"}``; test
    batches are images, test dataloader ``j`` the test set under ``conditions[j]``. After
    ``trainer.test``, :attr:`robustness_rows` holds one ``robustness.csv`` row per condition.

    Args:
        frontend: a :class:`~warplca.frontends.FrontEnd` (pixels, lca or warp_lca).
        backbone: a backbone name (built for the front end's feature shape) or a ready ``nn.Module``.
        image_size: side of the (square) input images.
        backbone_kwargs: extra arguments of a named backbone (e.g. ``width``, ``dropout``).
        lr, weight_decay: AdamW settings (of the backbone); ``scheduler``: ``cosine`` or ``none``.
        conditions: test conditions ``[(corruption, level), …]`` (``("clean", 0.0)`` included), or a
            mapping corruption → levels (clean is prepended); default: all corruptions at
            ``DEFAULT_LEVELS``.
    """

    #: how accuracies average over classes (torchmetrics' default is "macro"); stored in checkpoints
    ACCURACY_AVERAGE = "micro"

    @checked
    def __init__(self, frontend: FrontEnd,
                 backbone: Annotated[str | nn.Module, OneOf(BACKBONES, "backbone")] = "resnet18",
                 num_classes: Annotated[int, Ge(2)] = 10, image_size: Annotated[int, Ge(1)] = 32,
                 backbone_kwargs: Mapping[str, Any] | None = None,
                 lr: Annotated[float, Gt(0), Doc("AdamW on the backbone")] = 1e-3,
                 weight_decay: Annotated[float, Ge(0)] = 5e-4,
                 scheduler: Literal["cosine", "none"] = "cosine",
                 label_smoothing: Annotated[float, Ge(0), Lt(1)] = 0.0,
                 conditions: Sequence[Sequence[Any]] | Mapping[str, Sequence[float]] | None = None) -> None:
        super().__init__()
        self.conditions = _normalize_conditions(conditions)
        ignore = ["frontend"] + (["backbone"] if isinstance(backbone, nn.Module) else [])
        self.save_hyperparameters(ignore=ignore)
        self.hparams.update(frontend_kind=frontend.kind, conditions=[list(c) for c in self.conditions])
        self.frontend = frontend
        self.feature_shape = frontend.feature_shape(image_size, image_size)
        channels, height = self.feature_shape[:2]
        self.backbone = backbone if isinstance(backbone, nn.Module) else build_backbone(
            backbone, channels, num_classes, input_size=height, **dict(backbone_kwargs or {}))
        avg = self.ACCURACY_AVERAGE
        self.train_acc = MulticlassAccuracy(num_classes=num_classes, average=avg)
        self.val_acc = MulticlassAccuracy(num_classes=num_classes, average=avg)
        self.test_acc = nn.ModuleList(MulticlassAccuracy(num_classes=num_classes, average=avg)
                                      for _ in self.conditions)
        self._fe_ms = torch.zeros(2, dtype=torch.float64)  # [sum of ms, images] of the front end in test
        self.robustness_rows: list[dict[str, Any]] = []

    def forward(self, images: Tensor) -> Tensor:
        """Class logits of [0, 1] images (front end, then backbone)."""
        return self.backbone(self.frontend(images))

    def _unpack(self, batch: Any) -> tuple[Tensor, Tensor]:
        """(features, labels) from a feature batch (dict) or an image batch (tuple)."""
        if isinstance(batch, Mapping):
            return batch["features"].to(self.dtype), batch["labels"]
        return self.frontend(batch[0]), batch[1]

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        features, labels = self._unpack(batch)
        logits = self.backbone(features)
        loss = F.cross_entropy(logits, labels, label_smoothing=self.hparams.label_smoothing)
        self.train_acc(logits, labels)
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=True, batch_size=labels.shape[0])
        self.log("train/acc", self.train_acc, on_step=False, on_epoch=True, batch_size=labels.shape[0])
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        features, labels = self._unpack(batch)
        logits = self.backbone(features)
        loss = F.cross_entropy(logits, labels)
        self.val_acc(logits, labels)
        self.log("val/loss", loss, on_epoch=True, sync_dist=True, batch_size=labels.shape[0])
        self.log("val/acc", self.val_acc, on_epoch=True, prog_bar=True, batch_size=labels.shape[0])

    def configure_optimizers(self) -> Any:
        opt = torch.optim.AdamW(self.backbone.parameters(), lr=self.hparams.lr,
                                weight_decay=self.hparams.weight_decay)
        epochs = getattr(self.trainer, "max_epochs", None) if self._trainer is not None else None
        if self.hparams.scheduler == "none" or not epochs or epochs < 1:
            return opt
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "epoch"}}

    def on_test_epoch_start(self) -> None:
        for metric in self.test_acc:
            metric.reset()
        self._fe_ms = torch.zeros(2, dtype=torch.float64)
        self.robustness_rows = []

    def test_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        if dataloader_idx >= len(self.conditions):
            raise ValueError(f"test dataloader {dataloader_idx} has no condition: the module has "
                             f"{len(self.conditions)} conditions; build the test loaders with "
                             "FrontEndDataModule")
        images, labels = batch[0], batch[1]
        features, ms = self.frontend.timed(images)
        self._fe_ms += torch.tensor([ms * images.shape[0], images.shape[0]], dtype=torch.float64)
        self.test_acc[dataloader_idx].update(self.backbone(features), labels)

    def on_test_epoch_end(self) -> None:
        fe_ms = self._fe_ms.to(self.device)
        if self.trainer.world_size > 1:
            fe_ms = self.all_gather(fe_ms).reshape(-1, 2).sum(0)
        ms_per_image = float(fe_ms[0] / fe_ms[1].clamp_min(1.0))
        rows, corrupted = [], []
        for (corruption, level), metric in zip(self.conditions, self.test_acc, strict=True):
            if not metric.update_called:
                continue  # no loader for this condition (e.g. a plain datamodule's single test loader)
            acc = float(metric.compute())
            rows.append({"frontend": self.frontend.kind, "corruption": corruption, "level": float(level),
                         "accuracy": acc, "ms_per_image": ms_per_image})
            self.log(f"test/acc/{condition_name(corruption, level)}", acc, add_dataloader_idx=False)
            if corruption != CLEAN:
                corrupted.append(acc)
        if corrupted:
            self.log("test/mca", sum(corrupted) / len(corrupted), add_dataloader_idx=False)
        self.log("test/ms_per_image", ms_per_image, add_dataloader_idx=False)
        self.robustness_rows = rows

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Store the front end's description and the last test's rows with the weights."""
        checkpoint["frontend_spec"] = self.frontend.spec()
        checkpoint["robustness_rows"] = [dict(r) for r in self.robustness_rows]
        checkpoint["accuracy_average"] = self.ACCURACY_AVERAGE

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.robustness_rows = [dict(r) for r in checkpoint.get("robustness_rows", [])]


class FeatureDataset(Dataset):
    """In-memory ``{"features", "labels"}`` items (a front end's features of a fixed image split)."""

    def __init__(self, features: Tensor, labels: Tensor) -> None:
        if features.shape[0] != labels.shape[0]:
            raise ValueError(f"{features.shape[0]} feature maps but {labels.shape[0]} labels")
        self.features, self.labels = features, labels

    def __len__(self) -> int:
        return self.features.shape[0]

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        return {"features": self.features[index], "labels": self.labels[index]}


def precompute_features(frontend: FrontEnd, dataset: Dataset, batch_size: int = 256,
                        device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                        desc: str = "features") -> FeatureDataset:
    """Run ``frontend`` once over ``dataset`` ((image, label) items) and keep the features on the CPU."""
    device = torch.device(device)
    frontend = frontend.to(device)
    feats, labels, done, start = [], [], 0, time.perf_counter()
    n = len(dataset)  # type: ignore[arg-type]
    for images, y in DataLoader(dataset, batch_size=batch_size, shuffle=False):
        feats.append(frontend(images.to(device)).to("cpu", dtype))
        labels.append(torch.as_tensor(y, dtype=torch.int64))
        done += images.shape[0]
        if len(feats) % 10 == 0 or done == n:
            log.info("%s: %d/%d images through the %s front end (%.1fs)", desc, done, n, frontend.kind,
                     time.perf_counter() - start)
    return FeatureDataset(torch.cat(feats), torch.cat(labels))


class FrontEndDataModule(pl.LightningDataModule):
    """Feature-cached train/val loaders and one corrupted test loader per condition, over an image datamodule.

    Args:
        datamodule: an image datamodule with ``split_dataset(split)``; batches ``(images in [0, 1], labels)``.
        frontend: the front end whose features are cached (the module's).
        cache: ``True``, ``False`` or ``"auto"`` (cache unless the train loader augments).
        batch_size, test_batch_size: default: the datamodule's, ``batch_size``.
    """

    def __init__(self, datamodule: Any, frontend: FrontEnd,
                 conditions: Sequence[Sequence[Any]] | Mapping[str, Sequence[float]] | None = None,
                 cache: bool | str = "auto", corruption_seed: int = 0, batch_size: int | None = None,
                 test_batch_size: int | None = None, feature_batch_size: int = 256,
                 num_workers: int | None = None, cache_dtype: torch.dtype = torch.float32,
                 seed: int = 0) -> None:
        super().__init__()
        self.dm = datamodule
        self.frontend = frontend
        self.conditions = _normalize_conditions(conditions)
        augments = bool(getattr(datamodule, "crop_is_augmentation", False)
                        and getattr(datamodule, "crop_size", None) is not None)
        if cache == "auto":
            cache = not augments
        elif cache and augments:
            raise ValueError("cache=True but the datamodule augments its training images (crop_size is "
                             "set): cached features would freeze one augmentation; use cache=false or "
                             "drop crop_size")
        self.cache = bool(cache)
        self.corruption_seed = int(corruption_seed)
        self.batch_size = int(batch_size or getattr(datamodule, "batch_size", 64))
        self.test_batch_size = int(test_batch_size or self.batch_size)
        self.feature_batch_size = int(feature_batch_size)
        self.num_workers = int(getattr(datamodule, "num_workers", 0) if num_workers is None else num_workers)
        self.cache_dtype = cache_dtype
        self.seed = int(seed)
        self._cached: dict[str, FeatureDataset] = {}
        self.cache_seconds = 0.0

    @property
    def num_classes(self) -> int | None:
        return getattr(self.dm, "num_classes", None)

    def prepare_data(self) -> None:
        self.dm.prepare_data()

    def setup(self, stage: str | None = None) -> None:
        self.dm.setup(stage)

    def features(self, split: str) -> FeatureDataset:
        """The cached features of the clean ``split`` (computed on first use, on the trainer's device)."""
        if split not in self._cached:
            start, trainer = time.perf_counter(), getattr(self, "trainer", None)
            device = trainer.strategy.root_device if trainer is not None else torch.device("cpu")
            self._cached[split] = precompute_features(self.frontend, self.dm.split_dataset(split),
                                                      self.feature_batch_size, device, self.cache_dtype,
                                                      desc=f"{split} cache")
            self.cache_seconds += time.perf_counter() - start
        return self._cached[split]

    def _loader(self, dataset: Dataset, shuffle: bool, batch_size: int | None = None) -> DataLoader:
        generator = torch.Generator().manual_seed(self.seed) if shuffle else None
        workers = 0 if isinstance(dataset, FeatureDataset) else self.num_workers
        return DataLoader(dataset, batch_size=batch_size or self.batch_size, shuffle=shuffle,
                          generator=generator, num_workers=workers)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.features("train"), True) if self.cache else self.dm.train_dataloader()

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.features("val"), shuffle=False) if self.cache else self.dm.val_dataloader()

    def test_dataset(self, corruption: str, level: float) -> CorruptedDataset:
        """The test split under one condition (deterministic per item and ``corruption_seed``)."""
        return CorruptedDataset(self.dm.split_dataset("test"), corruption, level, self.corruption_seed)

    def test_dataloader(self) -> list[DataLoader]:
        return [self._loader(self.test_dataset(c, lvl), shuffle=False, batch_size=self.test_batch_size)
                for c, lvl in self.conditions]

