"""Whole splits as arrays: decoded images at the contract size and their targets, and the model's input of them
(compression, evaluation of external folders, robustness)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from fedbrain.contract import Preprocessing, target_index
from fedbrain.data.cache import load_arrays
from fedbrain.data.dataset import to_tensor
from fedbrain.data.readers import Record


def arrays(records: list[Record], pre: Preprocessing, cache_dir: Path | None = None,
           progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """uint8 ``(N, S, S)`` images at the contract size (decoded once, cached) and targets ``(N,)``."""
    imgs = load_arrays([r.path for r in records], pre.image_size, cache_dir, progress)
    targets = np.array([target_index(r.label) for r in records], dtype=np.int64)
    return imgs, targets


def normalise(imgs: np.ndarray, pre: Preprocessing) -> np.ndarray:
    """uint8 ``(N, S, S)`` -> float32 ``(N, C, S, S)`` exactly as training and prediction do."""
    return to_tensor(imgs, pre).numpy()
