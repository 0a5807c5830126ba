"""The dashboard's pages, one function each; ``app.py`` routes between them with ``st.navigation``.

Pages only read run folders (``workspace/README.md``); nothing here trains or writes. Uploaded scans
stay in memory: they are decoded from ``UploadedFile.getvalue()`` bytes, never written, cached or logged.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import numpy as np
import pandas as pd
import plotly.express as px
import streamlit as st

from fedbrain.dashboard import MAX_UPLOAD_MB
from fedbrain.dashboard import readers as R
from fedbrain.runs import RunDir, workspace_bench_models
from fedbrain.status import BADGES, LIVE_STATES

MAX_UPLOAD_BYTES = MAX_UPLOAD_MB * 1024 * 1024
DISPLAY_MAX = 512  # uploaded slices are shown at most this many pixels on a side
RESEARCH_NOTICE = ("**Research use only.** Not a medical device and not validated for diagnosis: do not use "
                   "these outputs for clinical decisions.")
CLASS_LABELS = {"glioma": "Glioma", "meningioma": "Meningioma", "pituitary": "Pituitary",
                "no_tumor": "No tumour", "tumour": "Tumour"}
LIVE_REFRESH_S = 2  # seconds between redraws of a live run
_GRADCAM_LOCK = threading.Lock()  # hooks go on a model shared by every session


def workspace() -> Path:
    """The workspace read: ``$FEDBRAIN_WORKSPACE`` (set by ``fedbrain dashboard``), else ./workspace."""
    return Path(os.environ.get("FEDBRAIN_WORKSPACE") or "workspace").expanduser().resolve()


# ---------------------------------------------------------------- cached file readers


def _stamp(*paths: Path) -> tuple:
    """Modification stamps of files and of the files directly inside folders (the cache key)."""
    out = []
    for p in paths:
        try:
            if p.is_dir():
                out.extend((e.name, e.stat().st_mtime_ns, e.stat().st_size)
                           for e in os.scandir(p) if e.is_file())
            elif p.exists():
                out.append((p.name, p.stat().st_mtime_ns, p.stat().st_size))
        except OSError:
            continue
    return tuple(sorted(out))


@st.cache_data(show_spinner=False, ttl=3, max_entries=16)
def _runs(ws: str) -> list[R.Run]:
    return R.list_runs(ws)


@st.cache_data(show_spinner=False, max_entries=512)
def _run_read(reader: str, run_path: str, kind: str, stamp: tuple):
    """One reader of ``readers`` over a run folder, re-read when a file in it changes."""
    cfg = R.read_json(RunDir(run_path).config)
    return getattr(R, reader)(R.Run(Path(run_path), kind, cfg if isinstance(cfg, dict) else {}))


def run_read(reader: str, run: R.Run):
    return _run_read(reader, str(run.path), run.kind, _stamp(run.path, run.dir.compression, run.dir.evaluations))


@st.cache_data(show_spinner=False, max_entries=256)
def _metrics(path: str, stamp: tuple) -> pd.DataFrame:
    return R.read_metrics(path)


def metrics_of(run: R.Run) -> pd.DataFrame:
    p = run.dir.metrics
    return _metrics(str(p), _stamp(p))


@st.cache_data(show_spinner=False, max_entries=64)
def _comparison(ws: str, stamp: tuple) -> pd.DataFrame:
    return R.comparison_from_runs(R.list_runs(ws))


@st.cache_data(show_spinner=False, max_entries=16)
def _bench_models(ws: str, stamp: tuple) -> pd.DataFrame:
    return R.bench_models(ws)


@st.cache_data(show_spinner=False, max_entries=16)
def _bench_models_meta(ws: str, stamp: tuple) -> dict:
    return R.bench_models_meta(ws)


@st.cache_resource(show_spinner="Loading the model…", max_entries=8)
def _predictor(path: str, stamp: tuple):
    from fedbrain.predict import load_predictor

    predictor = load_predictor(path)
    predictor.predict(np.tile(np.arange(64, dtype=np.uint8) * 4, (64, 1)))  # warm-up: latency is steady-state
    return predictor


# ---------------------------------------------------------------- shared widgets


def _commands(*lines: tuple[str, str]) -> str:
    return "\n".join(f"- `{cmd}` — {what}" for cmd, what in lines)


EMPTY_RUNS = (
    ("fedbrain simulate", "a federated run: global metrics per round, per-site curves, cross-site results"),
    ("fedbrain train", "a centralised baseline (`--mode local --site NAME` for a local-only one)"),
    ("fedbrain compare", "federated vs centralised vs local-only on the same hospitals"),
)


def _no_runs(ws: Path, *lines: tuple[str, str]) -> None:
    where = f"`{ws}`" + ("" if ws.is_dir() else " (the folder does not exist yet)")
    st.info(f"No runs in {where}. These commands create what this page shows:\n\n" + _commands(*lines))


def _pick_run(runs: list[R.Run], key: str, prefer: tuple[str, ...] = ()) -> R.Run:
    names = [r.name for r in runs]
    by_name = {r.name: r for r in runs}
    default = R.default_run_index(runs, prefer)
    name = st.selectbox("Run", names, index=default, key=key, format_func=lambda n: by_name[n].label)
    run = by_name.get(name, runs[0])
    st.caption(f"`{run.path}`")
    return run


def _metric_picker(options: list[str], key: str) -> str | None:
    if not options:
        return None
    return st.selectbox("Metric", options, key=key)


def _chart(fig, height: int | None = None) -> None:
    fig.update_layout(margin=dict(l=10, r=10, t=40, b=10), **({"height": height} if height else {}))
    st.plotly_chart(fig, width="stretch")


def _rounds_axis(fig, rounds: pd.Series):
    """Whole-number ticks for rounds / epochs (one per round when there are few), the axis spanning just the
    rounds there are (rounds count from 0, as in every file and table; epochs from 1)."""
    values = pd.to_numeric(rounds, errors="coerce").dropna()
    if values.empty:
        return fig
    lo, hi = float(values.min()), float(values.max())
    pad = max(0.1, 0.03 * (hi - lo))
    fig.update_xaxes(tickformat="d", dtick=1 if hi - lo <= 20 else None, range=[lo - pad, hi + pad])
    return fig


def _sidebar(ws: Path) -> None:
    with st.sidebar:
        st.caption(f"Workspace: `{ws}`")
        if st.button("Reload files", key="reload"):
            st.cache_data.clear()


# ---------------------------------------------------------------- Federation


def federation_page() -> None:
    ws = workspace()
    _sidebar(ws)
    st.title("Federation")
    runs = _runs(str(ws))
    if not runs:
        _no_runs(ws, *EMPTY_RUNS)
        return
    pick_col, metric_col = st.columns(2)
    with pick_col:
        run = _pick_run(runs, "fed_run", prefer=("federated",))
    df = metrics_of(run)
    schemes = run_read("label_schemes", run)
    options = R.default_metric_order(R.metric_columns(df), schemes) or ["macro_f1"]
    with metric_col:
        metric = _metric_picker(options, "fed_metric")
        if schemes == {"binary"}:
            st.caption("Every hospital here labels only tumour / no tumour: tumour AUROC is the headline.")

    if run.live:  # redrawn every few seconds without reloading the page, until the run ends
        st.fragment(_live_view, run_every=LIVE_REFRESH_S)(run, metric)
    else:
        _status_section(run, R.run_status(run))
        _curves_section(run, metric)

    _test_section(run)
    _aggregation_section(df)
    _comparison_section(ws, runs, run, metric)
    _cross_site_section(run, metric)
    _data_section(run)

    st.subheader("Run config")
    cfg = run.config
    if cfg:
        st.json(cfg, expanded=False)
    else:
        st.info("`config.json` is unreadable.")


def _curves_section(run: R.Run, metric: str | None) -> None:
    df = metrics_of(run)
    available = R.default_metric_order(R.metric_columns(df), run_read("label_schemes", run))
    if metric not in available and available:  # a live run's first rows may lack the picked metric
        metric = available[0]
    global_col, sites_col = st.columns(2)
    with global_col:
        st.subheader("Global model per round" if run.kind == "federated" else "Training curve per epoch")
        curves, what = R.global_curves(df)
        if metric in curves.columns and curves[metric].notna().any():
            fig = px.line(curves.dropna(subset=[metric]), x="round", y=metric, color="split", markers=True,
                          title=f"{metric} of the {what}")
            _chart(_rounds_axis(fig, curves["round"]), height=380)
        elif run.live:
            st.info("Waiting for the first validated round: the curves appear as the sites report.")
        else:
            st.info(f"No per-round metrics in this run (`metrics.jsonl`). `{R.CMD_SIMULATE}` writes the "
                    f"global model's metrics per round; `{R.CMD_TRAIN}` writes per-epoch metrics.")
    with sites_col:
        st.subheader("Per-site curves")
        sites = R.site_curves(df)
        per_round = sites[sites["checkpoint"].isna()] if "checkpoint" in sites.columns else sites
        if metric in per_round.columns and per_round[metric].notna().any():
            data = per_round.dropna(subset=[metric])
            fig = px.line(data, x="round", y=metric, color="site", line_dash="split", markers=True,
                          title=f"{metric} per hospital")
            _chart(_rounds_axis(fig, data["round"]), height=380)
        elif metric in sites.columns and sites[metric].notna().any():
            data = sites.dropna(subset=[metric])
            _chart(px.bar(data, x="site", y=metric, color="split", barmode="group",
                          title=f"{metric} per hospital (best checkpoint)"), height=380)
            st.caption(f"This {run.kind} run evaluated each hospital once, with its best checkpoint; "
                       f"`{R.CMD_SIMULATE}` writes per-round curves for every hospital.")
        else:
            st.info(f"No per-site metrics in this run. `{R.CMD_SIMULATE}` writes them for every hospital.")

    recalls = R.class_recall_curves(df)
    if not recalls.empty:
        fig = px.line(recalls, x="round", y="recall", color="class", markers=True,
                      title="recall of each class on the sites' pooled validation splits, per round")
        _chart(_rounds_axis(fig, recalls["round"]), height=320)


def _live_view(run: R.Run, metric: str | None) -> None:
    """The live part of the Federation page: status, progress and the curves; a full rerun once the run ends."""
    status = R.run_status(run)
    if status.get("state") not in LIVE_STATES:
        st.cache_data.clear()  # the run list's states and the final files are new
        st.rerun()
    _status_section(run, status)
    _curves_section(run, metric)


def _status_section(run: R.Run, status: dict) -> None:
    from fedbrain.status import FAILED, STOPPED, format_seconds, progress_text

    state = status.get("state", "unknown")
    text = progress_text(status)
    done, total = status.get("done"), status.get("total")
    if state in LIVE_STATES:
        share = done / total if isinstance(done, int) and isinstance(total, int) and total else 0.0
        st.progress(min(1.0, share), text=f"{BADGES.get(state, '')} **{text}**")
        sites = status.get("sites") or {}
        if sites:
            st.dataframe(pd.DataFrame([{"site": s, "last contact": (c or {}).get("last_contact"),
                                        "last round": (c or {}).get("last_round")}
                                       for s, c in sorted(sites.items())]), hide_index=True)
        if isinstance(status.get("elapsed_s"), (int, float)):
            st.caption(f"Live: this page refreshes every {LIVE_REFRESH_S} s; running for "
                       f"{format_seconds(status['elapsed_s'])}. `fedbrain runs follow {run.name}` shows the same "
                       "in a terminal.")
    elif state == FAILED:
        st.error(f"{BADGES[FAILED]} This run **failed**: {status.get('error') or 'see its logs'}")
        for site, err in (status.get("site_errors") or {}).items():
            st.markdown(f"**{site}**")
            st.code(str(err), language="text")
        st.caption(f"Full logs: `{run.dir.nvflare}` (each participant's `log.txt`).")
    elif state == STOPPED:
        st.warning(f"{BADGES[STOPPED]} {text}. The tables below show the best global model of the rounds that ran.")
    elif not status.get("inferred"):
        st.caption(f"{BADGES.get(state, '')} {text}")


def _test_section(run: R.Run) -> None:
    st.subheader("Best model on each site's test split and their union")
    table = run_read("test_table", run)
    if table.empty:
        st.info(f"No test results in this run yet (`results.json`); `{R.CMD_SIMULATE}` writes them when it ends.")
        return
    st.dataframe(table, hide_index=True, width="stretch")
    st.caption("[95 % bootstrap interval]. ⚠ = rests on fewer than 10 images of a class (the `unreliable` "
               "column says which): shown with its n, never a headline. The union is the headline.")


def _aggregation_section(df: pd.DataFrame) -> None:
    agg = R.aggregation_curves(df)
    if agg.empty:
        return
    st.subheader("Who drives the global model")
    c1, c2 = st.columns(2)
    with c1:
        if "weight_share" in agg.columns:
            fig = px.line(agg, x="round", y="weight_share", color="site", markers=True,
                          title="share of the aggregation weight per round")
            _chart(_rounds_axis(fig, agg["round"]), height=320)
    with c2:
        if "update_norm" in agg.columns:
            fig = px.line(agg, x="round", y="update_norm", color="site", markers=True,
                          title="norm of each site's update (its weights minus the global model)")
            _chart(_rounds_axis(fig, agg["round"]), height=320)


def _comparison_section(ws: Path, runs: list[R.Run], run: R.Run, metric: str | None) -> None:
    st.subheader("Federated vs centralised vs local-only")
    compare_run = run if run.kind == "compare" else next((r for r in runs if r.kind == "compare"), None)
    table = run_read("compare_rows", compare_run) if compare_run else pd.DataFrame()
    if not table.empty:
        st.caption(f"From `{compare_run.name}/compare.json` (`{R.CMD_COMPARE}`).")
    else:
        stamp = tuple(_stamp(r.dir.results) for r in runs)
        table = _comparison(str(ws), stamp)
        if not table.empty:
            st.caption(f"Assembled from the newest run of each mode (`results.json`); `{R.CMD_COMPARE}` "
                       "runs all modes on the same hospitals and budget.")
    if table.empty or "mode" not in table.columns:
        st.info("Nothing to compare yet:\n\n" + _commands(
            (R.CMD_COMPARE, "all three modes on the same hospitals and budget"),
            (R.CMD_SIMULATE, "a federated run"), (R.CMD_TRAIN, "a centralised run"),
            (R.CMD_TRAIN_LOCAL, "a local-only run")))
        return
    st.dataframe(table, hide_index=True, width="stretch")
    modes = {str(m).split(" ")[0] for m in table["mode"].dropna()}
    missing = [(c, w) for k, c, w in (("federated", R.CMD_SIMULATE, "adds the federated model"),
                                      ("centralized", R.CMD_TRAIN, "adds the centralised baseline"),
                                      ("local", R.CMD_TRAIN_LOCAL, "adds a local-only baseline"))
               if k not in modes]
    if missing:
        st.caption("Missing modes:\n\n" + _commands(*missing))
    col = metric if metric in table.columns and table[metric].notna().any() else R.first_column(
        table, "macro_f1", "accuracy", "tumour_auroc")
    if col:
        data = table.dropna(subset=[col])
        _chart(px.bar(data, x="site", y=col, color="mode", barmode="group", title=f"{col} by mode and site"))


def _cross_site_section(run: R.Run, metric: str | None) -> None:
    st.subheader("Cross-site evaluation")
    cs = run_read("cross_site", run)
    if not cs:
        st.info(f"No `cross_site.json` in this run: `{R.CMD_SIMULATE}` evaluates each hospital's model and "
                "the global model on every hospital's test split.")
        return
    metrics = R.cross_site_metrics(cs)
    options = ([metric] if metric in metrics else []) + [m for m in metrics if m != metric]
    m = st.selectbox("Cross-site metric", options or ["value"], key="cs_metric")
    models, sites, grid = R.cross_site_grid(cs, m)
    if not models or not sites:
        st.info(f"`cross_site.json` holds no evaluations (the run had cross-site evaluation off): "
                f"`{R.CMD_SIMULATE}` with cross-site evaluation on (the default) fills it.")
        return
    fig = px.imshow(np.array(grid, dtype=float), x=sites, y=models, text_auto=".2f", aspect="auto",
                    color_continuous_scale="Viridis", zmin=0, zmax=1 if m != "loss" else None,
                    labels=dict(x="evaluated on (test split)", y="model", color=m),
                    title=f"{m}: model (row) on hospital (column)")
    _chart(fig)


def _data_section(run: R.Run) -> None:
    st.subheader("Per-hospital data")
    summary = run_read("data_summary", run)
    if summary.empty:
        st.info(f"No `data_summary.json` in this run: every training command (`{R.CMD_SIMULATE}`, "
                f"`{R.CMD_TRAIN}`) writes it.")
        return
    st.dataframe(summary, hide_index=True, width="stretch")
    src = run_read("source_summary", run)
    if src:
        st.caption(" · ".join(f"{k.replace('_', ' ')}: {v}" for k, v in src.items()))
    counts = run_read("class_counts", run)
    if not counts.empty:
        _chart(px.bar(counts, x="site", y="count", color="label", facet_col="split",
                      title="Labels per hospital and split"))


# ---------------------------------------------------------------- Compression


def compression_page() -> None:
    ws = workspace()
    _sidebar(ws)
    st.title("Compression")
    runs = _runs(str(ws))
    if not runs:
        _no_runs(ws, ("fedbrain simulate", "train a federated model"), ("fedbrain train", "train a baseline"),
                 (R.CMD_COMPRESS, "then prune, quantise and export it (`<run>/compression/report.json`)"))
        return
    with_report = [r for r in runs if (r.dir.compression / "report.json").is_file()
                   or (r.dir.compression / "report.csv").is_file()]
    if not with_report:
        best = next((r for r in runs if r.dir.best.is_file()), None)
        cmd = f"fedbrain compress {best.path / 'checkpoints' / 'best.pt'}" if best else R.CMD_COMPRESS
        st.info(f"No compression report in `{ws}` yet. `{cmd}` writes the pruned, int8 and ONNX variants "
                "with `compression/report.json` (size, MACs, macro-F1, latency per variant).")
        return
    run = _pick_run(with_report, "comp_run")
    report = run_read("compression_report", run)
    if report.empty:
        st.error(f"`{run.name}/compression/report.json` has no variant rows; rerun `{R.CMD_COMPRESS}`.")
        return
    x = R.first_column(report, "latency_ms_p50_1t", "latency_ms_p50_2t")
    y = R.first_column(report, "macro_f1", "accuracy", "tumour_auroc")
    size = R.first_column(report, "file_bytes", "params")
    st.subheader("Size vs macro-F1 vs latency")
    if x and y:
        data = report.dropna(subset=[x, y]).copy()
        if size:
            data["size (MB)" if size == "file_bytes" else size] = (
                data[size] / 1e6 if size == "file_bytes" else data[size])
        size_col = ("size (MB)" if size == "file_bytes" else size) if size else None
        hover = [c for c in ("params", "macs", "latency_ms_p95_1t", "latency_ms_p50_2t", "tumour_auroc")
                 if c in data.columns]
        fig = px.scatter(data, x=x, y=y, size=size_col, color="variant", text="variant", hover_data=hover,
                         size_max=45, title=f"{y} vs {x} (marker area: {size_col or 'n/a'})")
        fig.update_traces(textposition="top center")
        _chart(fig)
    else:
        st.info("The report lacks latency or accuracy columns to plot.")
    st.subheader("Report")
    st.dataframe(report.dropna(axis=1, how="all"), hide_index=True, width="stretch")
    st.subheader("Ratios vs fp32")
    ratios = [c for c in ("size_ratio", "macs_ratio", "latency_ratio_1t", "latency_ratio_2t")
              if c in report.columns and report[c].notna().any()]
    if not ratios:
        st.info("No fp32 row to compare against in this report.")
        return
    long = report.melt(id_vars="variant", value_vars=ratios, var_name="ratio", value_name="vs fp32")
    _chart(px.bar(long, x="variant", y="vs fp32", color="ratio", barmode="group",
                  title="Ratio vs fp32 (lower is smaller / faster)"))
    cols = ["variant", *ratios, *[c for c in ("macro_f1_delta", "tumour_auroc_delta", "agreement_vs_fp32")
                                  if c in report.columns and report[c].notna().any()]]
    st.dataframe(report[cols], hide_index=True, width="stretch")


# ---------------------------------------------------------------- Predict


def _display(arr: np.ndarray) -> np.ndarray:
    """The slice shrunk for display (at most DISPLAY_MAX on a side)."""
    from PIL import Image

    h, w = arr.shape
    s = DISPLAY_MAX / max(h, w)
    if s >= 1:
        return arr
    size = (max(1, round(w * s)), max(1, round(h * s)))
    return np.asarray(Image.fromarray(arr).resize(size, Image.BILINEAR))


def _image_error_message(reason: str) -> str:
    hints = {
        "empty file": "the file is empty.",
        "not an image": "this is not a JPEG, PNG or DICOM image (was another file renamed?).",
        "truncated or corrupt image": "the image is truncated or corrupt; export it again.",
        "image too large": "the image has too many pixels (a possible decompression bomb); export a single "
                           "slice at its native resolution.",
        "image too small": "the image is too small to be an MRI slice.",
        "multi-frame image": "the file holds several frames or slices; export one slice.",
        "DICOM without pixel data": "this DICOM file holds no pixel data (e.g. a structured report); "
                                    "export an image slice.",
        "unreadable DICOM": "the DICOM file could not be parsed.",
        "unreadable DICOM pixel data": "the DICOM pixel data could not be decoded (compressed transfer "
                                       "syntax?); export it uncompressed.",
        "blank image": "the image has (almost) constant pixel values.",
        "file too large": "the file is larger than any single MRI slice should be.",
        "unsupported image format": "this image format is not accepted; export the slice as DICOM, PNG or JPEG.",
        "unsupported image mode": "the image's pixel format cannot be converted to greyscale.",
        "invalid pixel values": "the image holds NaN or infinite pixel values.",
        "extreme aspect ratio": "the image is far too narrow or wide to be an MRI slice.",
        "colour image": "the image is in colour; an MRI slice is greyscale (is this a photo or a screenshot?).",
        "random noise": "the image looks like random noise, not an MRI slice.",
        "undecodable image": "the image could not be decoded.",
    }
    return f"This file cannot be used: {hints.get(reason, reason + '.')}"


def _conversion_message(note: str) -> str:
    if note.startswith("DICOM"):
        return ("DICOM pixel data windowed to 8-bit greyscale (the file's window centre/width, else the "
                "0.5th–99.5th percentile).")
    if note.startswith(("I;16", "I->", "F->")):
        return "16-bit / high-dynamic-range image windowed to 8-bit greyscale (0.5th–99.5th percentile)."
    if "alpha" in note:
        return "Image with transparency: composited on black, then converted to greyscale."
    if note.startswith("CMYK"):
        return "CMYK image converted to greyscale."
    return f"Converted to greyscale ({note})."


def _model_choices(runs: list[R.Run]) -> dict[str, dict[str, Path]]:
    out = {}
    for r in runs:
        files = R.model_files(r)
        if files:
            out[r.name] = files
    return out


def predict_page() -> None:
    from fedbrain.contract import NO_TUMOR, TUMOUR_CLASSES
    from fedbrain.data.images import ImageError, decode_grayscale

    ws = workspace()
    _sidebar(ws)
    st.title("Predict")
    st.warning(RESEARCH_NOTICE, icon="⚠️")
    runs = _runs(str(ws))
    choices = _model_choices(runs)
    if not choices:
        train = (("fedbrain simulate", "trains a federated model (`<run>/checkpoints/best.pt`)"),
                 ("fedbrain train", "trains a centralised or local-only model"),
                 (R.CMD_COMPRESS, "adds pruned, int8 and ONNX variants of a model"))
        if runs:
            st.info(f"No model checkpoint in `{ws}` yet. These commands create one:\n\n" + _commands(*train))
        else:
            _no_runs(ws, *train)
        return
    model_runs = [r for r in runs if r.name in choices]
    c1, c2 = st.columns(2)
    with c1:
        run = _pick_run(model_runs, "pred_run", prefer=("federated",))
    with c2:
        files = choices[run.name]
        variant = st.selectbox("Model variant", list(files), key="pred_variant")
    path = files.get(variant) or next(iter(files.values()))
    try:
        predictor = _predictor(str(path), _stamp(path))
    except Exception as exc:  # a broken or foreign model file: say so, keep the app alive
        st.error(f"Cannot load `{path.name}`: {exc}")
        return
    card = predictor.card
    granularity = card.supervised_granularity
    binary = granularity == "binary"
    if binary:
        st.info("This model never saw tumour-type labels (trained on tumour / no-tumour only), so it shows "
                "**tumour vs no tumour** only.")
    elif granularity == "tumour_type":
        st.info("This model was trained on tumour-type labels only and never saw a no-tumour scan: its "
                "tumour vs no-tumour output is not supervised.")

    upload = st.file_uploader(
        "MRI slice: JPEG, PNG or DICOM", key="scan", max_upload_size=MAX_UPLOAD_MB,
        help=f"One 2-D slice, at most {MAX_UPLOAD_MB} MB. The file stays in memory: it is not saved or "
             "logged.")
    if upload is None:
        st.caption("Upload a slice to see the model's prediction.")
        return
    data = upload.getvalue()
    if len(data) > MAX_UPLOAD_BYTES:
        st.error(f"This file cannot be used: it is larger than {MAX_UPLOAD_MB} MB.")
        return
    try:
        arr, note = decode_grayscale(data, upload.name)
    except ImageError as exc:
        st.error(_image_error_message(exc.reason))
        return
    except Exception:  # anything the decoder did not anticipate: no details that could echo the file
        st.error("This file cannot be used: it could not be decoded as an image.")
        return
    if note:
        st.info(_conversion_message(note))
    try:
        pred = predictor.predict(arr)
    except Exception as exc:
        st.error(f"The model could not run on this image ({type(exc).__name__}).")
        return

    probs = {k: float(v) for k, v in pred.probabilities.items()}
    tumour = float(pred.tumour_probability)
    if pred.warnings:
        st.warning("This image lies outside what the model was trained on, so the prediction below is "
                   "unreliable:\n\n" + "\n".join(f"- {w}" for w in pred.warnings))
    m1, m2, m3 = st.columns(3)
    m1.metric("Prediction", CLASS_LABELS.get(pred.predicted, pred.predicted))
    m2.metric("Tumour probability", f"{tumour:.1%}")
    m3.metric("Latency", f"{pred.latency_ms:.1f} ms")

    img_col, cam_col, prob_col = st.columns(3)
    shown = _display(arr)
    with img_col:
        st.image(shown, caption=f"Slice ({arr.shape[1]}×{arr.shape[0]} px)", width="stretch", clamp=True)
    with cam_col:
        model = getattr(predictor, "torch_model", None)
        if getattr(predictor, "kind", "") == "torch" and model is not None:
            if binary:
                target, what = ((list(TUMOUR_CLASSES), "tumour") if tumour >= 0.5
                                else ([NO_TUMOR], "no tumour"))
            else:
                classes = list(card.classes)
                top = max(probs, key=probs.get)
                target, what = classes.index(top), CLASS_LABELS.get(top, top)
            try:
                import torch

                from fedbrain.dashboard.gradcam import gradcam, overlay

                with _GRADCAM_LOCK:
                    x = torch.from_numpy(np.ascontiguousarray(predictor.preprocess(arr)))
                    cam = gradcam(model, x, target)
                caption = (f"Grad-CAM: regions behind “{what}”" if cam.max() > 0
                           else f"Grad-CAM: no region raises the “{what}” score")
                st.image(overlay(shown, cam), caption=caption, width="stretch")
            except Exception as exc:
                st.caption(f"Grad-CAM unavailable for this model ({type(exc).__name__}).")
        else:
            st.caption("Grad-CAM is shown for torch variants (`best.pt`, `pruned.pt`); this is an ONNX "
                       "variant.")
    with prob_col:
        if binary:
            bars = pd.DataFrame({"class": ["Tumour", "No tumour"], "probability": [tumour, 1 - tumour]})
        else:
            bars = pd.DataFrame({"class": [CLASS_LABELS.get(c, c) for c in probs],
                                 "probability": list(probs.values())})
        fig = px.bar(bars, x="probability", y="class", orientation="h", range_x=[0, 1], text_auto=".1%",
                     title="Tumour vs no tumour" if binary else "Class probabilities")
        fig.update_layout(height=300, yaxis_title=None)
        _chart(fig)
        if not binary:
            st.caption(f"Tumour vs no tumour: {tumour:.1%} tumour, {1 - tumour:.1%} no tumour.")
    calibrator = card.calibrator
    calibrated = ("probabilities not calibrated (this model carries no calibration)" if calibrator.identity else
                  f"probabilities calibrated ({calibrator.describe()}; fitted on "
                  f"{card.calibration.get('fitted_on', 'validation data')})")
    st.caption(f"Model: `{run.name}` / {variant} ({card.model}); {calibrated}.")


# ---------------------------------------------------------------- Evaluation


def evaluation_page() -> None:
    ws = workspace()
    _sidebar(ws)
    st.title("Evaluation")
    runs = [r for r in _runs(str(ws)) if r.kind in ("federated", "centralized", "local")]
    if not runs:
        _no_runs(ws, *EMPTY_RUNS)
        return
    run = _pick_run(runs, "eval_run", prefer=("federated",))
    _calibration_section(run)
    _robustness_section(run)
    _external_section(run)


def _calibration_section(run: R.Run) -> None:
    st.subheader("Calibration: does “92 % tumour” mean 92 %?")
    cal = run_read("calibration_summary", run)
    if cal.get("ece") is None and cal.get("tumour_ece") is None:
        st.info(f"No calibration in this run's results yet; `{R.CMD_SIMULATE}` or `{R.CMD_TRAIN}` writes it.")
        return
    params = cal.get("calibration") or {}
    before = cal.get("uncalibrated") or {}
    c1, c2, c3 = st.columns(3)
    if "temperature" in params:  # older runs: one temperature on all four logits
        c1.metric("Temperature", f"{params['temperature']:.3g}",
                  help="fitted on validation data; logits are divided by it")
    elif params:
        c1.metric("Tumour log-odds slope", f"{params['tumour_slope']:.3g}",
                  help="Platt scaling fitted on validation data: p(tumour) = sigmoid(slope x log-odds + bias)")
        c1.caption(f"bias {params['tumour_bias']:+.3g}; type temperature {params['type_temperature']:.3g} "
                   "(divides the tumour types' log-probabilities)")
    else:
        c1.metric("Calibration", "none", help="this model carries no calibration")
    for col, key, label in ((c2, "ece", "Class ECE"), (c3, "tumour_ece", "Tumour ECE")):
        if cal.get(key) is not None:
            delta = f"{cal[key] - before[key]:+.3f} vs uncalibrated" if before.get(key) is not None else None
            col.metric(label, f"{cal[key]:.3f}", delta=delta, delta_color="inverse")
    cols = st.columns(2)
    for col, kind, title in ((cols[0], "tumour", "Tumour probability"), (cols[1], "class", "Top-class confidence")):
        frame = R.reliability_frame(cal, kind)
        if frame.empty:
            continue
        with col:
            fig = px.scatter(frame, x="confidence", y="observed", size="n", range_x=[0, 1], range_y=[0, 1],
                             title=f"Reliability: {title.lower()} (union test split, n = {int(frame['n'].sum())})",
                             labels={"confidence": f"mean {title.lower()} in bin", "observed": "observed frequency"})
            fig.add_shape(type="line", x0=0, y0=0, x1=1, y1=1, line={"dash": "dot", "color": "grey"})
            _chart(fig, 360)
    st.caption("Points on the diagonal are calibrated; marker area = images in the bin. ECE: the bins' mean "
               "|confidence − frequency| gap, weighted by their share of images (15 bins).")


def _evaluation_files(run: R.Run, kind: str, title: str, missing: str) -> list[Path]:
    """The section's heading, then its files, or a note naming the command that makes them."""
    st.subheader(title)
    files = R.evaluation_files(run, kind)
    if not files:
        st.info(missing)
    return files


def _robustness_section(run: R.Run) -> None:
    files = _evaluation_files(run, "robustness", "Robustness to acquisition shifts",
                              f"No robustness measurement for this run yet: `{R.CMD_ROBUSTNESS}`.")
    if not files:
        return
    path = files[0]
    frame = R.robustness_frame(path)
    if frame.empty:
        st.info(f"`{path.name}` is unreadable.")
        return
    metric = st.radio("Metric", ["tumour_auroc", "macro_f1", "ece"], horizontal=True, key="rob_metric",
                      format_func=lambda k: {"tumour_auroc": "tumour AUROC", "macro_f1": "macro-F1",
                                             "ece": "ECE"}[k])
    if metric in frame.columns:
        fig = px.line(frame, x="strength", y=metric, color="shift", markers=True,
                      category_orders={"strength": ["mild", "moderate", "severe"]},
                      title=f"{metric.replace('_', ' ')} under each shift ({path.name})")
        _chart(fig, 380)
    for key, w in R.robustness_worst(path).items():
        st.caption(f"Worst {key.replace('_', ' ')} drop at moderate strength: {w['drop']:+.3f} ({w['shift']}).")
    cols = [c for c in ("shift", "strength", "param", "tumour_auroc", "tumour_auroc_drop", "macro_f1",
                        "macro_f1_drop", "ece") if c in frame.columns]
    st.dataframe(frame[cols], hide_index=True, width="stretch")


def _external_section(run: R.Run) -> None:
    files = _evaluation_files(run, "external", "External validation",
                              f"No external folder scored with this run's model yet: `{R.CMD_EXTERNAL}`.")
    for path in files:
        facts, table = R.external_table(path)
        st.markdown(f"**{facts.get('external')}** (layout `{facts.get('layout')}`, labels {facts.get('scheme')}, "
                    f"{facts.get('n_images')} usable images; near-duplicates of training images: "
                    f"{facts.get('n_training_twins')})")
        if facts.get("skipped"):
            st.caption(f"Left out: {facts['skipped']}")
        st.dataframe(table, hide_index=True, width="stretch")


# ---------------------------------------------------------------- Privacy


def privacy_page() -> None:
    ws = workspace()
    _sidebar(ws)
    st.title("Privacy")
    runs = [r for r in _runs(str(ws)) if r.kind == "federated"]
    if not runs:
        _no_runs(ws, (R.CMD_DP, "a federation with record-level DP (DP-SGD) at every site"),
                 (R.CMD_AUDIT, "the membership-inference audit of a run"))
        return
    run = _pick_run(runs, "privacy_run", prefer=("federated",))
    st.subheader("ε spent per site")
    curves = R.privacy_curves(metrics_of(run))
    if curves.empty:
        st.info(f"This run trained without differential privacy: `{R.CMD_DP}` adds DP-SGD at every site.")
    else:
        fig = px.line(curves, x="round", y="dp_epsilon", color="site", markers=len(curves) < 200,
                      title="privacy budget spent (ε at δ = "
                            f"{curves['dp_delta'].iloc[0] if 'dp_delta' in curves else '?'})",
                      labels={"dp_epsilon": "ε spent"})
        if "dp_epsilon_budget" in curves and curves["dp_epsilon_budget"].notna().any():
            fig.add_hline(y=float(curves["dp_epsilon_budget"].max()), line_dash="dot",
                          annotation_text="budget")
        _chart(fig, 340)
    _membership_section(run)
    _inversion_section(run)


def _membership_section(run: R.Run) -> None:
    audit = run_read("membership_audit", run)
    st.subheader("Membership-inference attack on the global model")
    if not audit:
        st.info(f"No audit of this run yet: `{R.CMD_AUDIT}` attacks its best global model and lists what left "
                "each site.")
        return
    st.dataframe(R.membership_table(audit), hide_index=True, width="stretch")
    roc = R.roc_frame(audit)
    if not roc.empty:
        fig = px.line(roc, x="fpr", y="tpr", color="site", range_x=[0, 1], range_y=[0, 1],
                      title="attack ROC (a loss attack: members = a site's training images, non-members = its "
                            "held-out images)", labels={"fpr": "false-positive rate", "tpr": "true-positive rate"})
        fig.add_shape(type="line", x0=0, y0=0, x1=1, y1=1, line={"dash": "dot", "color": "grey"})
        _chart(fig, 380)
    st.caption("AUROC 0.5: the attacker does no better than a coin; TPR at 1 % FPR: the members found while "
               "almost never wrong.")
    st.subheader("What travelled")
    st.dataframe(R.what_left_table(audit), hide_index=True, width="stretch")


def _inversion_section(run: R.Run) -> None:
    st.subheader("Gradient inversion of one round")
    audit = run_read("inversion_audit", run)
    table = R.inversion_table(audit)
    if table.empty:
        st.info(f"No inversion audit of this run yet: `{R.CMD_INVERSION}` rebuilds a site's images from what the "
                "server sees in one round and scores them beside a flat image and another slice.")
        return
    st.dataframe(table, hide_index=True, width="stretch")
    st.caption("A reconstruction leaks when it is closer to its original (SSIM and PSNR) than both no-information "
               "baselines: a flat image at the scan's mean brightness and another slice of the same site.")
    for key, png in R.inversion_pictures(run, audit):
        st.image(str(png), caption=f"{key}: originals (top) and reconstructions (bottom)")


# ---------------------------------------------------------------- Models


MODEL_COLUMNS = {  # bench_models.json key -> column label
    "model": "model", "mode": "mode", "budget": "budget", "weights": "init", "finetune": "fine-tune",
    "teacher": "distilled from", "macro_f1": "macro-F1", "accuracy": "accuracy", "tumour_auroc": "tumour AUROC",
    "params": "params",
    "macs": "MACs", "fp32_onnx_bytes": "fp32 ONNX bytes", "int8_onnx_bytes": "int8 ONNX bytes",
    "int8_macro_f1": "int8 macro-F1", "latency_ms_fp32_1t": "ms (1 thread)", "latency_ms_fp32_2t": "ms (2 threads)",
    "latency_ms_int8_1t": "int8 ms (1 thread)", "train_seconds": "train s", "error": "error",
}


def models_page() -> None:
    ws = workspace()
    _sidebar(ws)
    st.title("Models")
    p = workspace_bench_models(ws)
    stamp = _stamp(p, ws / "bench_models.csv")
    table = _bench_models(str(ws), stamp)
    if table.empty:
        st.info(f"No model benchmark in `{ws}` yet: `{R.CMD_BENCH_MODELS}` writes `bench_models.json` "
                "(macro-F1, latency and size per model).")
        return
    meta = _bench_models_meta(str(ws), stamp)
    st.caption("fedbrain's own models (fedbrain_cnn_v2, distilled or not; fedbrain_cnn) against the baselines on the "
               "union of the hospitals' leak-free test splits. "
               "Every row carries its training budget; compare rows of one budget. "
               + (f"Hardware: {meta['hardware']}." if meta.get("hardware") else ""))
    filters = [c for c in ("mode", "budget") if c in table and table[c].nunique() > 1]
    for col, box in zip(filters, st.columns(max(1, len(filters))), strict=False):
        with box:
            options = list(dict.fromkeys(table[col].dropna()))
            picked = st.multiselect(col.capitalize(), options, default=options, key=f"models_{col}")
        table = table[table[col].isin(picked)]
    failed = table[table["error"].notna() & (table["error"] != "")] if "error" in table else table.iloc[0:0]
    for _, r in failed.iterrows():
        st.warning(f"{r.get('model')} / {r.get('mode')} failed: {r['error']}")
    x = R.first_column(table, "latency_ms_fp32_1t", "latency_ms_p50_1t", "latency_ms")
    y = R.first_column(table, "macro_f1", "accuracy")
    size = R.first_column(table, "fp32_onnx_bytes", "file_bytes", "params")
    name = R.first_column(table, "model", "name", "variant")
    if x and y:
        data = table.dropna(subset=[x, y]).copy()
        symbol = "mode" if "mode" in data and data["mode"].nunique() > 1 else None
        hover = [c for c in ("budget", "weights", "finetune", "teacher", "params", size) if c in data]
        marker = None
        if size:  # sizes span 1000x (0.6 MB to 0.5 GB): a log scale keeps the small models visible
            values = pd.to_numeric(data[size], errors="coerce")
            data["marker"] = np.log10(values.clip(lower=1.0) / values.min()) + 1.0 if values.min() > 0 else 1.0
            marker = "marker"
        _chart(px.scatter(data, x=x, y=y, size=marker, color=name, symbol=symbol, hover_data=hover, size_max=30,
                          log_x=bool((data[x] > 0).all()),
                          title=f"{y} vs CPU latency {x} (marker area grows with log {size or 'n/a'}; "
                                "left and up is better)"))
    shown = table[[c for c in MODEL_COLUMNS if c in table]].rename(columns=MODEL_COLUMNS)
    st.dataframe(shown, hide_index=True, width="stretch")
    goal = R.bench_goal_rows(meta)
    if not goal.empty:
        st.subheader("Goal: fedbrain's best own model within 2 pp of the best baseline, >= 10x fewer params, "
                     ">= 10x lower latency (fp32 and int8), its int8 >= 2x faster than its fp32")
        st.dataframe(goal, hide_index=True, width="stretch")
    per_class = [c for c in table.columns if c.endswith(("_precision", "_recall"))]
    if per_class and name:
        with st.expander("Per-class precision and recall"):
            st.dataframe(table[[name, "mode", *per_class]] if "mode" in table else table[[name, *per_class]],
                         hide_index=True, width="stretch")
    if meta.get("commands"):
        with st.expander("Commands that made this table"):
            st.code("\n".join(meta["commands"]), language="bash")
