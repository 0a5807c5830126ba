"""Scoring a model on every site's split and on their union, and the results table the CLI prints."""

from __future__ import annotations

import numpy as np
import torch

from fedbrain.calibration import Calibrator, reliability
from fedbrain.contract import CLASSES, NO_TUMOR, NUM_CLASSES, TUMOUR_CLASSES
from fedbrain.data.dataset import UNION, SiteLoaders
from fedbrain.data.federation import SiteData
from fedbrain.runs import fmt_metric
from fedbrain.training import calibration_error, compute_metrics, predict_proba

__all__ = ["UNION", "evaluate_everywhere", "results_table", "split_differences", "bootstrap_ci", "small_n_flags",
           "evaluate_with_uncertainty", "scored", "calibration_line", "fmt_metric", "MIN_CLASS_N"]


def evaluate_everywhere(model: torch.nn.Module, loaders: dict[str, SiteLoaders], split: str = "test",
                        n_boot: int = 1000, calibrator: Calibrator | None = None) -> dict:
    """Metrics on every site's ``split`` and on their union (sites with an empty split are left out), each with
    95 % bootstrap intervals (``ci``) and the metrics that rest on too few images (``unreliable``); probabilities
    are calibrated by ``calibrator`` (the model card's)."""
    out = {}
    for name, sl in loaders.items():
        if sl.site.splits[split]:
            out[name] = evaluate_with_uncertainty(model, sl.eval(split), n_boot, calibrator=calibrator)
    return out


def results_table(results: dict[str, dict]) -> str:
    """Per-site test table with n, 95 % bootstrap intervals and small-n flags (``*``)."""
    cols = [("macro_f1", "macro-F1 [95% CI]"), ("tumour_auroc", "tumour AUROC [95% CI]"),
            ("no_tumor_recall", "no_tumor recall [95% CI]"), ("accuracy", "accuracy")]
    w = max(18, *(len(str(name)) + 2 for name in results)) if results else 18
    hdr = f"{'site':<{w}}{'n':>6}{'healthy':>9}" + "".join(f"{h:>26}" for _, h in cols)
    lines = [hdr, "-" * len(hdr)]
    flagged = False
    for name, m in results.items():
        cells = "".join(f"{fmt_metric(m, k, ci=k != 'accuracy'):>26}" for k, _ in cols)
        lines.append(f"{name:<{w}}{m.get('n', 0):>6}{m.get('n_no_tumor', 0):>9}{cells}")
        flagged = flagged or bool(m.get("unreliable"))
    if flagged:
        lines.append(f"* unreliable: rests on fewer than {MIN_CLASS_N} images of a class (see 'unreliable' in "
                     "results.json); the union is the headline")
    headline_row = results.get(UNION) or next(iter(results.values()), {})
    if "calibration" in headline_row:
        lines.append(calibration_line(headline_row))
    return "\n".join(lines)


def calibration_line(m: dict) -> str:
    """The calibration a result was scored with, and its ECEs raw -> calibrated."""
    cal = Calibrator.from_record(m.get("calibration"))
    raw = m.get("uncalibrated") or {}
    eces = [f"{label} {raw[k]:.3f} -> {m[k]:.3f}" if k in raw else f"{label} {m[k]:.3f}"
            for k, label in (("ece", "class"), ("tumour_ece", "tumour")) if m.get(k) is not None]
    return f"probabilities: {cal.describe()}" + (f"; ECE {', '.join(eces)}" if eces else "")


def split_differences(recorded: list[SiteData], given: list[SiteData], split: str = "test") -> list[str]:
    """How the caller's data differs from the splits a run recorded (empty: identical ``split`` everywhere).

    Flags, in particular, images the caller would score that the run trained on.
    """
    rec = {s.name: s for s in recorded}
    out = []
    trained = {r.path for s in recorded for r in s.splits["train"]}
    for s in given:
        if s.name not in rec:
            out.append(f"site {s.name!r} is not among the run's sites {sorted(rec)}")
            continue
        mine = {r.path for r in rec[s.name].splits[split]}
        theirs = {r.path for r in s.splits[split]}
        if mine != theirs:
            out.append(f"site {s.name!r}: {len(theirs - mine)} of the given {len(theirs)} {split} images are not "
                       f"in the run's {split} split ({len(mine)} images)")
        leaked = theirs & trained
        if leaked:
            out.append(f"site {s.name!r}: {len(leaked)} of the given {split} images were TRAINING images of this "
                       f"run; scores on them are not a test")
    return out


# ---------------------------------------------------------------- uncertainty and small-n flags

MIN_CLASS_N = 10  # a metric resting on fewer images of a class than this is flagged, never a headline
CI_METRICS = ("macro_f1", "accuracy", "tumour_auroc", "no_tumor_recall", "tumour_accuracy", "ece", "tumour_ece")



def _fast_metrics(probs: np.ndarray, targets: np.ndarray) -> dict[str, float]:
    """The headline metrics, as compute_metrics defines them, vectorised for bootstrap resamples."""
    out: dict[str, float] = {}
    pred = probs.argmax(1)
    known = targets < NUM_CLASSES
    if np.isin(targets, TUMOUR_CLASSES).any():
        y, p = targets[known], pred[known]
        cm = np.bincount(y * NUM_CLASSES + p, minlength=NUM_CLASSES * NUM_CLASSES).reshape(NUM_CLASSES, -1)
        support = cm.sum(1)
        tp = np.diag(cm)
        denom = 2 * tp + (cm.sum(0) - tp) + (support - tp)
        f1 = np.where(denom > 0, 2 * tp / np.maximum(denom, 1), 0.0)
        out["macro_f1"] = float(f1[support > 0].mean())
        out["accuracy"] = float(tp.sum() / max(1, len(y)))
        out["ece"] = calibration_error(probs[known].max(1), p == y)
    healthy = targets == NO_TUMOR
    out["tumour_accuracy"] = float(((pred != NO_TUMOR) == ~healthy).mean())
    p_tumour = 1.0 - probs[:, NO_TUMOR]
    out["tumour_ece"] = calibration_error(np.maximum(p_tumour, 1 - p_tumour), (p_tumour >= 0.5) == ~healthy)
    if healthy.any():
        out["no_tumor_recall"] = float((pred[healthy] == NO_TUMOR).mean())
        if (~healthy).any():
            score = 1.0 - probs[:, NO_TUMOR]
            ranks = _ranks(score)
            n_pos, n_neg = int((~healthy).sum()), int(healthy.sum())
            out["tumour_auroc"] = float((ranks[~healthy].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))
    return out


def _ranks(x: np.ndarray) -> np.ndarray:
    """Average ranks (1-based), ties sharing their mean rank."""
    from scipy.stats import rankdata

    return rankdata(x)


def bootstrap_ci(probs: np.ndarray, targets: np.ndarray, n_boot: int = 1000, seed: int = 0,
                 level: float = 0.95) -> dict[str, list[float]]:
    """Percentile bootstrap intervals of the headline metrics (resampling images with replacement)."""
    rng = np.random.default_rng(seed)
    n = len(targets)
    samples: dict[str, list[float]] = {k: [] for k in CI_METRICS}
    if n == 0:
        return {}
    for _ in range(n_boot):
        idx = rng.integers(0, n, n)
        for k, v in _fast_metrics(probs[idx], targets[idx]).items():
            samples[k].append(v)
    lo, hi = (1 - level) / 2 * 100, (1 + level) / 2 * 100
    return {k: [float(np.percentile(v, lo)), float(np.percentile(v, hi))] for k, v in samples.items()
            if len(v) >= n_boot // 2}


def small_n_flags(targets: np.ndarray) -> dict[str, str]:
    """Metrics that rest on fewer than MIN_CLASS_N images of a class, and why (shown, never a headline)."""
    counts = np.bincount(targets, minlength=NUM_CLASSES + 1)
    flags = {}
    typed_present = [c for c in range(NUM_CLASSES) if counts[c] > 0]
    few = [f"{CLASSES[c]} n={counts[c]}" for c in typed_present if counts[c] < MIN_CLASS_N]
    if np.isin(targets, TUMOUR_CLASSES).any() and few:
        flags["macro_f1"] = flags["accuracy"] = "fewer than 10 images of " + ", ".join(few)
    healthy, tumour = int(counts[NO_TUMOR]), int(len(targets) - counts[NO_TUMOR])
    if healthy and tumour and min(healthy, tumour) < MIN_CLASS_N:  # (undefined without both)
        flags["tumour_auroc"] = f"rests on {healthy} healthy and {tumour} tumour images"
    if 0 < healthy < MIN_CLASS_N:
        flags["no_tumor_recall"] = f"rests on {healthy} healthy images"
    return flags


def evaluate_with_uncertainty(model: torch.nn.Module, loader, n_boot: int = 1000, seed: int = 0,
                              calibrator: Calibrator | None = None) -> dict:
    """:func:`fedbrain.training.compute_metrics` plus ``ci`` (95 % bootstrap) and ``unreliable`` (small n)."""
    probs, targets = predict_proba(model, loader)
    return scored(probs, targets, n_boot, seed, calibrator)


UNCALIBRATED_KEYS = ("ece", "tumour_ece", "macro_f1", "tumour_accuracy", "no_tumor_recall")


def scored(probs: np.ndarray, targets: np.ndarray, n_boot: int = 1000, seed: int = 0,
           calibrator: Calibrator | None = None) -> dict:
    """The full evaluation of raw class probabilities: metrics of the calibrated probabilities, bootstrap
    intervals, small-n flags, reliability diagrams, the calibration applied (``calibration``: its parameters) and,
    for a calibrated model, the raw probabilities' ECEs and decisions (``uncalibrated``)."""
    calibrator = calibrator or Calibrator()
    calibrated = calibrator.apply(probs)
    m = compute_metrics(calibrated, targets)
    if len(targets):
        m["ci"] = bootstrap_ci(calibrated, targets, n_boot, seed)
        m["unreliable"] = small_n_flags(targets)
        m["reliability"] = reliability(calibrated, targets)
        m["calibration"] = calibrator.params()
        if not calibrator.identity:
            raw = compute_metrics(np.asarray(probs, np.float32), targets)
            m["uncalibrated"] = {k: raw[k] for k in UNCALIBRATED_KEYS if raw.get(k) is not None}
    return m


# ---------------------------------------------------------------- do the features encode the site?


@torch.no_grad()
def head_features(model: torch.nn.Module, head: torch.nn.Module, loader) -> np.ndarray:
    """The inputs of the model's classification head (its penultimate features) over a loader."""
    from fedbrain.training import model_device

    feats: list[np.ndarray] = []
    hook = head.register_forward_hook(lambda _m, inp, _out: feats.append(inp[0].flatten(1).cpu().numpy()))
    try:
        model.eval()
        device = model_device(model)
        for x, _ in loader:
            model(x.to(device))
    finally:
        hook.remove()
    return np.concatenate(feats) if feats else np.zeros((0, 0), np.float32)


def site_separability(model: torch.nn.Module, model_name: str, loaders: dict[str, SiteLoaders],
                      split: str = "test", seed: int = 0) -> dict | None:
    """How well a linear probe tells the sites apart from the model's features (5-fold cross-validated
    balanced accuracy; chance = 1 / sites). Features that encode the pathology rather than the hospital
    score near chance on sites that share classes."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import cross_val_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from fedbrain.models import model_info

    head = model_info(model_name).blocks(model)[1]
    xs, ys = [], []
    for i, (name, sl) in enumerate(loaders.items()):
        if name == UNION or not sl.site.splits[split]:
            continue
        f = head_features(model, head, sl.eval(split))
        xs.append(f)
        ys.append(np.full(len(f), i))
    if len(xs) < 2:
        return None
    x, y = np.concatenate(xs), np.concatenate(ys)
    folds = int(min(5, np.bincount(y).min()))
    if folds < 2:
        return None
    probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, class_weight="balanced"))
    scores = cross_val_score(probe, x, y, cv=folds, scoring="balanced_accuracy")
    return {"site_probe_balanced_accuracy": float(scores.mean()), "chance": 1.0 / len(xs), "folds": folds,
            "n": int(len(y))}
