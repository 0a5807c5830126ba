"""Is an upload like the slices the model knows? A profile of reference slices, saved in the model card.

Plainly broken inputs (blank, colour, noise) are refused earlier (:func:`fedbrain.data.images.check_slice`).
This check is softer: an image whose intensity statistics or shape lie outside the central 99 % of the reference
slices gets a warning with the reason, and the prediction is shown as unreliable rather than answered
confidently. Features (on the slice at the model's input size): mean and spread of intensity, share of dark
background, correlation with the mean reference slice (an axial brain slice is a bright oval on black) and
left-right symmetry.

The reference is the model's training images: a pooled run computes the profile on its training split; in a
federation every site sends, with its validation counts, per-feature histograms of its training images (counts
in fixed bins, no image, no per-image value) and the server sums them into the central ranges (the template
feature, a mean image, stays out of the federated profile).
"""

from __future__ import annotations

import numpy as np

from fedbrain.contract import Preprocessing
from fedbrain.data.dedup import flip_thumbs
from fedbrain.data.images import resize, thumbnail

QUANTILES = (0.005, 0.995)
FEATURES = {
    "mean intensity": "mean", "intensity spread": "std", "dark background share": "dark",
    "likeness to a brain slice": "template", "left-right symmetry": "symmetry",
}
REFERENCE_IMAGES = 600  # evenly drawn from the reference set


def _features(imgs: np.ndarray, template: np.ndarray | None) -> dict[str, np.ndarray]:
    x = imgs.astype(np.float32) / 255.0
    thumbs = np.stack([thumbnail(a) for a in imgs])
    out = {"mean": x.mean(axis=(1, 2)), "std": x.std(axis=(1, 2)), "dark": (imgs < 16).mean(axis=(1, 2)),
           "symmetry": (thumbs * flip_thumbs(thumbs)).sum(1)}
    if template is not None:
        out["template"] = thumbs @ template
    return out


def build_profile(imgs: np.ndarray, source: str, limit: int = REFERENCE_IMAGES) -> dict:
    """The profile of uint8 reference slices ``(N, S, S)`` (at most ``limit`` of them, evenly drawn): a mean
    thumbnail and each feature's central range."""
    if len(imgs) > limit:
        imgs = imgs[np.linspace(0, len(imgs) - 1, limit).round().astype(int)]
    thumbs = np.stack([thumbnail(a) for a in imgs])
    template = thumbs.mean(0)
    template = template / max(1e-6, float(np.linalg.norm(template)))
    feats = _features(imgs, template)
    ranges = {k: [float(np.quantile(v, QUANTILES[0])), float(np.quantile(v, QUANTILES[1]))] for k, v in feats.items()}
    return {"source": source, "n": int(len(imgs)), "quantiles": list(QUANTILES), "ranges": ranges,
            "template": [round(float(v), 5) for v in template]}


# ------------------------------------------------------------ the federated profile: summed histograms

HIST_PREFIX = "profile_hist_"  # metric keys a site sends: profile_hist_<feature>_<bin> (counts of training images)
HIST_RANGES = {"mean": (0.0, 1.0), "std": (0.0, 0.5), "dark": (0.0, 1.0), "symmetry": (-1.0, 1.0)}
HIST_BINS = 100


def feature_histograms(imgs: np.ndarray) -> dict[str, int]:
    """What a site sends for the federated profile: per feature, counts of its training images in fixed bins."""
    out: dict[str, int] = {}
    if not len(imgs):
        return out
    feats = _features(imgs, None)
    for key, (lo, hi) in HIST_RANGES.items():
        idx = np.clip(((feats[key] - lo) / (hi - lo) * HIST_BINS).astype(int), 0, HIST_BINS - 1)
        for b, c in enumerate(np.bincount(idx, minlength=HIST_BINS)):
            out[f"{HIST_PREFIX}{key}_{b}"] = int(c)
    return out


def pooled_ranges(rows: list[dict]) -> dict[str, float]:
    """The central range of every feature from the sites' summed histograms (``profile_<feature>_lo|hi``, at
    bin resolution, widened to the outer bin edges), and ``profile_n``."""
    out: dict[str, float] = {}
    for key, (lo, hi) in HIST_RANGES.items():
        h = np.zeros(HIST_BINS)
        for r in rows:
            vals = [r.get(f"{HIST_PREFIX}{key}_{b}") for b in range(HIST_BINS)]
            if all(isinstance(v, (int, float)) and 0 <= v < 1e9 for v in vals):
                h += np.asarray(vals, np.float64)
        n = h.sum()
        if n <= 0:
            return {}
        cdf = np.cumsum(h) / n
        width = (hi - lo) / HIST_BINS
        first = int(np.searchsorted(cdf, QUANTILES[0]))
        last = int(np.searchsorted(cdf, QUANTILES[1]))
        out[f"profile_{key}_lo"] = lo + first * width
        out[f"profile_{key}_hi"] = lo + (min(last, HIST_BINS - 1) + 1) * width
        out["profile_n"] = float(n)
    return out


def profile_of_metrics(metrics: dict, prefix: str = "val_pooled_") -> dict:
    """The model card's input profile from a round's aggregated metrics (empty when sites sent none)."""
    ranges = {k: [metrics.get(f"{prefix}profile_{k}_lo"), metrics.get(f"{prefix}profile_{k}_hi")]
              for k in HIST_RANGES}
    if not all(isinstance(v, (int, float)) for r in ranges.values() for v in r):
        return {}
    n = int(metrics.get(f"{prefix}profile_n", 0))
    return {"source": f"federated: the sites' summed feature histograms of their training images ({n} images)",
            "n": n, "quantiles": list(QUANTILES), "ranges": ranges}


def check_input(arr: np.ndarray, profile: dict | None, pre: Preprocessing) -> list[str]:
    """Why an HxW uint8 slice lies outside the profile's reference slices (empty: inside, or no profile)."""
    if not profile or "ranges" not in profile:
        return []
    template = np.asarray(profile.get("template") or [], np.float32)
    img = resize(arr, pre.image_size)[None]
    feats = _features(img, template if template.size == 1024 else None)
    out = []
    for label, key in FEATURES.items():
        lo, hi = profile["ranges"].get(key, (None, None))
        if key not in feats or lo is None:
            continue
        v = float(feats[key][0])
        if v < lo or v > hi:
            side = "below" if v < lo else "above"
            out.append(f"{label} {v:.2f} is {side} the range of the reference slices ({lo:.2f}-{hi:.2f}; "
                       f"{profile.get('source', 'reference')})")
    return out


__all__ = ["build_profile", "check_input", "FEATURES", "feature_histograms", "pooled_ranges",
           "profile_of_metrics"]
