"""Acquisition shifts at graded strengths, and a model's metrics under each (``fedbrain evaluate --robustness``).

Every shift works on the uint8 greyscale slice at the model's input size, deterministically (seeded noise), so
two runs give the same table. Strengths are ``mild``, ``moderate`` and ``severe``; ``moderate`` is the one the
goals speak of. What each strength means is written beside it in the results (``param``).
"""

from __future__ import annotations

import io
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

STRENGTHS = ("mild", "moderate", "severe")


@dataclass(frozen=True)
class Shift:
    name: str
    describe: str  # what the parameter is
    params: tuple  # one per strength
    apply: Callable[[np.ndarray, object, np.random.Generator], np.ndarray]  # (N, S, S) uint8 -> same


def _u8(x: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def _per_image(fn: Callable[[np.ndarray], np.ndarray]) -> Callable[[np.ndarray], np.ndarray]:
    def run(imgs: np.ndarray) -> np.ndarray:
        return np.stack([fn(a) for a in imgs]) if len(imgs) else imgs
    return run


def _rotate(imgs, deg, rng):
    from PIL import Image

    signs = rng.choice([-1.0, 1.0], len(imgs))
    return np.stack([np.asarray(Image.fromarray(a).rotate(float(s * deg), resample=Image.BILINEAR))
                     for a, s in zip(imgs, signs, strict=True)]) if len(imgs) else imgs


def _gamma(imgs, g, rng):
    return _u8(255.0 * (imgs / 255.0) ** g)


def _contrast(imgs, f, rng):
    x = imgs.astype(np.float32)
    mean = x.mean(axis=(1, 2), keepdims=True)
    return _u8(mean + f * (x - mean))


def _gaussian(imgs, sigma, rng):
    return _u8(imgs + rng.normal(0.0, sigma, imgs.shape))


def _rician(imgs, sigma, rng):
    x = imgs.astype(np.float64)
    return _u8(np.sqrt((x + rng.normal(0, sigma, x.shape)) ** 2 + rng.normal(0, sigma, x.shape) ** 2))


def _blur(imgs, sigma, rng):
    from PIL import Image, ImageFilter

    return _per_image(lambda a: np.asarray(Image.fromarray(a).filter(ImageFilter.GaussianBlur(sigma))))(imgs)


def _jpeg(imgs, quality, rng):
    from PIL import Image

    def one(a):
        buf = io.BytesIO()
        Image.fromarray(a).save(buf, format="JPEG", quality=int(quality))
        return np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("L"))
    return _per_image(one)(imgs)


def _crop(imgs, keep, rng):
    """A centred crop keeping ``keep`` of each side, resized back (a tighter field of view)."""
    from PIL import Image

    def one(a):
        s = a.shape[0]
        c = max(1, round(s * keep))
        o = (s - c) // 2
        return np.asarray(Image.fromarray(a[o:o + c, o:o + c]).resize((s, s), Image.BILINEAR))
    return _per_image(one)(imgs)


def _zoom_out(imgs, scale, rng):
    """The slice shrunk to ``scale`` of its size on a black canvas (a wider field of view)."""
    from PIL import Image

    def one(a):
        s = a.shape[0]
        c = max(1, round(s * scale))
        out = np.zeros_like(a)
        o = (s - c) // 2
        out[o:o + c, o:o + c] = np.asarray(Image.fromarray(a).resize((c, c), Image.BILINEAR))
        return out
    return _per_image(one)(imgs)


def _bias_field(imgs, amplitude, rng):
    """A smooth multiplicative intensity inhomogeneity (random low-order polynomial), as coils produce."""
    if not len(imgs):
        return imgs
    s = imgs.shape[1]
    yy, xx = np.meshgrid(np.linspace(-1, 1, s), np.linspace(-1, 1, s), indexing="ij")
    basis = np.stack([xx, yy, xx * yy, xx ** 2 - 1 / 3, yy ** 2 - 1 / 3])
    out = np.empty_like(imgs)
    for i, a in enumerate(imgs):
        c = rng.normal(0, 1, len(basis))
        field = np.tensordot(c, basis, 1)
        field = field / max(1e-6, np.abs(field).max())
        out[i] = _u8(a * np.exp(amplitude * field))
    return out


def _mirror(imgs, _p, rng):
    return imgs[:, :, ::-1].copy()


SHIFTS: tuple[Shift, ...] = (
    Shift("rotation", "degrees, either way", (5, 10, 20), _rotate),
    Shift("gamma_brighter", "intensity gamma", (0.8, 0.67, 0.5), _gamma),
    Shift("gamma_darker", "intensity gamma", (1.25, 1.5, 2.0), _gamma),
    Shift("contrast", "contrast factor around the mean", (0.8, 0.6, 0.4), _contrast),
    Shift("gaussian_noise", "noise sd (0-255 scale)", (4, 8, 16), _gaussian),
    Shift("rician_noise", "noise sd per channel (0-255 scale)", (4, 8, 16), _rician),
    Shift("blur", "Gaussian blur sd (px at the input size)", (0.5, 1.0, 2.0), _blur),
    Shift("jpeg", "JPEG quality", (75, 40, 15), _jpeg),
    Shift("crop", "share of each side kept, resized back", (0.95, 0.9, 0.8), _crop),
    Shift("zoom_out", "scale on a black canvas", (0.95, 0.9, 0.8), _zoom_out),
    Shift("bias_field", "log-amplitude of a smooth multiplicative field", (0.1, 0.25, 0.5), _bias_field),
    Shift("mirror", "left-right flip", ("flip", "flip", "flip"), _mirror),
)
SHIFT_NAMES = tuple(s.name for s in SHIFTS)


def shifted(imgs: np.ndarray, shift: Shift, strength: str, seed: int = 0) -> np.ndarray:
    """``imgs`` under ``shift`` at ``strength`` (seeded: the same output every time)."""
    level = STRENGTHS.index(strength)
    rng = np.random.default_rng([seed, SHIFT_NAMES.index(shift.name), level])
    return shift.apply(np.ascontiguousarray(imgs), shift.params[level], rng)


KEYS = ("tumour_auroc", "macro_f1", "tumour_accuracy", "ece", "tumour_ece")


def robustness(predictor, imgs: np.ndarray, targets: np.ndarray, shifts: tuple[Shift, ...] = SHIFTS,
               n_boot: int = 200, seed: int = 0) -> dict:
    """The model's metrics on the clean images and under every shift and strength, with the drop from clean.

    Returns ``{"clean": metrics, "rows": [{shift, strength, param, <metric>, <metric>_drop, ci}], "worst": ...}``;
    a drop is clean minus shifted (positive = worse).
    """
    from fedbrain.data.arrays import normalise
    from fedbrain.evaluation import scored

    pre = predictor.preprocessing

    def score(x: np.ndarray) -> dict:
        probs = predictor.raw_probabilities(normalise(x, pre))
        return scored(probs, targets, n_boot, seed, predictor.calibrator)

    clean = score(imgs)
    rows = []
    for sh in shifts:
        for strength in STRENGTHS:
            if sh.name == "mirror" and strength != "moderate":
                continue  # one strength only
            m = score(shifted(imgs, sh, strength, seed))
            row = {"shift": sh.name, "strength": strength, "param": sh.params[STRENGTHS.index(strength)],
                   "describe": sh.describe, "n": m.get("n"), "ci": m.get("ci", {})}
            for k in KEYS:
                row[k] = m.get(k)
                if isinstance(m.get(k), (int, float)) and isinstance(clean.get(k), (int, float)):
                    row[f"{k}_drop"] = clean[k] - m[k]
            rows.append(row)
    return {"clean": {k: clean.get(k) for k in (*KEYS, "n", "n_no_tumor", "ci", "unreliable")},
            "rows": rows, "worst": worst_drops(rows)}


def worst_drops(rows: list[dict], strength: str = "moderate") -> dict:
    """Per metric, the largest drop at ``strength`` and the shift that caused it."""
    out = {}
    for k in ("tumour_auroc", "macro_f1"):
        cands = [r for r in rows if r["strength"] == strength and isinstance(r.get(f"{k}_drop"), (int, float))]
        if cands:
            w = max(cands, key=lambda r: r[f"{k}_drop"])
            out[k] = {"drop": w[f"{k}_drop"], "shift": w["shift"], "strength": strength}
    return out


def robustness_table(res: dict) -> str:
    """The drop table the CLI prints."""
    c = res["clean"]
    lines = [f"clean: tumour AUROC {_f(c.get('tumour_auroc'))}, macro-F1 {_f(c.get('macro_f1'))}, "
             f"ECE {_f(c.get('ece'))} ({c.get('n')} images, {c.get('n_no_tumor')} healthy)",
             f"{'shift':<16}{'strength':<10}{'param':>7}{'tumour AUROC':>14}{'drop':>8}{'macro-F1':>10}{'drop':>8}"
             f"{'ECE':>7}", "-" * 80]
    for r in res["rows"]:
        lines.append(f"{r['shift']:<16}{r['strength']:<10}{str(r['param']):>7}{_f(r.get('tumour_auroc')):>14}"
                     f"{_f(r.get('tumour_auroc_drop'), '+.3f'):>8}{_f(r.get('macro_f1')):>10}"
                     f"{_f(r.get('macro_f1_drop'), '+.3f'):>8}{_f(r.get('ece')):>7}")
    for k, w in res["worst"].items():
        lines.append(f"worst {k.replace('_', ' ')} drop at moderate strength: {w['drop']:+.3f} ({w['shift']})")
    return "\n".join(lines)


def _f(v, fmt: str = ".3f") -> str:
    return format(v, fmt) if isinstance(v, (int, float)) else "-"


def write_csv(res: dict, path) -> None:
    import csv

    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["shift", "strength", "param", *KEYS, *(f"{k}_drop" for k in KEYS)])
        w.writerow(["clean", "", "", *(res["clean"].get(k) for k in KEYS), *([""] * len(KEYS))])
        for r in res["rows"]:
            w.writerow([r["shift"], r["strength"], r["param"], *(r.get(k) for k in KEYS),
                        *(r.get(f"{k}_drop") for k in KEYS)])


__all__ = ["SHIFTS", "STRENGTHS", "Shift", "shifted", "robustness", "robustness_table", "worst_drops", "write_csv"]
