"""Calibrated probabilities: one fit for pooled and federated runs, and reliability diagrams.

The four class probabilities factor as p(tumour) and p(type | tumour), and each level is calibrated on the labels
that speak to it (every site has tumour / no tumour labels, only some have tumour types):

- the tumour probability by Platt scaling of its log-odds: ``sigmoid(a * z + b)``, ``z = log p(tumour) - log
  p(no_tumor)``, fitted by the least log-loss on every validation image with Platt's (1999) target smoothing;
- the tumour types by one temperature on their log-probabilities (temperature scaling, Guo et al. 2017, within
  the tumour classes), fitted by the least Brier score on the validation images whose tumour type is known. The
  log-loss would let a few confident type confusions soften every answer: on the benchmark federation the
  NLL-optimal temperature left a class ECE of 0.07, the Brier-optimal one 0.04.

Then ``p(no_tumor) = 1 - p'(tumour)`` and ``p(type) = p'(tumour) * p'(type | tumour)``. Within the tumour types the
ranking never changes; between a tumour type and no_tumor the argmax can, so the metrics of a calibrated model are
those of its calibrated probabilities.

Both fits read sums only. A site sends, for its validation split, the counts of tumour and of healthy images in
each bin of the tumour log-odds, the counts of typed tumour images per type, and its summed type Brier score at
every grid temperature (no image, no per-image value); the server adds the sites' sums and fits. The federated fit
is exactly the pooled fit of the union of the validation splits, to within the bin width and the grid; a pooled
run fits through the same sums.

Older model cards carry one temperature on all four logits (``{"temperature": T}``): :class:`Calibrator` applies
them as before.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from fedbrain.contract import NO_TUMOR, NUM_CLASSES, TUMOUR_CLASSES

# type temperatures: log-spaced 0.25 .. 8 (steps of about 5 %); index 35 is T = 1
GRID: tuple[float, ...] = tuple(float(t) for t in np.exp(np.linspace(np.log(0.25), np.log(8.0), 71)))
LOGIT_RANGE, LOGIT_BINS = 16.0, 128  # tumour log-odds histogram: [-16, 16] in bins of 0.25 (the ends catch more)
BIN_CENTRES = -LOGIT_RANGE + (np.arange(LOGIT_BINS) + 0.5) * (2 * LOGIT_RANGE / LOGIT_BINS)
MIN_FIT = 10  # a level is fitted only on at least this many images of each of two outcomes (else left as is)
PREFIX = "val_cal_"  # metric keys a site sends for the fit (summed by the server, never averaged)
METHOD = ("Platt scaling of the tumour log-odds (log-loss) and a temperature on the tumour types (Brier score), "
          "fitted from summed validation statistics")
RELIABILITY_BINS = 10
_TINY = 1e-30
_ONE = GRID.index(min(GRID, key=lambda t: abs(math.log(t))))
_TYPES = list(TUMOUR_CLASSES)


def apply_temperature(probs: np.ndarray, temperature: float) -> np.ndarray:
    """Probabilities of ``logits / T`` from the probabilities of ``logits`` (softmax is shift-invariant per row)."""
    if temperature == 1.0 or len(probs) == 0:
        return probs
    z = np.log(np.maximum(np.asarray(probs, np.float64), _TINY)) / float(temperature)
    z -= z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return (e / e.sum(axis=1, keepdims=True)).astype(np.float32)


def tumour_logodds(probs: np.ndarray) -> np.ndarray:
    """``log p(tumour) - log p(no_tumor)`` per row (finite: both are floored at 1e-30)."""
    p = np.asarray(probs, np.float64)
    tumour = np.maximum(p[:, _TYPES].sum(1), _TINY)
    return np.log(tumour) - np.log(np.maximum(p[:, NO_TUMOR], _TINY))


def _type_shares(probs: np.ndarray, temperature: float) -> np.ndarray:
    """``p(type | tumour)`` (``(N, 3)``) after dividing the types' log-probabilities by ``temperature``."""
    lq = np.log(np.maximum(np.asarray(probs, np.float64)[:, _TYPES], _TINY)) / float(temperature)
    lq -= lq.max(1, keepdims=True)
    q = np.exp(lq)
    return q / q.sum(1, keepdims=True)


def _sigmoid(s: np.ndarray) -> np.ndarray:
    return np.exp(-np.logaddexp(0.0, -s))


@dataclass(frozen=True)
class Calibrator:
    """The calibration a model card carries; :meth:`apply` maps raw class probabilities to calibrated ones."""

    tumour_slope: float = 1.0
    tumour_bias: float = 0.0
    type_temperature: float = 1.0
    temperature: float = 1.0  # older cards: one temperature on all four logits

    @classmethod
    def from_record(cls, record: dict | None) -> Calibrator:
        """The calibrator of a card's ``calibration`` record (identity for an empty or malformed one)."""
        record = record or {}

        def num(key: str, default: float, positive: bool = False) -> float:
            v = record.get(key)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
                return default
            return float(v) if v > 0 or not positive else default

        if "tumour_slope" in record or "type_temperature" in record:
            return cls(num("tumour_slope", 1.0, True), num("tumour_bias", 0.0), num("type_temperature", 1.0, True))
        return cls(temperature=num("temperature", 1.0, True))

    @property
    def identity(self) -> bool:
        return self == Calibrator()

    def params(self) -> dict[str, float]:
        """The parameters that differ from the identity (``{}``: uncalibrated)."""
        if self.temperature != 1.0:
            return {"temperature": self.temperature}
        return {} if self.identity else {"tumour_slope": self.tumour_slope, "tumour_bias": self.tumour_bias,
                                         "type_temperature": self.type_temperature}

    def describe(self) -> str:
        """One line for tables and captions."""
        if self.identity:
            return "uncalibrated"
        if self.temperature != 1.0:
            return f"temperature {self.temperature:.3g}"
        return (f"tumour log-odds x{self.tumour_slope:.3g} {self.tumour_bias:+.3g}, "
                f"type temperature {self.type_temperature:.3g}")

    def apply(self, probs: np.ndarray) -> np.ndarray:
        """Calibrated probabilities (float32) of raw class probabilities ``(N, 4)``."""
        probs = np.asarray(probs)
        if self.identity or len(probs) == 0:
            return probs.astype(np.float32)
        if self.temperature != 1.0:
            return apply_temperature(probs, self.temperature).astype(np.float32)
        tumour = _sigmoid(self.tumour_slope * tumour_logodds(probs) + self.tumour_bias)
        out = np.empty(probs.shape, np.float64)
        out[:, NO_TUMOR] = 1.0 - tumour
        out[:, _TYPES] = _type_shares(probs, self.type_temperature) * tumour[:, None]
        return out.astype(np.float32)


# ---------------------------------------------------------------- what a site sends, what the server sums


def _bin_of(z: np.ndarray) -> np.ndarray:
    width = 2 * LOGIT_RANGE / LOGIT_BINS
    return np.clip(np.floor((z + LOGIT_RANGE) / width).astype(int), 0, LOGIT_BINS - 1)


def type_brier_curve(probs: np.ndarray, targets: np.ndarray, grid: tuple[float, ...] = GRID) -> np.ndarray:
    """Summed Brier score of ``p(type | tumour)`` on the typed tumour images at every grid temperature."""
    targets = np.asarray(targets)
    typed = np.isin(targets, _TYPES)
    out = np.zeros(len(grid), np.float64)
    if not typed.any():
        return out
    onehot = np.eye(len(_TYPES))[np.searchsorted(_TYPES, targets[typed])]
    for i, t in enumerate(grid):
        out[i] = ((_type_shares(np.asarray(probs)[typed], t) - onehot) ** 2).sum()
    return out


def site_sums(probs: np.ndarray, targets: np.ndarray) -> dict[str, float]:
    """What a site sends for the fit: ``val_cal_pos_<bin>`` / ``val_cal_neg_<bin>`` (tumour and healthy images
    per log-odds bin), ``val_cal_types_<k>`` (typed tumour images per type) and ``val_cal_brier_<i>``."""
    targets = np.asarray(targets)
    if len(targets) == 0:
        return {}
    bins = _bin_of(tumour_logodds(probs))
    healthy = targets == NO_TUMOR
    out: dict[str, float] = {}
    for name, mask in (("pos", ~healthy), ("neg", healthy)):
        for b, c in enumerate(np.bincount(bins[mask], minlength=LOGIT_BINS)):
            out[f"{PREFIX}{name}_{b}"] = float(c)
    for k, cls in enumerate(_TYPES):
        out[f"{PREFIX}types_{k}"] = float((targets == cls).sum())
    out.update({f"{PREFIX}brier_{i}": float(v) for i, v in enumerate(type_brier_curve(probs, targets))})
    return out


@dataclass
class Sums:
    """The sites' sums: log-odds histograms of tumour (``pos``) and healthy (``neg``) images, typed tumour images
    per type, and the summed type Brier curve."""

    pos: np.ndarray
    neg: np.ndarray
    types: np.ndarray
    brier: np.ndarray

    @classmethod
    def of(cls, rows: list[dict]) -> Sums | None:
        """The sum over the sites' rows that carry a complete, sane set of keys (None when none does)."""
        names = ([f"{PREFIX}pos_{b}" for b in range(LOGIT_BINS)] + [f"{PREFIX}neg_{b}" for b in range(LOGIT_BINS)]
                 + [f"{PREFIX}types_{k}" for k in range(len(_TYPES))]
                 + [f"{PREFIX}brier_{i}" for i in range(len(GRID))])
        total, seen = np.zeros(len(names)), False
        for r in rows:
            try:
                vals = np.array([float(r[k]) for k in names])
            except (KeyError, TypeError, ValueError):
                continue
            counts = vals[:2 * LOGIT_BINS + len(_TYPES)]
            if not np.isfinite(vals).all() or (vals < 0).any() or (counts >= 1e9).any():
                continue
            total += vals
            seen = True
        if not seen:
            return None
        a, b = LOGIT_BINS, 2 * LOGIT_BINS
        return cls(total[:a], total[a:b], total[b:b + len(_TYPES)], total[b + len(_TYPES):])

    @property
    def n(self) -> int:
        return int(self.pos.sum() + self.neg.sum())


# ---------------------------------------------------------------- fitting


def _binary_loss(a: float, b: float, pos: np.ndarray, neg: np.ndarray, t_pos: float = 1.0,
                 t_neg: float = 0.0) -> float:
    s = a * BIN_CENTRES + b
    lp, ln = np.logaddexp(0.0, -s), np.logaddexp(0.0, s)  # -log sigmoid(s), -log (1 - sigmoid(s))
    return float((pos * (t_pos * lp + (1 - t_pos) * ln)).sum() + (neg * (t_neg * lp + (1 - t_neg) * ln)).sum())


def fit_platt(pos: np.ndarray, neg: np.ndarray) -> tuple[float, float]:
    """Platt's slope and bias on binned log-odds: the least log-loss with his smoothed targets
    ``(N+ + 1) / (N+ + 2)`` and ``1 / (N- + 2)`` (Newton's method with a backtracking line search)."""
    n_pos, n_neg = float(pos.sum()), float(neg.sum())
    t_pos, t_neg = (n_pos + 1) / (n_pos + 2), 1 / (n_neg + 2)
    w = pos + neg
    target = pos * t_pos + neg * t_neg  # the summed target of each bin
    x = np.stack([BIN_CENTRES, np.ones(LOGIT_BINS)], 1)
    theta = np.array([1.0, 0.0])
    loss = _binary_loss(*theta, pos, neg, t_pos, t_neg)
    for _ in range(100):
        p = _sigmoid(x @ theta)
        grad = x.T @ (w * p - target)
        hess = x.T @ (x * (w * p * (1 - p))[:, None]) + 1e-9 * np.eye(2)
        step = np.linalg.solve(hess, grad)
        scale = 1.0
        while scale > 1e-6:
            cand = theta - scale * step
            new = _binary_loss(*cand, pos, neg, t_pos, t_neg)
            if new <= loss:
                break
            scale /= 2
        if scale <= 1e-6:
            break
        theta, old, loss = cand, loss, new
        if old - loss < 1e-10 * max(1.0, abs(old)):
            break
    return float(theta[0]), float(theta[1])


def fit_sums(sums: Sums | None, fitted_on: str) -> dict:
    """The calibration record of summed validation statistics, as the model card stores it: the parameters
    (``tumour_slope``, ``tumour_bias``, ``type_temperature``), each level's fit (``tumour``: n, tumour and healthy
    images, log-loss before / after; ``type``: typed tumour images, Brier score before / after; ``fitted``: False
    where a level had too few images and was left as is), ``n``, ``fitted_on`` and ``method``. Empty when there
    are no sums."""
    if sums is None or sums.n == 0:
        return {}
    n_pos, n_neg = int(sums.pos.sum()), int(sums.neg.sum())
    a, b, fitted = 1.0, 0.0, False
    if min(n_pos, n_neg) >= MIN_FIT:
        a, b = fit_platt(sums.pos, sums.neg)
        fitted = a > 0 and math.isfinite(a) and math.isfinite(b)  # a reversed ranking is not calibrated away
        a, b = (a, b) if fitted else (1.0, 0.0)
    tumour: dict = {"n": n_pos + n_neg, "n_tumour": n_pos, "n_healthy": n_neg, "fitted": bool(fitted),
                    "nll_before": _binary_loss(1.0, 0.0, sums.pos, sums.neg) / (n_pos + n_neg),
                    "nll_after": _binary_loss(a, b, sums.pos, sums.neg) / (n_pos + n_neg)}
    n_typed = int(sums.types.sum())
    fitted = bool(np.sort(sums.types)[-2] >= MIN_FIT and sums.brier.any())
    t = float(GRID[int(np.argmin(sums.brier))]) if fitted else 1.0
    types: dict = {"n": n_typed, "fitted": fitted}
    if n_typed:
        types["brier_before"] = float(sums.brier[_ONE] / n_typed)
        types["brier_after"] = float(sums.brier[GRID.index(t) if t in GRID else _ONE] / n_typed)
    return {"tumour_slope": a, "tumour_bias": b, "type_temperature": t, "tumour": tumour, "type": types,
            "n": sums.n, "fitted_on": fitted_on, "method": METHOD}


_COUNTS = ("n", "n_tumour", "n_healthy")


def to_scalars(record: dict) -> dict[str, float]:
    """A calibration record's numbers as flat scalars (a level's ``fitted`` as 0 / 1; ``tumour__nll_before``)."""
    out = {}
    for k, v in record.items():
        if isinstance(v, dict):
            out.update({f"{k}__{kk}": float(vv) for kk, vv in v.items() if isinstance(vv, (int, float))})
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            out[k] = float(v)
    return out


def from_scalars(flat: dict) -> dict:
    """The record of :func:`to_scalars`' output (``fitted_on`` left empty); ``{}`` when its parameters are missing
    or not finite."""
    flat = {k: v for k, v in flat.items() if isinstance(v, (int, float)) and math.isfinite(v)}
    if not all(k in flat for k in ("tumour_slope", "tumour_bias", "type_temperature", "n")):
        return {}
    record: dict = {"fitted_on": "", "method": METHOD}
    for k, v in flat.items():
        level, _, key = k.partition("__")
        value = int(v) if (key or level) in _COUNTS else bool(v) if key == "fitted" else float(v)
        if key:
            record.setdefault(level, {})[key] = value
        else:
            record[level] = value
    return record


def keep_unfitted(new: dict, previous: dict) -> dict:
    """``new`` with each level it could not fit taken from ``previous`` (a model's two-level record), the level
    saying where from; ``new`` as it is when ``previous`` has no two-level fit (none, or an older temperature)."""
    if not new or "tumour_slope" not in (previous or {}):
        return new
    out = {**new, "tumour": dict(new.get("tumour") or {}), "type": dict(new.get("type") or {})}
    source = previous.get("fitted_on") or "the model's previous calibration"
    if not out["tumour"].get("fitted"):
        out["tumour_slope"], out["tumour_bias"] = previous["tumour_slope"], previous["tumour_bias"]
        out["tumour"]["kept_from"] = source
    if not out["type"].get("fitted"):
        out["type_temperature"] = previous["type_temperature"]
        out["type"]["kept_from"] = source
    return out


def notes(record: dict) -> list[str]:
    """Why a level of a calibration record was not fitted, and what it holds instead (nothing for older,
    temperature-only records)."""
    out = []
    tumour, types = record.get("tumour") or {}, record.get("type") or {}
    if tumour and not tumour.get("fitted"):
        few = min(tumour.get("n_tumour", 0), tumour.get("n_healthy", 0)) < MIN_FIT
        why = (f"{tumour.get('n_tumour', 0)} tumour and {tumour.get('n_healthy', 0)} healthy images (the fit needs "
               f"{MIN_FIT} of each)" if few else "the fit would reverse its ranking")
        held = f"kept from {tumour['kept_from']}" if tumour.get("kept_from") else "left as is"
        out.append(f"tumour probability {held}: {why}")
    if types and not types.get("fitted"):
        held = f"kept from {types['kept_from']}" if types.get("kept_from") else "left as is"
        out.append(f"tumour types {held}: the fit needs {MIN_FIT} images of each of two tumour types "
                   f"({types.get('n', 0)} typed tumour images)")
    return out


def fit(probs: np.ndarray, targets: np.ndarray, fitted_on: str) -> dict:
    """The calibration record of a pooled fit (through the same sums a federation adds up)."""
    return fit_sums(Sums.of([site_sums(probs, targets)]), fitted_on)


# ---------------------------------------------------------------- reliability diagrams


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


__all__ = ["GRID", "Calibrator", "Sums", "apply_temperature", "tumour_logodds", "type_brier_curve", "site_sums",
           "fit_platt", "fit_sums", "fit", "to_scalars", "from_scalars", "keep_unfitted", "notes", "reliability",
           "PREFIX", "METHOD", "MIN_FIT"]
