"""Near-duplicate detection across all sites: thumbnail correlation with and without a left-right flip."""

from __future__ import annotations

import numpy as np


class UnionFind:
    def __init__(self, n: int):
        self.parent = np.arange(n)

    def find(self, i: int) -> int:
        p = self.parent
        root = i
        while p[root] != root:
            root = p[root]
        while p[i] != root:
            p[i], i = root, p[i]
        return root

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)

    def labels(self) -> np.ndarray:
        """Cluster id per element: the smallest member index."""
        return np.array([self.find(i) for i in range(len(self.parent))])


def flip_thumbs(thumbs: np.ndarray) -> np.ndarray:
    """Left-right mirror of flattened 32x32 fingerprints."""
    side = int(round(np.sqrt(thumbs.shape[1])))
    return thumbs.reshape(-1, side, side)[:, :, ::-1].reshape(thumbs.shape)


def similar_pairs(thumbs: np.ndarray, threshold: float, block: int = 2048
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pairs (i < j) whose fingerprints correlate >= threshold, as they are or mirrored, with that correlation.

    Rows that are all zero (unusable images) never match.
    """
    t = np.ascontiguousarray(thumbs, dtype=np.float32)
    tf = np.ascontiguousarray(flip_thumbs(t))
    n = len(t)
    rows, cols, sims = [], [], []
    for start in range(0, n, block):
        stop = min(n, start + block)
        sim = np.maximum(t[start:stop] @ t.T, t[start:stop] @ tf.T)
        i, j = np.nonzero(sim >= threshold)
        i = i + start
        keep = i < j
        rows.append(i[keep])
        cols.append(j[keep])
        sims.append(sim[i[keep] - start, j[keep]])
    if not rows:
        return np.zeros(0, int), np.zeros(0, int), np.zeros(0, np.float32)
    return np.concatenate(rows), np.concatenate(cols), np.concatenate(sims)


def cluster(n: int, rows: np.ndarray, cols: np.ndarray, extra_links: list[tuple[int, int]] = ()) -> np.ndarray:
    """Transitive clusters (union-find) over the given pairs; returns a cluster id per item."""
    uf = UnionFind(n)
    for a, b in zip(rows, cols, strict=True):
        uf.union(int(a), int(b))
    for a, b in extra_links:
        uf.union(a, b)
    return uf.labels()


def pair_agreement(ours: np.ndarray, theirs: np.ndarray) -> dict[str, float]:
    """Pairwise precision/recall of 'same cluster' decisions of ``ours`` against ``theirs``."""
    from collections import Counter

    def same_pairs(a: np.ndarray) -> int:
        return sum(c * (c - 1) // 2 for c in Counter(a.tolist()).values())

    joint = same_pairs(np.array([f"{x}|{y}" for x, y in zip(ours, theirs, strict=True)]))
    ours_pairs, theirs_pairs = same_pairs(ours), same_pairs(theirs)
    precision = joint / ours_pairs if ours_pairs else 1.0
    recall = joint / theirs_pairs if theirs_pairs else 1.0
    return {"precision": precision, "recall": recall, "ours_pairs": ours_pairs, "theirs_pairs": theirs_pairs}
