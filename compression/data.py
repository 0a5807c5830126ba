"""Local data for calibration, fine-tuning and evaluation: the checkpoint's run splits, or a federation.

Calibration and fine-tuning read train-split images only; evaluation reads the union of the sites'
test splits.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedbrain.contract import Preprocessing, target_index
from fedbrain.data.federation import SiteData
from fedbrain.data.readers import Record


def run_dir_of(checkpoint: str | Path) -> Path | None:
    """``<run_dir>`` when the checkpoint sits in ``<run_dir>/checkpoints/``."""
    p = Path(checkpoint).resolve()
    return p.parent.parent if p.parent.name == "checkpoints" else None


def default_out_dir(checkpoint: str | Path) -> Path:
    """``<run_dir>/compression`` for run checkpoints, else ``<dir>/<stem>-compression``."""
    run = run_dir_of(checkpoint)
    p = Path(checkpoint)
    return run / "compression" if run else p.parent / f"{p.stem}-compression"


def sites_from_run(run_dir: str | Path | None) -> list[SiteData] | None:
    """The leak-free splits a run trained on (``<run_dir>/splits/<site>.csv``), or None."""
    if run_dir is None:
        return None
    files = sorted(Path(run_dir, "splits").glob("*.csv"))
    if not files:
        return None
    return [SiteData.read_split_file(f.stem, f) for f in files]


@dataclass
class LocalData:
    sites: list[SiteData]
    source: str  # where the splits came from, for the report

    def records(self, split: str) -> list[Record]:
        return [r for s in self.sites for r in s.splits[split]]


def evenly(records: list, n: int | None) -> list:
    """At most ``n`` records, evenly spaced (deterministic; keeps every site and class represented)."""
    if not n or n >= len(records):
        return list(records)
    idx = np.linspace(0, len(records) - 1, n).round().astype(int)
    return [records[i] for i in idx]


def sample(records: list, n: int, seed: int = 0) -> list:
    """A seeded random sample of at most ``n`` records."""
    if n >= len(records):
        return list(records)
    idx = np.sort(np.random.default_rng(seed).choice(len(records), n, replace=False))
    return [records[i] for i in idx]


def arrays(records: list[Record], pre: Preprocessing, cache_dir: Path | None = None,
           progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """uint8 ``(N, S, S)`` images at the contract size (decoded once, cached) and targets ``(N,)``."""
    from fedbrain.data.cache import load_arrays

    imgs = load_arrays([r.path for r in records], pre.image_size, cache_dir, progress)
    targets = np.array([target_index(r.label) for r in records], dtype=np.int64)
    return imgs, targets


def normalise(imgs: np.ndarray, pre: Preprocessing) -> np.ndarray:
    """uint8 ``(N, S, S)`` -> float32 ``(N, C, S, S)`` exactly as training and prediction do."""
    from fedbrain.data.dataset import to_tensor

    return to_tensor(imgs, pre).numpy()
