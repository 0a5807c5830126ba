"""The trade-off report: one row per variant, every number measured, ratios against fp32."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np

VARIANTS = ("fp32", "pruned", "int8", "pruned+int8")
FILES = {"fp32": "fp32.onnx", "pruned": "pruned.onnx", "int8": "int8.onnx", "pruned+int8": "pruned_int8.onnx"}
TORCH_FILES = {"fp32": "fp32.pt", "pruned": "pruned.pt"}

COLUMNS = [
    "variant", "params", "macs", "file_bytes", "accuracy", "macro_f1", "tumour_auroc",
    "latency_ms_p50_1t", "latency_ms_p95_1t", "latency_ms_p50_2t", "latency_ms_p95_2t",
    "size_ratio", "latency_ratio_1t", "latency_ratio_2t", "macs_ratio", "params_ratio", "macro_f1_delta",
    "speedup_1t", "agreement_vs_fp32", "tumour_accuracy", "n_test", "file",
    "torch_latency_ms_p50_1t", "torch_latency_ms_p50_2t", "onnx_vs_torch_max_abs_diff",
]


def evaluate_predictor(predictor, imgs: np.ndarray, targets: np.ndarray,
                       batch_size: int = 64) -> tuple[dict, np.ndarray]:
    """Metrics (:func:`fedbrain.training.compute_metrics`) and probabilities on uint8 images."""
    from fedbrain.compression.data import normalise
    from fedbrain.training import compute_metrics

    pre = predictor.preprocessing
    probs = [predictor.probabilities(normalise(imgs[i:i + batch_size], pre), batch_size)
             for i in range(0, len(imgs), batch_size)]
    p = np.concatenate(probs) if probs else np.zeros((0, len(predictor.classes)), np.float32)
    return compute_metrics(p, targets), p


def _ratio(a, b):
    if a is None or b in (None, 0) or (isinstance(b, float) and math.isnan(b)):
        return None
    return float(a) / float(b)


def add_ratios(rows: list[dict]) -> list[dict]:
    """size/latency/MACs/params ratios (variant / fp32) and macro-F1 delta (variant - fp32)."""
    base = next(r for r in rows if r["variant"] == "fp32")
    for r in rows:
        r["size_ratio"] = _ratio(r["file_bytes"], base["file_bytes"])
        r["latency_ratio_1t"] = _ratio(r.get("latency_ms_p50_1t"), base.get("latency_ms_p50_1t"))
        r["latency_ratio_2t"] = _ratio(r.get("latency_ms_p50_2t"), base.get("latency_ms_p50_2t"))
        r["speedup_1t"] = _ratio(base.get("latency_ms_p50_1t"), r.get("latency_ms_p50_1t"))
        r["macs_ratio"] = _ratio(r["macs"], base["macs"])
        r["params_ratio"] = _ratio(r["params"], base["params"])
        f, f0 = r.get("macro_f1"), base.get("macro_f1")
        r["macro_f1_delta"] = None if f is None or f0 is None else float(f) - float(f0)
    return rows


def goals(rows: list[dict]) -> dict:
    """The issue's benchmark goals, checked against the measured rows (``met`` is None when not measurable,
    e.g. macro-F1 on a test set without tumour types)."""
    by = {r["variant"]: r for r in rows}

    def check(value, ok):
        return None if value is None else bool(ok(value))

    out = {}
    if "int8" in by:
        s = by["int8"].get("speedup_1t")
        out["int8_speedup_1t_ge_2x"] = {"value": s, "met": check(s, lambda v: v >= 2.0)}
        d = by["int8"].get("macro_f1_delta")
        d = None if d is None else 100 * d
        out["int8_macro_f1_drop_le_1pp"] = {"value_pp": d, "met": check(d, lambda v: v >= -1.0)}
        b = by["int8"]["file_bytes"]
        out["int8_file_le_0_5MB"] = {"value_bytes": b, "met": check(b, lambda v: v <= 500_000)}
    if "pruned+int8" in by:
        m = by["pruned+int8"].get("macs_ratio")
        m = None if m is None else 100 * (1 - m)
        out["pruned_int8_macs_reduction_ge_40pct"] = {"value_pct": m, "met": check(m, lambda v: v >= 40.0)}
    return out


def write_report(out_dir: str | Path, report: dict) -> tuple[Path, Path]:
    """``report.json`` (rows + context) and ``report.csv`` (rows only, :data:`COLUMNS`)."""
    out_dir = Path(out_dir)
    jpath, cpath = out_dir / "report.json", out_dir / "report.csv"
    jpath.write_text(json.dumps(report, indent=2, default=_json_default))
    with cpath.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=COLUMNS, extrasaction="ignore")
        w.writeheader()
        for r in report["rows"]:
            w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in COLUMNS})
    return jpath, cpath


def _json_default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    return str(o)


def _f(v, fmt: str, missing: str = "-") -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return missing
    return format(v, fmt)


def format_table(rows: list[dict]) -> str:
    """Human-readable variant table."""
    hdr = (f"{'variant':<13}{'params':>9}{'MMACs':>8}{'size KB':>9}{'acc':>7}{'mF1':>7}{'AUROC':>7}"
           f"{'p50 1t':>8}{'p95 1t':>8}{'p50 2t':>8}{'p95 2t':>8}{'size x':>7}{'lat x':>7}{'MACs x':>7}"
           f"{'dF1 pp':>8}")
    lines = [hdr, "-" * len(hdr)]
    for r in rows:
        d = r.get("macro_f1_delta")
        lines.append(
            f"{r['variant']:<13}{r['params']:>9,}{r['macs'] / 1e6:>8.1f}{r['file_bytes'] / 1024:>9.1f}"
            f"{_f(r.get('accuracy'), '.3f'):>7}{_f(r.get('macro_f1'), '.3f'):>7}"
            f"{_f(r.get('tumour_auroc'), '.3f'):>7}"
            f"{_f(r.get('latency_ms_p50_1t'), '.3f'):>8}{_f(r.get('latency_ms_p95_1t'), '.3f'):>8}"
            f"{_f(r.get('latency_ms_p50_2t'), '.3f'):>8}{_f(r.get('latency_ms_p95_2t'), '.3f'):>8}"
            f"{_f(r.get('size_ratio'), '.2f'):>7}{_f(r.get('latency_ratio_1t'), '.2f'):>7}"
            f"{_f(r.get('macs_ratio'), '.2f'):>7}{_f(None if d is None else 100 * d, '+.2f'):>8}"
        )
    lines.append("latency in ms at batch 1 (ONNX Runtime); 'x' columns are variant / fp32; "
                 "dF1 = macro-F1 change vs fp32 in percentage points")
    return "\n".join(lines)


def format_goals(g: dict) -> str:
    lines = []
    for k, v in g.items():
        val = {kk: vv for kk, vv in v.items() if kk != "met"}
        (name, x), = val.items()
        status = {True: "met", False: "NOT met", None: "n/a"}[v["met"]]
        lines.append(f"  [{status}] {k}: {name} = {_f(x, '.3g')}")
    return "\n".join(lines)
