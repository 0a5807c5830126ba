"""Paired statistics over seeds: one mode against a reference mode, seed by seed.

Two modes run at the same seed share their splits and their seed's data order, so their per-seed difference
cancels what the seed does to both. The mean difference gets a 95 % Student-t interval over the paired seeds
when there are at least :data:`MIN_PAIRED_SEEDS` of them; with fewer, only the differences are given, and each
run's own bootstrap-over-images interval (the ``_lo`` / ``_hi`` of its row) is the interval to read.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable

from scipy.stats import t as student_t

MIN_PAIRED_SEEDS = 3  # fewer paired seeds: no t-interval (its width would be meaningless)
LEVEL = 0.95
REFERENCE = "centralized"
# the headline metrics of a paired comparison; each also raw (before calibration) where the rows carry `_raw`
PAIRED_METRICS = ("macro_f1", "no_tumor_recall", "tumour_auroc")


def t_interval(values: Iterable[float], level: float = LEVEL) -> tuple[float, float | None, float | None]:
    """(mean, lo, hi): the mean with its Student-t interval; lo and hi None below MIN_PAIRED_SEEDS values."""
    xs = [float(v) for v in values]
    if not xs:
        raise ValueError("t_interval needs at least one value")
    mean = statistics.fmean(xs)
    if len(xs) < MIN_PAIRED_SEEDS:
        return mean, None, None
    half = student_t.ppf((1 + level) / 2, len(xs) - 1) * statistics.stdev(xs) / math.sqrt(len(xs))
    return mean, mean - half, mean + half


def _number(v) -> float | None:
    try:
        x = float(v)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(x) else x


def _by_seed(rows: list[dict], mode: str, site: str, key: str) -> dict[str, float]:
    out = {}
    for r in rows:
        if r.get("mode") == mode and r.get("site") == site and _number(r.get(key)) is not None:
            out[str(r["seed"])] = _number(r[key])
    return out


def paired_difference(rows: list[dict], mode: str, key: str, site: str, reference: str = REFERENCE) -> dict | None:
    """``mode`` minus ``reference`` on ``key`` at every seed both have: the per-seed differences, their mean and
    its t-interval (None where they share no seed)."""
    mine, ref = _by_seed(rows, mode, site, key), _by_seed(rows, reference, site, key)
    seeds = sorted(set(mine) & set(ref), key=lambda s: (len(s), s))
    if not seeds:
        return None
    diffs = {s: mine[s] - ref[s] for s in seeds}
    mean, lo, hi = t_interval(diffs.values())
    return {"n": len(seeds), "mean": mean, "lo": lo, "hi": hi, "per_seed": diffs}


def paired_gaps(rows: list[dict], site: str, reference: str = REFERENCE) -> dict[str, dict[str, dict]]:
    """For every federated mode: its paired difference to ``reference`` on each of :data:`PAIRED_METRICS`, and on
    ``<metric>_raw`` where both modes' rows carry it (``{mode: {key: paired_difference}}``)."""
    out: dict[str, dict[str, dict]] = {}
    modes = dict.fromkeys(r["mode"] for r in rows if r.get("kind") == "federated" and r.get("site") == site)
    keys = [k for m in PAIRED_METRICS for k in (m, f"{m}_raw")]
    for mode in modes:
        gaps = {k: d for k in keys if (d := paired_difference(rows, mode, k, site, reference)) is not None}
        if gaps:
            out[mode] = gaps
    return out


def describe_gap(d: dict, digits: int = 3) -> str:
    """``+0.012 [-0.004, 0.028] lead (3 seeds)``; without an interval, the per-seed differences."""
    sign = "lead" if d["mean"] > 0 else "behind" if d["mean"] < 0 else "level"
    if d["lo"] is None:
        per_seed = ", ".join(f"{v:+.{digits}f}" for v in d["per_seed"].values())
        return f"{d['mean']:+.{digits}f} {sign} ({d['n']} seed{'s' * (d['n'] > 1)}: {per_seed}; no interval below " \
               f"{MIN_PAIRED_SEEDS})"
    return f"{d['mean']:+.{digits}f} [{d['lo']:+.{digits}f}, {d['hi']:+.{digits}f}] {sign} ({d['n']} seeds)"
