"""Tolerant readers of the run-folder contract (``workspace/README.md``); no Streamlit here.

Every reader returns an empty value for a missing or unreadable file instead of raising, so each
dashboard page can show what exists and say which command creates what is missing.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from fedbrain.runs import RunDir, fmt_metric, read_json, workspace_bench_models
from fedbrain.status import BADGES, FAILED, LIVE_STATES, read_status

# What creates each output (shown by the pages when it is missing).
CMD_SIMULATE = "fedbrain simulate"
CMD_TRAIN = "fedbrain train"
CMD_TRAIN_LOCAL = "fedbrain train --mode local --site NAME"
CMD_COMPARE = "fedbrain compare"
CMD_COMPRESS = "fedbrain compress <run>/checkpoints/best.pt"
CMD_BENCH_MODELS = "fedbrain bench models"

SPECIAL_SITES = ("global", "union")
HEADLINE_METRICS = ("macro_f1", "accuracy", "tumour_auroc", "tumour_accuracy", "tumour_f1", "macro_auroc",
                    "loss")
ONNX_VARIANTS = ("fp32", "int8", "pruned", "pruned_int8")


CONTAINER_KINDS = ("bench-models",)  # folders of runs: their sub-runs are listed instead


@dataclass(frozen=True)
class Run:
    """One run folder: ``<workspace>/<name>/config.json`` exists (or a sub-run of a benchmark folder)."""

    path: Path
    kind: str
    config: dict = field(default_factory=dict, compare=False, hash=False)
    parent: str = ""  # the benchmark folder holding this run, if any
    state: str = field(default="unknown", compare=False, hash=False)  # status.json's state when listed

    @property
    def name(self) -> str:
        if self.parent:
            return f"{self.parent}/{self.path.parent.name}/{self.path.name}"
        return self.path.name

    @property
    def label(self) -> str:
        return f"{BADGES.get(self.state, '')} {self.name} ({self.kind}, {self.state})"

    @property
    def live(self) -> bool:
        return self.state in LIVE_STATES

    @property
    def dir(self) -> RunDir:
        """The run folder's named paths."""
        return RunDir(self.path)


def list_runs(workspace: str | Path) -> list[Run]:
    """Run folders of a workspace, newest first (a missing workspace has none)."""
    ws = Path(workspace)
    if not ws.is_dir():
        return []
    runs = []
    for d in ws.iterdir():
        cfg_path = RunDir(d).config
        if not (d.is_dir() and cfg_path.is_file()):
            continue
        cfg = read_json(cfg_path)
        cfg = cfg if isinstance(cfg, dict) else {}
        kind = str(cfg.get("kind") or "unknown")
        if kind in CONTAINER_KINDS:  # `bench models`: <model>/<mode>/ are ordinary runs
            for sub in sorted(d.glob("*/*/config.json")):
                sub_cfg = read_json(sub)
                sub_cfg = sub_cfg if isinstance(sub_cfg, dict) else {}
                runs.append((sub.stat().st_mtime, Run(sub.parent, str(sub_cfg.get("kind") or "unknown"), sub_cfg,
                                                      parent=d.name, state=read_status(sub.parent)["state"])))
            continue
        runs.append((cfg_path.stat().st_mtime, Run(d, kind, cfg, state=read_status(d)["state"])))
    runs.sort(key=lambda t: (t[0], t[1].name), reverse=True)
    return [r for _, r in runs]


def default_run_index(runs: list[Run], prefer: tuple[str, ...] = ()) -> int:
    """The run a page opens on: a live one, else the newest of the preferred kinds that did not fail, else the
    newest that did not fail (a failed run is never the default while another exists)."""
    for i, r in enumerate(runs):
        if r.live:
            return i
    for k in prefer:
        for i, r in enumerate(runs):
            if r.kind == k and r.state != FAILED:
                return i
    return next((i for i, r in enumerate(runs) if r.state != FAILED), 0)


def run_status(run: Run) -> dict:
    """The run's ``status.json`` (see :func:`fedbrain.status.read_status`)."""
    return read_status(run.path)


def class_recall_curves(df: pd.DataFrame) -> pd.DataFrame:
    """Long frame round, class, recall of the global model's validation per round (``<class>_recall``)."""
    curves, _ = global_curves(df)
    if curves.empty:
        return pd.DataFrame()
    val = curves[curves["split"] == "val"] if "split" in curves.columns else curves
    cols = [c for c in val.columns if c.endswith("_recall") and val[c].notna().any()]
    if not cols:
        return pd.DataFrame()
    long = val.melt(id_vars="round", value_vars=cols, var_name="class", value_name="recall").dropna()
    long["class"] = long["class"].str.removesuffix("_recall")
    return long


def read_metrics(path: str | Path) -> pd.DataFrame:
    """``metrics.jsonl`` as a frame; skips a half-written or corrupt line (a run still writing)."""
    rows = []
    try:
        lines = Path(path).read_text().splitlines()
    except OSError:
        lines = []
    for line in lines:
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    df = pd.DataFrame(rows)
    for col in ("round", "site", "split"):
        if col not in df.columns:
            df[col] = pd.Series(dtype=object)
    return df


def metric_columns(df: pd.DataFrame) -> list[str]:
    """Numeric metric columns present with data, headline metrics first."""
    skip = {"round", "samples", "n", "n_typed", "steps", "seconds", "n_tumour_unknown_type", "sites", "pooled", "score"}
    cols = [c for c in df.columns if c not in skip and c not in ("site", "split", "checkpoint")
            and pd.api.types.is_numeric_dtype(df[c]) and df[c].notna().any()]
    head = [m for m in HEADLINE_METRICS if m in cols]
    return head + sorted(c for c in cols if c not in head)


POOLED_SCORE = "pooled validation of all sites, the best model's selection score"


def is_pooled(site: str) -> bool:
    return "+" in str(site)


def global_curves(df: pd.DataFrame) -> tuple[pd.DataFrame, str]:
    """Rows of the model being trained per round: ``global`` (federated) or the pooled training set.

    Returns ``(rows, description)``; the final per-site test evaluation (``checkpoint`` column) is left out.
    """
    if df.empty:
        return df, ""
    per_round = df[df["checkpoint"].isna()] if "checkpoint" in df.columns else df
    g = per_round[per_round["site"] == "global"]
    if not g.empty and "pooled" in g.columns and g["pooled"].eq(True).any():
        # the server's pooled validation (the sites' summed counts): the score it picks the best model by
        return g[g["pooled"].eq(True)].sort_values("round"), f"global model ({POOLED_SCORE})"
    if not g.empty:  # a run from before the server logged its pooled score
        return g.sort_values("round"), "global model (size-weighted mean of the sites' scores)"
    pooled = per_round[per_round["site"].map(is_pooled)]
    if not pooled.empty:
        return pooled.sort_values("round"), f"pooled training set {pooled['site'].iloc[0]}"
    # local-only run: the single training site
    train_sites = per_round[per_round["split"] == "train"]["site"].unique()
    if len(train_sites) == 1:
        s = per_round[per_round["site"] == train_sites[0]]
        return s.sort_values("round"), f"site {train_sites[0]}"
    return per_round.iloc[0:0], ""


def site_curves(df: pd.DataFrame) -> pd.DataFrame:
    """Per-hospital rows (not ``global``, ``union`` or a pooled set), in round order."""
    if df.empty:
        return df
    mask = ~df["site"].isin(SPECIAL_SITES) & ~df["site"].map(is_pooled)
    return df[mask].sort_values(["site", "round"])


HEADLINES = (("macro_f1", "macro-F1"), ("tumour_auroc", "tumour AUROC"), ("no_tumor_recall", "no_tumor recall"),
             ("accuracy", "accuracy"))


def with_interval(m: dict, key: str) -> str | None:
    """``0.812 [0.78, 0.84]``, with `` ⚠`` when the metric rests on fewer than 10 images of a class."""
    v = m.get(key)
    if isinstance(v, float) and math.isnan(v):
        return None
    return fmt_metric(m, key, flag=" ⚠", missing=None)


def test_table(run: Run) -> pd.DataFrame:
    """The best model's test metrics per site and on the union, with 95 % intervals and small-n warnings."""
    rows = []
    for site, m in final_results(run).items():
        row = {"site": site, "n": m.get("n"), "healthy n": m.get("n_no_tumor")}
        for key, label in HEADLINES:
            row[label] = with_interval(m, key)
        flags = m.get("unreliable") or {}
        row["unreliable"] = "; ".join(f"{k}: {v}" for k, v in flags.items()) if isinstance(flags, dict) else ""
        rows.append(row)
    return pd.DataFrame(rows).dropna(axis=1, how="all")


def aggregation_curves(df: pd.DataFrame) -> pd.DataFrame:
    """Per round and site: the site's share of the aggregation weight and its update's norm."""
    if df.empty or "split" not in df.columns:
        return pd.DataFrame()
    return df[df["split"] == "aggregation"].sort_values(["site", "round"])


def final_results(run: Run) -> dict[str, dict]:
    """``results.json``'s test metrics per evaluated site, or {}."""
    res = read_json(run.dir.results)
    if not isinstance(res, dict):
        return {}
    test = res.get("test", res)
    return {k: v for k, v in test.items() if isinstance(v, dict)} if isinstance(test, dict) else {}


def _rows_of(obj) -> list[dict]:
    if isinstance(obj, dict):
        for key in ("rows", "variants", "models", "results"):
            if isinstance(obj.get(key), list):
                obj = obj[key]
                break
    return [r for r in obj if isinstance(r, dict)] if isinstance(obj, list) else []


def _read_csv_rows(path: Path) -> list[dict]:
    try:
        with path.open(newline="") as fh:
            rows = list(csv.DictReader(fh))
    except (OSError, csv.Error, UnicodeDecodeError):
        return []
    out = []
    for r in rows:
        conv = {}
        for k, v in r.items():
            try:
                conv[k] = float(v) if v not in ("", None) else None
            except (TypeError, ValueError):
                conv[k] = v
        out.append(conv)
    return out


def read_table(json_path: Path, csv_path: Path | None = None) -> pd.DataFrame:
    """Rows from a JSON list (or ``{"rows": [...]}``), else from the CSV twin; empty frame if neither."""
    rows = _rows_of(read_json(json_path))
    if not rows and csv_path is not None:
        rows = _read_csv_rows(csv_path)
    return pd.DataFrame(rows)


def compare_rows(run: Run) -> pd.DataFrame:
    """A ``compare`` run's rows: mode, site, macro_f1, accuracy, tumour_auroc, budget."""
    return read_table(run.dir.compare_json, run.dir.compare_csv)


def mode_of(run: Run) -> str:
    if run.kind == "local":
        site = run.config.get("site") or ""
        return f"local ({site})" if site else "local"
    return run.kind


def comparison_from_runs(runs: list[Run]) -> pd.DataFrame:
    """Federated vs centralised vs local-only from the newest run of each mode's ``results.json``."""
    rows, seen = [], set()
    for run in runs:  # newest first
        if run.kind not in ("federated", "centralized", "local"):
            continue
        mode = mode_of(run)
        if mode in seen:
            continue
        res = final_results(run)
        if not res:
            continue
        seen.add(mode)
        for site, m in res.items():
            row = {"mode": mode, "site": site, "run": run.name, "n": m.get("n"), "healthy n": m.get("n_no_tumor")}
            for k, _label in HEADLINES:
                row[k] = m.get(k)
                ci = (m.get("ci") or {}).get(k)
                row[f"{k} 95% CI"] = f"[{ci[0]:.2f}, {ci[1]:.2f}]" if isinstance(ci, list) and len(ci) == 2 else None
            row["unreliable"] = ", ".join(sorted(m.get("unreliable") or {}))
            rows.append(row)
    return pd.DataFrame(rows).dropna(axis=1, how="all")


def model_label(name: str) -> str:
    """NVFlare's global-model file names as words; site models keep their site name."""
    n = str(name)
    if "global" in n.lower() and n != "global":
        return "global (best)" if "best" in n.lower() else "global (last)"
    return n


def _cell(cell) -> dict:
    """A cross-site cell's scalar metrics, ``test_`` prefixes dropped (``test_macro_f1`` -> ``macro_f1``)."""
    if isinstance(cell, (int, float)):
        return {"value": cell}
    if not isinstance(cell, dict):
        return {}
    return {(k[5:] if k.startswith("test_") else k): v for k, v in cell.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)}


def cross_site(run: Run) -> dict:
    """``cross_site.json`` as ``{"models", "sites", "matrix"}`` (model labels made readable), or {}."""
    cs = read_json(run.dir.cross_site)
    if not isinstance(cs, dict) or not isinstance(cs.get("matrix"), dict):
        return {}
    raw = {m: row for m, row in cs["matrix"].items() if isinstance(row, dict)}
    order = [m for m in cs.get("models") or list(raw) if m in raw]
    order = sorted(order, key=lambda m: not model_label(m).startswith("global"))  # global model(s) first
    matrix = {model_label(m): {s: _cell(c) for s, c in raw[m].items()} for m in order}
    sites = list(cs.get("sites") or sorted({s for row in raw.values() for s in row}))
    return {"models": list(matrix), "sites": sites, "matrix": matrix}


def cross_site_metrics(cs: dict) -> list[str]:
    """The metrics present in a cross-site matrix, headline metrics first, counts left out."""
    found = {k for row in cs.get("matrix", {}).values() for cell in row.values() for k in cell
             if k not in ("n", "n_typed", "n_tumour_unknown_type")}
    head = [m for m in HEADLINE_METRICS if m in found]
    return head + sorted(found - set(head))


def cross_site_grid(cs: dict, metric: str) -> tuple[list[str], list[str], list[list[float | None]]]:
    """(models, sites, values) of one metric, None where a cell is missing or not finite."""
    grid = []
    for m in cs["models"]:
        row = []
        for s in cs["sites"]:
            v = cs["matrix"].get(m, {}).get(s, {}).get(metric)
            row.append(float(v) if isinstance(v, (int, float)) and math.isfinite(v) else None)
        grid.append(row)
    return cs["models"], cs["sites"], grid


def data_summary(run: Run) -> pd.DataFrame:
    """Per-hospital data summary: images, distinct pictures, dropped duplicates, conflicts, split sizes."""
    summ = read_json(run.dir.data_summary)
    if not isinstance(summ, dict) or not isinstance(summ.get("sites"), dict):
        return pd.DataFrame()
    rows = []
    for name, s in summ["sites"].items():
        if not isinstance(s, dict):
            continue
        classes = s.get("classes") or {}
        row = {
            "site": name,
            "scheme": s.get("scheme"),
            "files": s.get("files"),
            "unusable": sum((s.get("unusable") or {}).values()),
            "distinct pictures": s.get("distinct_pictures"),
            "dropped cross-site duplicates": s.get("dropped_cross_site_duplicates"),
            "dropped in-site duplicates": s.get("dropped_in_site_duplicates"),
            "dropped label conflicts": s.get("dropped_label_conflicts"),
        }
        for split in ("train", "val", "test"):
            row[split] = sum((classes.get(split) or {}).values())
        rows.append(row)
    df = pd.DataFrame(rows)
    return df.dropna(axis=1, how="all") if not df.empty else df


def label_schemes(run: Run) -> set[str]:
    """The hospitals' label schemes (``multiclass``, ``tumour_type``, ``binary``), from data_summary.json."""
    summ = read_json(run.dir.data_summary)
    sites = summ.get("sites") if isinstance(summ, dict) else None
    return {str(s.get("scheme")) for s in sites.values() if isinstance(s, dict) and s.get("scheme")} \
        if isinstance(sites, dict) else set()


def default_metric_order(metrics: list[str], schemes: set[str]) -> list[str]:
    """Tumour AUROC first when every hospital labels only tumour / no tumour (macro-F1 is then undefined)."""
    if schemes == {"binary"} and "tumour_auroc" in metrics:
        return ["tumour_auroc"] + [m for m in metrics if m != "tumour_auroc"]
    return metrics


def class_counts(run: Run) -> pd.DataFrame:
    """Long frame site, split, label, count from ``data_summary.json``."""
    summ = read_json(run.dir.data_summary)
    rows = []
    if isinstance(summ, dict) and isinstance(summ.get("sites"), dict):
        for name, s in summ["sites"].items():
            for split, counts in ((s or {}).get("classes") or {}).items():
                for label, n in (counts or {}).items():
                    rows.append({"site": name, "split": split, "label": label, "count": n})
    return pd.DataFrame(rows)


def source_summary(run: Run) -> dict:
    """Federation-level data facts (the simulated source's dropped duplicates, clusters)."""
    summ = read_json(run.dir.data_summary)
    if not isinstance(summ, dict):
        return {}
    out = {k: summ[k] for k in ("usable_images", "duplicate_clusters", "groups_spanning_sites",
                                "label_conflict_clusters") if k in summ}
    src = summ.get("source")
    if isinstance(src, dict):
        out.update({f"source {k}": src[k] for k in ("source", "files", "dropped_in_site_duplicates",
                                                    "dropped_label_conflicts") if k in src})
    return out


# ---------------------------------------------------------------- compression


def compression_report(run_or_dir: Run | Path) -> pd.DataFrame:
    """``compression/report.json`` (or ``.csv``) with the ratios vs fp32 filled in when absent."""
    d = RunDir(run_or_dir.path if isinstance(run_or_dir, Run) else run_or_dir).compression
    df = read_table(d / "report.json", d / "report.csv")
    if df.empty or "variant" not in df.columns:
        return pd.DataFrame()
    nested = [c for c in df.columns if df[c].map(lambda v: isinstance(v, (dict, list))).any()]
    return with_ratios(df.drop(columns=nested))


def with_ratios(df: pd.DataFrame) -> pd.DataFrame:
    """Add size/latency/MACs ratios and the macro-F1 delta vs the fp32 row where the report lacks them."""
    df = df.copy()
    fp32 = df[df["variant"].astype(str) == "fp32"]
    if fp32.empty:
        return df
    base = fp32.iloc[0]
    pairs = {"size_ratio": "file_bytes", "latency_ratio_1t": "latency_ms_p50_1t", "macs_ratio": "macs"}
    for ratio, col in pairs.items():
        if ratio not in df.columns and col in df.columns:
            b = pd.to_numeric(pd.Series([base[col]]), errors="coerce").iloc[0]
            df[ratio] = pd.to_numeric(df[col], errors="coerce") / b if b and b == b else None
    for m in ("macro_f1", "tumour_auroc"):
        if f"{m}_delta" not in df.columns and m in df.columns:
            b = pd.to_numeric(pd.Series([base[m]]), errors="coerce").iloc[0]
            df[f"{m}_delta"] = pd.to_numeric(df[m], errors="coerce") - b
    return df


def model_files(run: Run) -> dict[str, Path]:
    """The model variants of a run that exist on disk: label -> path (torch checkpoints first)."""
    out = {}
    for name in ("best", "last"):
        p = run.dir.checkpoints / f"{name}.pt"
        if p.is_file():
            out[f"{name}.pt (torch)"] = p
    comp = run.dir.compression
    p = comp / "pruned.pt"
    if p.is_file():
        out["pruned.pt (torch)"] = p
    for v in ONNX_VARIANTS:
        p = comp / f"{v}.onnx"
        if p.is_file():
            out[f"{v}.onnx (ONNX Runtime)"] = p
    return out


def bench_models(workspace: str | Path) -> pd.DataFrame:
    """``<workspace>/bench_models.json`` rows (written by ``fedbrain bench models``), or empty."""
    return read_table(workspace_bench_models(workspace), workspace_bench_models(workspace).with_suffix(".csv"))


def bench_models_meta(workspace: str | Path) -> dict:
    """The benchmark table's header: ``goal``, ``hardware``, ``commands``, ``created`` (or {})."""
    doc = read_json(workspace_bench_models(workspace))
    return {k: v for k, v in doc.items() if k != "rows"} if isinstance(doc, dict) else {}


def bench_goal_rows(meta: dict) -> pd.DataFrame:
    """The goal check (fedbrain's best own model vs the best baseline per mode and budget) as a table."""
    rows = [g for g in meta.get("goal") or [] if isinstance(g, dict)]
    df = pd.DataFrame(rows)
    if not df.empty and "met" in df:
        df["met"] = df["met"].map({True: "yes", False: "no"})
    return df


def first_column(df: pd.DataFrame, *names: str) -> str | None:
    return next((n for n in names if n in df.columns and df[n].notna().any()), None)


# ---------------------------------------------------------------- evaluation: calibration, robustness, external

CMD_ROBUSTNESS = "fedbrain evaluate <run> --robustness"
CMD_EXTERNAL = "fedbrain evaluate <run> --external DIR --layout yesno|folders|sartaj|figshare|csv"


def calibration_summary(run: Run, site: str = "union") -> dict:
    """The best model's calibration (its parameters; older results: a temperature), its ECE before/after and its
    reliability bins on ``site``'s test split."""
    m = final_results(run).get(site) or {}
    params = m.get("calibration")
    if not isinstance(params, dict):
        params = {"temperature": m["temperature"]} if isinstance(m.get("temperature"), (int, float)) else {}
    return {"calibration": params, "ece": m.get("ece"), "tumour_ece": m.get("tumour_ece"),
            "uncalibrated": m.get("uncalibrated") or {}, "reliability": m.get("reliability") or {}, "n": m.get("n")}


def reliability_frame(summary: dict, kind: str = "tumour") -> pd.DataFrame:
    """One reliability diagram as rows (bin, mean confidence, observed frequency, n); empty bins dropped."""
    rows = [r for r in (summary.get("reliability") or {}).get(kind, []) if isinstance(r, dict) and r.get("n")]
    return pd.DataFrame(rows)


def evaluation_files(run: Run, kind: str) -> list[Path]:
    """``evaluation/<kind>-*.json`` of a run (kind: robustness | external), newest first."""
    folder = run.dir.evaluations
    if not folder.is_dir():
        return []
    return sorted(folder.glob(f"{kind}-*.json"), key=lambda p: p.stat().st_mtime, reverse=True)


def robustness_frame(path: Path) -> pd.DataFrame:
    """A robustness result's rows (shift, strength, metrics and drops), or empty."""
    res = read_json(path)
    rows = res.get("rows") if isinstance(res, dict) else None
    return pd.DataFrame([r for r in rows if isinstance(r, dict)]).drop(columns=["ci"], errors="ignore") \
        if isinstance(rows, list) else pd.DataFrame()


def robustness_worst(path: Path) -> dict:
    res = read_json(path)
    return res.get("worst", {}) if isinstance(res, dict) else {}


def external_table(path: Path) -> tuple[dict, pd.DataFrame]:
    """An external validation's facts (folder, layout, twins, skipped) and its results table."""
    res = read_json(path)
    if not isinstance(res, dict):
        return {}, pd.DataFrame()
    rows = []
    for label, m in (res.get("results") or {}).items():
        if isinstance(m, dict):
            row = {"scored on": label, "n": m.get("n"), "healthy n": m.get("n_no_tumor")}
            for key, col in HEADLINES:
                row[col] = with_interval(m, key)
            row["ECE"] = None if m.get("ece") is None else round(m["ece"], 3)
            rows.append(row)
    facts = {k: res.get(k) for k in ("external", "layout", "scheme", "n_images", "n_training_twins", "twin_check",
                                     "skipped", "calibration")}
    return facts, pd.DataFrame(rows).dropna(axis=1, how="all")


# ---------------------------------------------------------------- Privacy (issue 13)

CMD_AUDIT = "fedbrain audit <run>"
CMD_DP = "fedbrain simulate --dp-epsilon 8"


def privacy_curves(df: pd.DataFrame) -> pd.DataFrame:
    """ε spent per site over the rounds (the sites' train rows with DP accounting), or empty."""
    if df.empty or "dp_epsilon" not in df.columns:
        return pd.DataFrame()
    rows = df[(df.get("split") == "train") & df["dp_epsilon"].notna()]
    cols = [c for c in ("round", "site", "dp_epsilon", "dp_epsilon_budget", "dp_mechanism", "dp_delta",
                        "dp_site_epsilon", "dp_patient_epsilon", "dp_slices_per_patient")
            if c in rows.columns]
    return rows[cols].sort_values(["site", "round"]).reset_index(drop=True)


def membership_audit(run: Run) -> dict:
    """``evaluation/membership.json`` (``fedbrain audit``), or {}."""
    res = read_json(run.dir.membership_audit)
    return res if isinstance(res, dict) else {}


def membership_table(audit: dict) -> pd.DataFrame:
    """One row per site (and all sites pooled): ε spent, attack AUROC with its CI, TPR at 1 % FPR, n per side."""
    spent = audit.get("privacy") or {}
    rows = []
    sites = dict((audit.get("membership") or {}).get("sites") or {})
    if (audit.get("membership") or {}).get("pooled"):
        sites["all sites"] = audit["membership"]["pooled"]
    for site, m in sites.items():
        if not isinstance(m, dict):
            continue
        eps = (spent.get(site) or {}).get("final_epsilon")
        row = {"site": site, "ε spent": "no DP" if eps is None and site != "all sites" else
               (None if eps is None else round(eps, 2))}
        own = spent.get(site) or {}
        if "patient_epsilon" in own:  # the site's spend over all its jobs, and per patient (group privacy)
            row.update({"ε site (all jobs)": round(own.get("site_epsilon", eps), 2),
                        "ε per patient": round(own["patient_epsilon"], 2),
                        "slices per patient": int(own["slices_per_patient"])})
        if "auroc" in m:
            ci = m.get("auroc_ci") or [None, None]
            row.update({"attack AUROC": round(m["auroc"], 3),
                        "95% CI": f"[{ci[0]:.2f}, {ci[1]:.2f}]" if None not in ci else None,
                        "TPR @ 1% FPR": round(m.get("tpr_at_1pct_fpr", float("nan")), 3),
                        "members / non-members": f"{m.get('members')} / {m.get('nonmembers')}"})
            if "auroc" in (m.get("calibrated") or {}):
                row["calibrated attack AUROC"] = round(m["calibrated"]["auroc"], 3)
        else:
            row["attack AUROC"] = m.get("skipped")
        rows.append(row)
    return pd.DataFrame(rows)


def roc_frame(audit: dict) -> pd.DataFrame:
    """The attack's ROC curves as long rows (site, fpr, tpr)."""
    rows = []
    mem = audit.get("membership") or {}
    curves = {**(mem.get("sites") or {}), **({"all sites": mem["pooled"]} if mem.get("pooled") else {})}
    for site, m in curves.items():
        roc = (m or {}).get("roc") if isinstance(m, dict) else None
        if roc:
            rows.extend({"site": site, "fpr": f, "tpr": t} for f, t in zip(roc["fpr"], roc["tpr"], strict=False))
    return pd.DataFrame(rows)


CMD_INVERSION = "fedbrain audit --attack inversion <run>"


def inversion_audit(run: Run) -> dict:
    """``evaluation/inversion.json`` (``fedbrain audit --attack inversion``), or {}."""
    res = read_json(run.dir.inversion_audit)
    return res if isinstance(res, dict) else {}


def inversion_table(audit: dict) -> pd.DataFrame:
    """One row per attack: the reconstructions' mean SSIM / PSNR beside the no-information baselines'."""
    rows = []
    for key, a in (audit.get("attacks") or {}).items():
        s = (a or {}).get("summary") if isinstance(a, dict) else None
        if not s:
            continue
        rows.append({"attack": key, "setting": a.get("setting_name") or a.get("setting"), "server sees": a.get("view"),
                     "best of suite": a.get("best_attack"),
                     "analytic": _analytic_cell(a),
                     "images": a.get("images"), "px": a.get("image_size"), "SSIM": s.get("ssim"),
                     "SSIM flat": s.get("flat_ssim"), "SSIM other slice": s.get("other_slice_ssim"),
                     "PSNR": s.get("psnr"), "PSNR flat": s.get("flat_psnr"),
                     "PSNR other slice": s.get("other_slice_psnr"),
                     "beats both baselines": "yes" if s.get("any_beats_baselines") else "no"})
    return pd.DataFrame(rows)


def _analytic_cell(attack: dict) -> str:
    """The analytic attack's SSIM, 'not applicable', or '' (an audit from before the suite)."""
    analytic = (attack.get("suite") or {}).get("analytic") or {}
    if "not_applicable" in analytic:
        return "not applicable"
    ssim = (analytic.get("summary") or {}).get("ssim")
    return f"SSIM {ssim:.3f}" if isinstance(ssim, (int, float)) else ""


def inversion_pictures(run: Run, audit: dict) -> list[tuple[str, Path]]:
    """(attack, PNG of originals over reconstructions) for each attack whose picture exists."""
    out = []
    for key, a in (audit.get("attacks") or {}).items():
        png = run.dir.evaluations / str((a or {}).get("png") or "") if isinstance(a, dict) else None
        if png is not None and png.is_file() and png.parent == run.dir.evaluations:
            out.append((key, png))
    return out


def what_left_table(audit: dict) -> pd.DataFrame:
    """Per site, what its updates carried (from the server's structural audit)."""
    rows = []
    for site, w in (audit.get("what_left") or {}).items():
        rows.append({"site": site, "updates": w.get("updates"), "rejected": w.get("rejected"),
                     "without DP accounting": w.get("without_dp"), "weight tensors": w.get("tensors"),
                     "metric names": len(w.get("metric_names") or []),
                     "meta names": ", ".join(w.get("meta_names") or []),
                     "computed from training images": ", ".join(w.get("training_data_scalars") or []) or "none"})
    return pd.DataFrame(rows)
