"""Validation counts a site may send, and the pooled validation the server computes from them.

A site sends counts, never images or per-image scores: its validation confusion matrix (rows: the true
class, or "tumour of unknown type"; columns: the predicted class) and a histogram of the predicted tumour
probability for tumour and for healthy slices. Summed over sites they give the macro-F1 of the pooled
validation split exactly and its tumour-vs-healthy AUROC to within the histogram's resolution: the same
selection criterion centralised training uses, with no site weighted by its size. It also sends the sums the
calibration fit reads (:mod:`fedbrain.calibration`: a histogram of the tumour log-odds, typed tumour images per
type, a type Brier curve); their sum over sites fits the global model's calibration.
"""

from __future__ import annotations

import numpy as np

from fedbrain import calibration
from fedbrain.contract import CLASSES, COUNT_PREFIX, NO_TUMOR, NUM_CLASSES
from fedbrain.input_check import pooled_ranges, profile_of_metrics

NUM_SAMPLES = "num_samples"  # update meta key: the images in the site's training split
CLASS_COUNTS = "fedbrain_class_counts"  # model meta key: the federation's pooled training-label counts
NUM_SITES = "fedbrain_num_sites"  # model meta key: how many sites the job has
VALIDATE = "fedbrain_validate"  # model meta key: the sites validate the global model they receive this round
SERVER_STATE = "server_optimizer_state"  # a round file's server Adam moments and step count (resume continues them)
REQUEST = "fedbrain_request"  # model meta key of a task that is no training round: "counts" | "validate"
SECURE_META = "secure_aggregation"  # a site's meta flag: its params are a masked, sample-weighted update (secagg)
POOLED_VAL = "pooled_val"  # the controller's progress: per round, the pooled validation (pooled_row)
CAL_PREFIX = "val_pooled_cal_"  # the server's calibration fit among a round's aggregated metrics (flat scalars)
ROWS = NUM_CLASSES + 1  # the 4 classes, then "tumour of unknown type"
BINS = 50


def class_recalls(metrics: dict) -> dict:
    """``<class>_recall`` and ``n_<class>`` of a metrics dict's per-class table (flat, for the logs)."""
    out = {}
    for cls, m in (metrics.get("per_class") or {}).items():
        if isinstance(m, dict) and isinstance(m.get("recall"), (int, float)):
            out[f"{cls}_recall"], out[f"n_{cls}"] = float(m["recall"]), int(m.get("support", 0))
    return out


def validation_counts(probs: np.ndarray, targets: np.ndarray, prefix: str = "val") -> dict[str, int]:
    """``{prefix}_cm_{true}_{pred}`` and ``{prefix}_hist_{pos|neg}_{bin}`` counts of one site's split."""
    out: dict[str, int] = {}
    if len(targets) == 0:
        return out
    pred = probs.argmax(1)
    cm = np.zeros((ROWS, NUM_CLASSES), np.int64)
    np.add.at(cm, (np.asarray(targets), pred), 1)
    for t in range(ROWS):
        for p in range(NUM_CLASSES):
            out[f"{prefix}_cm_{t}_{p}"] = int(cm[t, p])
    p_tumour = np.clip(1.0 - probs[:, NO_TUMOR], 0.0, 1.0)
    bins = np.minimum((p_tumour * BINS).astype(int), BINS - 1)
    is_tumour = np.asarray(targets) != NO_TUMOR
    for name, mask in (("pos", is_tumour), ("neg", ~is_tumour)):
        h = np.bincount(bins[mask], minlength=BINS)
        for b in range(BINS):
            out[f"{prefix}_hist_{name}_{b}"] = int(h[b])
    return out


def _sum_counts(rows: list[dict], prefix: str) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    cm = np.zeros((ROWS, NUM_CLASSES), np.int64)
    pos, neg = np.zeros(BINS, np.int64), np.zeros(BINS, np.int64)
    seen = False
    for r in rows:
        if f"{prefix}_cm_0_0" not in r:
            continue
        seen = True
        for t in range(ROWS):
            for p in range(NUM_CLASSES):
                cm[t, p] += int(r.get(f"{prefix}_cm_{t}_{p}", 0))
        for b in range(BINS):
            pos[b] += int(r.get(f"{prefix}_hist_pos_{b}", 0))
            neg[b] += int(r.get(f"{prefix}_hist_neg_{b}", 0))
    return (cm, pos, neg) if seen else None


def macro_f1_from_confusion(cm: np.ndarray) -> float | None:
    """Macro-F1 over the classes present (typed rows only), as :func:`fedbrain.training.compute_metrics`."""
    typed = cm[:NUM_CLASSES]
    f1s = []
    for c in range(NUM_CLASSES):
        support = typed[c].sum()
        if support == 0:
            continue
        tp = typed[c, c]
        fp = typed[:, c].sum() - tp
        fn = support - tp
        f1s.append(2 * tp / (2 * tp + fp + fn) if tp else 0.0)
    return float(np.mean(f1s)) if f1s else None


def auroc_from_histograms(pos: np.ndarray, neg: np.ndarray) -> float | None:
    """AUROC of binned scores (ties within a bin count one half)."""
    n_pos, n_neg = pos.sum(), neg.sum()
    if n_pos == 0 or n_neg == 0:
        return None
    below = np.concatenate([[0], np.cumsum(neg)[:-1]])
    return float((pos * (below + 0.5 * neg)).sum() / (n_pos * n_neg))


def pooled_validation(rows: list[dict], prefix: str = "val") -> dict[str, float]:
    """Pooled metrics of the sites' counts: macro-F1, tumour AUROC, no_tumor recall, n, and ``val_score``.

    ``val_score`` is the pooled macro-F1 where any site labels tumour types, else the pooled tumour AUROC:
    the same headline centralised training selects by.
    """
    summed = _sum_counts(rows, prefix)
    if summed is None:
        return {}
    cm, pos, neg = summed
    out: dict[str, float] = {f"{prefix}_pooled_n": float(cm.sum())}
    f1 = macro_f1_from_confusion(cm)
    auc = auroc_from_histograms(pos, neg)
    if f1 is not None and cm[:NUM_CLASSES].sum() and cm[[c for c in range(NUM_CLASSES) if c != NO_TUMOR]].sum():
        out[f"{prefix}_pooled_macro_f1"] = f1
    if auc is not None:
        out[f"{prefix}_pooled_tumour_auroc"] = auc
    for c, name in enumerate(CLASSES):  # per-class recall and support of the pooled split
        support = cm[c].sum()
        if support:
            out[f"{prefix}_pooled_{name}_recall"] = float(cm[c, c] / support)
            out[f"{prefix}_pooled_n_{name}"] = float(support)
    if prefix == "val":  # the federated calibration fit: the sum of the sites' calibration sums
        record = calibration.fit_sums(calibration.Sums.of(rows), "")
        out.update({f"{CAL_PREFIX}{k}": v for k, v in calibration.to_scalars(record).items()})
        # the federated input profile: the sum of the sites' feature histograms
        out.update({f"val_pooled_{k}": v for k, v in pooled_ranges(rows).items()})
    score = out.get(f"{prefix}_pooled_macro_f1", out.get(f"{prefix}_pooled_tumour_auroc"))
    if score is not None:
        out[f"{prefix}_score"] = score
    return out


POOLED_ROW_KEYS = ("macro_f1", "tumour_auroc", "n", *(f"{c}_recall" for c in CLASSES), *(f"n_{c}" for c in CLASSES))


def pooled_row(metrics: dict, prefix: str = "val") -> dict[str, float]:
    """The headline of a pooled validation (:func:`pooled_validation`'s output, or a round's aggregated metrics) as
    a run-log row's scalars: macro_f1, tumour_auroc, per-class recall and support, n and ``score``; {} without one."""
    row = {k: (int if k == "n" or k.startswith("n_") else float)(metrics[f"{prefix}_pooled_{k}"])
           for k in POOLED_ROW_KEYS if isinstance(metrics.get(f"{prefix}_pooled_{k}"), (int, float))}
    if row and isinstance(metrics.get(f"{prefix}_score"), (int, float)):
        row["score"] = float(metrics[f"{prefix}_score"])
    return row


def federated_calibration(metrics: dict) -> dict:
    """The model card's calibration record from a round's aggregated metrics (the server's fit of the sites'
    summed calibration statistics); empty when the sites sent none."""
    record = calibration.from_scalars({k[len(CAL_PREFIX):]: v for k, v in metrics.items() if k.startswith(CAL_PREFIX)})
    if record:
        record["fitted_on"] = (f"federated: the sites' summed validation statistics ({record['n']} images), no image "
                               "left a site")
    return record


def with_round_fits(card, metrics: dict):
    """``card`` with what the server fitted from the sites' sums in the round of the best model (its aggregated
    ``metrics``): the calibration and the input profile (each left out when the sites sent nothing for it)."""
    profile = profile_of_metrics(metrics)
    return card.replace(calibration=federated_calibration(metrics),
                        extra={**card.extra, "input_profile": profile} if profile else card.extra)


def site_counts(metrics: dict) -> list[int] | None:
    """A site's training-label counts from its update's metrics (None when it sent none)."""
    keys = sorted((k for k in metrics if k.startswith(COUNT_PREFIX)), key=lambda k: int(k[len(COUNT_PREFIX):]))
    if len(keys) != ROWS:
        return None
    try:
        counts = [int(metrics[k]) for k in keys]
    except (TypeError, ValueError):
        return None
    return counts if all(0 <= c < 10**9 for c in counts) else None


def site_batch_size(batch_size: int, own: int, meta: dict) -> int:
    """This site's share of a federation-wide batch: ``batch_size`` x its share of the pooled training images
    (from the pooled counts the server sends; before those exist, an equal share), at least 2."""
    pooled = meta.get(CLASS_COUNTS)
    total = float(sum(pooled)) if pooled else 0.0
    if total > 0:
        return max(2, round(batch_size * own / total))
    return max(2, round(batch_size / max(1, int(meta.get(NUM_SITES, 1)))))
