"""Decode images once: fingerprints (thumbnails) and resized arrays, cached on disk by file identity."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedbrain.data.images import ImageError, load_grayscale, resize, thumbnail


def default_cache_dir() -> Path:
    return Path(os.environ.get("FEDBRAIN_CACHE", Path.home() / ".cache" / "fedbrain"))


def _identity(paths: Sequence[str], tag: str) -> str:
    h = hashlib.sha1(tag.encode())
    for p in paths:
        try:
            st = os.stat(p)
            h.update(f"{p}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        except OSError:
            h.update(f"{p}\0missing\n".encode())
    return h.hexdigest()[:20]


def _workers() -> int:
    return max(1, min(4, os.cpu_count() or 1))


@dataclass
class ImageIndex:
    """Per-file fingerprint or failure reason, in input order."""

    paths: list[str]
    thumbs: np.ndarray  # (N, 1024) float32; zero rows for failures
    ok: np.ndarray  # (N,) bool
    reasons: list[str | None]  # failure reason per file
    notes: list[str | None]  # mode conversion per file


def _fingerprint(path: str) -> tuple[np.ndarray | None, str | None, str | None]:
    try:
        arr, note = load_grayscale(path)
    except ImageError as exc:
        return None, exc.reason, None
    return thumbnail(arr), None, note


def index_images(paths: Sequence[str], cache_dir: Path | None = None, progress: bool = False) -> ImageIndex:
    """Decode every file once, keeping a 32x32 fingerprint or the reason it is unusable."""
    paths = list(paths)
    cache = (cache_dir or default_cache_dir()) / f"index-{_identity(paths, 'index-v1')}.npz"
    if cache.is_file():
        z = np.load(cache, allow_pickle=False)
        reasons = [r or None for r in z["reasons"].tolist()]
        notes = [n or None for n in z["notes"].tolist()]
        return ImageIndex(paths, z["thumbs"], z["ok"], reasons, notes)
    thumbs = np.zeros((len(paths), 1024), np.float32)
    ok = np.zeros(len(paths), bool)
    reasons: list[str | None] = [None] * len(paths)
    notes: list[str | None] = [None] * len(paths)
    with ThreadPoolExecutor(_workers()) as pool:
        results = pool.map(_fingerprint, paths)
        if progress:
            from tqdm import tqdm

            results = tqdm(results, total=len(paths), desc="indexing images", unit="img", disable=None)
        for i, (t, reason, note) in enumerate(results):
            if t is not None:
                thumbs[i], ok[i] = t, True
            reasons[i], notes[i] = reason, note
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_suffix(".tmp.npz")
    np.savez(tmp, thumbs=thumbs, ok=ok, reasons=np.array([r or "" for r in reasons]),
             notes=np.array([n or "" for n in notes]))
    tmp.replace(cache)
    return ImageIndex(paths, thumbs, ok, reasons, notes)


def _load_resized(args: tuple[str, int]) -> np.ndarray | None:
    path, size = args
    try:
        arr, _ = load_grayscale(path)
    except ImageError:
        return None
    return resize(arr, size)


def load_arrays(paths: Sequence[str], size: int, cache_dir: Path | None = None,
                progress: bool = False) -> np.ndarray:
    """All images as one ``(N, size, size)`` uint8 array (cached). Files that fail become black."""
    paths = list(paths)
    cache = (cache_dir or default_cache_dir()) / f"arrays-{size}-{_identity(paths, 'arrays-v1')}.npy"
    if cache.is_file():
        return np.load(cache)
    out = np.zeros((len(paths), size, size), np.uint8)
    failed: list[str] = []
    with ThreadPoolExecutor(_workers()) as pool:
        results = pool.map(_load_resized, [(p, size) for p in paths])
        if progress:
            from tqdm import tqdm

            results = tqdm(results, total=len(paths), desc=f"decoding {size}px", unit="img", disable=None)
        for i, a in enumerate(results):
            if a is None:
                failed.append(paths[i])
            else:
                out[i] = a
    if failed:  # the split was made from readable files: the data moved or the paths are wrong
        from fedbrain.data.readers import DataLayoutError

        raise DataLayoutError(f"{len(failed)} of {len(paths)} images of this split can no longer be read, "
                              f"e.g. {failed[0]!r}; re-create the split (fedbrain data split) or fix the data path")
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_suffix(".tmp.npy")
    np.save(tmp, out)
    tmp.replace(cache)
    return out
