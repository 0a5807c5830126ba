"""Temperature scaling and reliability diagrams: one fit for pooled and federated runs.

Temperature scaling divides a model's logits by one number T fitted on validation data (Guo et al. 2017): the
argmax, hence accuracy and macro-F1, never changes; the probabilities do. The fit minimises the summed negative
log-likelihood over a fixed grid of temperatures. A pooled run computes that curve on its validation split; in a
federation every site computes the same curve on its own validation split (len(GRID) sums of per-image losses,
no image, no per-image value) and the server adds the sites' curves: the federated fit is exactly the pooled fit
of the union of the validation splits, to within the grid.

The likelihood follows the labels a site has: ``-log p(class)`` for typed labels and ``-log p(tumour)`` (the three
tumour classes summed) for "tumour, type unknown", as in training.
"""

from __future__ import annotations

import numpy as np

from fedbrain.contract import NO_TUMOR, NUM_CLASSES, TUMOUR_ANY

# log-spaced 0.25 .. 8 (steps of about 5 %); index 35 is T = 1
GRID: tuple[float, ...] = tuple(float(t) for t in np.exp(np.linspace(np.log(0.25), np.log(8.0), 71)))
NLL_PREFIX = "val_nll_t"  # metric keys a site sends: val_nll_t<i> = summed NLL of its validation split at GRID[i]
NLL_COUNT = "val_nll_n"  # and the number of images in those sums
RELIABILITY_BINS = 10
METHOD = "temperature scaling (grid of summed validation NLL)"
_TINY = 1e-30


def apply_temperature(probs: np.ndarray, temperature: float) -> np.ndarray:
    """Probabilities of ``logits / T`` from the probabilities of ``logits`` (softmax is shift-invariant per row)."""
    if temperature == 1.0 or len(probs) == 0:
        return probs
    z = np.log(np.maximum(np.asarray(probs, np.float64), _TINY)) / float(temperature)
    z -= z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return (e / e.sum(axis=1, keepdims=True)).astype(np.float32)


def nll_curve(probs: np.ndarray, targets: np.ndarray, grid: tuple[float, ...] = GRID) -> np.ndarray:
    """Summed negative log-likelihood of ``targets`` at every temperature of ``grid`` (``(len(grid),)``)."""
    targets = np.asarray(targets)
    out = np.zeros(len(grid), np.float64)
    if len(targets) == 0:
        return out
    typed = targets < NUM_CLASSES
    unknown = targets == TUMOUR_ANY
    for i, t in enumerate(grid):
        p = apply_temperature(probs, t).astype(np.float64)
        loss = -np.log(np.maximum(p[typed, targets[typed]], _TINY)).sum()
        loss += -np.log(np.maximum(1.0 - p[unknown, NO_TUMOR], _TINY)).sum()
        out[i] = loss
    return out


def fit_temperature(curve: np.ndarray, grid: tuple[float, ...] = GRID) -> float:
    """The grid temperature with the least summed NLL (1.0 for an empty or non-finite curve)."""
    curve = np.asarray(curve, np.float64)
    if len(curve) != len(grid) or not np.isfinite(curve).all() or not curve.any():
        return 1.0
    return float(grid[int(np.argmin(curve))])


def fit(probs: np.ndarray, targets: np.ndarray, fitted_on: str) -> dict:
    """The calibration record of a pooled fit, as the model card stores it."""
    curve = nll_curve(probs, targets)
    return calibration_record(curve, len(targets), fitted_on)


def calibration_record(curve: np.ndarray, n: int, fitted_on: str) -> dict:
    """``{"temperature", "nll_before", "nll_after", "n", "fitted_on"}`` from a summed NLL curve over ``n`` images."""
    t = fit_temperature(curve)
    one = int(np.argmin(np.abs(np.log(np.asarray(GRID)))))
    i = GRID.index(t) if t in GRID else one
    per = max(1, n)
    return {"temperature": t, "nll_before": float(curve[one] / per) if n else None,
            "nll_after": float(curve[i] / per) if n else None, "n": int(n), "fitted_on": fitted_on,
            "method": METHOD}


def curve_metrics(probs: np.ndarray, targets: np.ndarray) -> dict[str, float]:
    """What a site sends for the federated fit: its NLL curve (``val_nll_t<i>``) and its image count."""
    curve = nll_curve(probs, targets)
    return {**{f"{NLL_PREFIX}{i}": float(v) for i, v in enumerate(curve)}, NLL_COUNT: float(len(targets))}


def pooled_curve(rows: list[dict]) -> tuple[np.ndarray, int] | None:
    """The sum of the sites' NLL curves and image counts (None when no site sent one)."""
    total, n, seen = np.zeros(len(GRID)), 0, False
    for r in rows:
        keys = [f"{NLL_PREFIX}{i}" for i in range(len(GRID))]
        if not all(k in r for k in keys):
            continue
        vals = np.array([float(r[k]) for k in keys])
        count = float(r.get(NLL_COUNT, 0))
        if not np.isfinite(vals).all() or not (0 <= count < 1e9):
            continue
        total += vals
        n += int(count)
        seen = True
    return (total, n) if seen else None


def reliability(probs: np.ndarray, targets: np.ndarray, bins: int = RELIABILITY_BINS) -> dict:
    """Reliability diagrams: per confidence bin, the mean confidence, the observed frequency and the count, for
    the top class (typed labels) and for the tumour probability (all labels)."""
    targets = np.asarray(targets)
    out = {}
    known = targets < NUM_CLASSES
    if known.any() and (targets[known] != NO_TUMOR).any():
        p = probs[known]
        out["class"] = _bins(p.max(1), (p.argmax(1) == targets[known]).astype(float), bins, 1.0 / p.shape[1])
    if len(targets):
        p_tumour = 1.0 - probs[:, NO_TUMOR]
        out["tumour"] = _bins(p_tumour, (targets != NO_TUMOR).astype(float), bins, 0.0)
    return out


def _bins(confidence: np.ndarray, outcome: np.ndarray, bins: int, low: float) -> list[dict]:
    edges = np.linspace(low, 1.0, bins + 1)
    idx = np.clip(np.searchsorted(edges, confidence, side="right") - 1, 0, bins - 1)
    rows = []
    for b in range(bins):
        m = idx == b
        rows.append({"lo": float(edges[b]), "hi": float(edges[b + 1]), "n": int(m.sum()),
                     "confidence": float(confidence[m].mean()) if m.any() else None,
                     "observed": float(outcome[m].mean()) if m.any() else None})
    return rows


__all__ = ["GRID", "apply_temperature", "nll_curve", "fit_temperature", "fit", "calibration_record",
           "curve_metrics", "pooled_curve", "reliability", "NLL_PREFIX", "NLL_COUNT"]
