"""PyTorch datasets over a site's records: decoded once, normalised by the contract, augmented in training only."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from fedbrain.contract import Augmentation, Preprocessing, target_index
from fedbrain.data.cache import load_arrays
from fedbrain.data.federation import SPLITS, SiteData
from fedbrain.data.readers import Record


def normalise(x01: torch.Tensor, pre: Preprocessing) -> torch.Tensor:
    """``(N, 1, H, W)`` slices in [0, 1] -> the contract's channels and normalisation ``(N, C, H, W)``."""
    if pre.channels > 1:
        x01 = x01.expand(-1, pre.channels, -1, -1)
    mean = torch.tensor(pre.mean, dtype=torch.float32).view(1, -1, 1, 1)
    std = torch.tensor(pre.std, dtype=torch.float32).view(1, -1, 1, 1)
    return (x01 - mean) / std


def to_tensor(arrays: np.ndarray, pre: Preprocessing) -> torch.Tensor:
    """uint8 ``(N, H, W)`` greyscale slices (already at the contract size) -> normalised ``(N, C, H, W)``."""
    return normalise(torch.from_numpy(np.ascontiguousarray(arrays)).float().div_(255.0).unsqueeze(1), pre)


def augment_batch(x: torch.Tensor, aug: Augmentation, generator: torch.Generator) -> torch.Tensor:
    """Random flip, rotation, scale, shift, gamma, brightness and contrast on a batch of [0, 1] images."""
    n = x.shape[0]

    def uniform(lo: float, hi: float) -> torch.Tensor:
        return torch.rand(n, generator=generator) * (hi - lo) + lo

    angle = uniform(-aug.max_rotate_deg, aug.max_rotate_deg) * torch.pi / 180
    scale = uniform(*aug.scale)
    flip = torch.where(torch.rand(n, generator=generator) < 0.5, -1.0, 1.0) if aug.hflip else torch.ones(n)
    tx, ty = uniform(-aug.translate, aug.translate) * 2, uniform(-aug.translate, aug.translate) * 2
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos * flip, -sin, tx], 1), torch.stack([sin * flip, cos, ty], 1)], 1)
    grid = torch.nn.functional.affine_grid(theta, list(x.shape), align_corners=False)
    x = torch.nn.functional.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    if tuple(aug.gamma) != (1.0, 1.0):
        lo, hi = math.log(aug.gamma[0]), math.log(aug.gamma[1])
        x = x.clamp(0, 1) ** torch.exp(uniform(lo, hi)).view(-1, 1, 1, 1)
    b = uniform(-aug.brightness, aug.brightness).view(-1, 1, 1, 1)
    c = uniform(1 - aug.contrast, 1 + aug.contrast).view(-1, 1, 1, 1)
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return ((x - mean) * c + mean + b).clamp_(0, 1)


class SliceDataset(Dataset):
    """In-memory slices of one split. Targets: class index 0..3, or 4 for 'tumour, type unknown'."""

    def __init__(self, records: Sequence[Record], pre: Preprocessing, cache_dir: Path | None = None,
                 progress: bool = False):
        self.records = list(records)
        self.pre = pre
        self.images = load_arrays([r.path for r in self.records], pre.image_size, cache_dir, progress)
        self.targets = torch.tensor([target_index(r.label) for r in self.records], dtype=torch.long)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.from_numpy(self.images[i]), self.targets[i]


class BatchLoader:
    """Fast in-memory batches: shuffle (seeded), augment (train only), normalise by the contract."""

    def __init__(self, ds: SliceDataset, batch_size: int = 32, train: bool = False,
                 augmentation: Augmentation | None = None, seed: int = 0, features=None):
        self.ds, self.batch_size, self.train = ds, batch_size, train
        self.augmentation = augmentation if train else None
        self.generator = torch.Generator().manual_seed(seed)
        self.features = features  # a fedbrain.features.FeatureCache: batches of trunk features, not images
        self.head = features.head if features is not None else None  # what the training core runs on them

    def __len__(self) -> int:
        return (len(self.ds) + self.batch_size - 1) // self.batch_size

    def __iter__(self):
        n = len(self.ds)
        order = torch.randperm(n, generator=self.generator) if self.train else torch.arange(n)
        for start in range(0, n, self.batch_size):
            idx = order[start:start + self.batch_size]
            if self.train and len(idx) < 2 and n >= 2:  # BatchNorm cannot train on one sample
                continue
            yield make_batch(self.ds, idx, self.augmentation, self.generator, self.features)


def make_batch(ds: SliceDataset, idx: torch.Tensor, augmentation: Augmentation | None,
               generator: torch.Generator, features=None) -> tuple[torch.Tensor, torch.Tensor]:
    """The images ``idx`` of ``ds`` as one normalised (and, with ``augmentation``, augmented) batch; with
    ``features`` (a :class:`fedbrain.features.FeatureCache`), their cached trunk features instead."""
    if features is not None:
        return features.of(ds)[idx], ds.targets[idx]
    raw = torch.from_numpy(ds.images[idx.numpy()]).float().div_(255.0).unsqueeze(1)
    if augmentation is not None and augmentation.changes_images:
        raw = augment_batch(raw, augmentation, generator)
    return normalise(raw, ds.pre), ds.targets[idx]


class PoissonLoader:
    """DP-SGD's batches: each takes every image independently with probability ``rate``, so a batch's size is
    random (the privacy accounting assumes it); ``len``: the batches of one expected pass. The draws come from
    OS entropy unless a ``seed`` is given (tests): a known seed would tell which images each step used."""

    def __init__(self, ds: SliceDataset, rate: float, augmentation: Augmentation | None = None,
                 seed: int | None = None, features=None):
        import secrets

        self.ds, self.rate, self.augmentation = ds, rate, augmentation
        self.features, self.head = features, features.head if features is not None else None
        self.generator = torch.Generator().manual_seed(secrets.randbits(63) if seed is None else seed)

    def __len__(self) -> int:
        return max(1, round(1 / self.rate))

    def __iter__(self):
        for _ in range(len(self)):
            idx = (torch.rand(len(self.ds), generator=self.generator) < self.rate).nonzero().flatten()
            if len(idx):  # an empty draw (chance (1-rate)^n, negligible at DP's batch sizes) takes no step
                yield make_batch(self.ds, idx, self.augmentation, self.generator, self.features)


UNION = "union"  # the pooled test split of every site: the headline of every results table


@dataclass
class SiteLoaders:
    """Loaders of one site's splits at one preprocessing (decoded once, cached on disk)."""

    site: SiteData
    pre: Preprocessing
    batch_size: int = 32
    augmentation: Augmentation = field(default_factory=Augmentation)
    cache_dir: Path | None = None
    features: object = None  # a fedbrain.features.FeatureCache: train/eval/poisson batches of trunk features
    _ds: dict = field(default_factory=dict)

    def dataset(self, split: str) -> SliceDataset:
        if split not in self._ds:
            self._ds[split] = SliceDataset(self.site.splits[split], self.pre, self.cache_dir)
        return self._ds[split]

    def train(self, seed: int = 0, batch_size: int | None = None) -> BatchLoader:
        return BatchLoader(self.dataset("train"), batch_size or self.batch_size, True, self.augmentation, seed,
                           self.features)

    def poisson(self, rate: float, seed: int | None = None) -> PoissonLoader:
        """DP-SGD's Poisson batches of the training split."""
        return PoissonLoader(self.dataset("train"), rate, self.augmentation, seed, self.features)

    def eval(self, split: str) -> BatchLoader:
        return BatchLoader(self.dataset(split), max(64, self.batch_size), False, features=self.features)


def pooled_site(name: str, sites: list[SiteData]) -> SiteData:
    """All given sites' splits pooled into one (the centralised baseline's data, or the union test set)."""
    splits = {s: [r for site in sites for r in site.splits[s]] for s in SPLITS}
    return SiteData(name, "mixed", splits, {})


def site_loaders(sites: dict[str, SiteData], pre: Preprocessing, batch_size: int = 64,
                 cache_dir: Path | None = None, union: str | None = UNION) -> dict[str, SiteLoaders]:
    """Evaluation loaders for every site and, with ``union``, for their pooled splits."""
    out = {n: SiteLoaders(s, pre, batch_size, cache_dir=cache_dir) for n, s in sites.items()}
    if union:
        out[union] = SiteLoaders(pooled_site(union, list(sites.values())), pre, batch_size, cache_dir=cache_dir)
    return out


__all__ = ["UNION", "SliceDataset", "BatchLoader", "PoissonLoader", "make_batch", "SiteLoaders", "normalise",
           "to_tensor", "augment_batch",
           "pooled_site", "site_loaders"]
