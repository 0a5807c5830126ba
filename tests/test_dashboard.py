"""Dashboard: readers, Grad-CAM, the CLI, and every page through ``streamlit.testing.v1.AppTest``.

Pages run over the small real run of the ``small_run`` fixture (``fedbrain train`` on the embedded
Br35H set); the federated parts (global rounds, cross-site heatmap, compare) also run over a sample in
the documented schema (``workspace/README.md``) until the simulator fixture lands.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import shutil
import struct
import tempfile
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from streamlit.testing.v1 import AppTest
from torch import nn

from fedbrain.dashboard import MAX_UPLOAD_MB
from fedbrain.dashboard import readers as R
from fedbrain.dashboard.gradcam import gradcam, last_conv, overlay

APP = Path(__file__).resolve().parents[1] / "dashboard" / "app.py"
TIMEOUT = 60


def page_app(page: str) -> AppTest:
    script = f"from fedbrain.dashboard.views import {page}\n{page}()"
    return AppTest.from_string(script, default_timeout=TIMEOUT)


def texts(at: AppTest, kind: str) -> str:
    return "\n".join(str(e.value) for e in getattr(at, kind))


def charts(at: AppTest) -> list[str]:
    return [e.proto.spec for e in at.get("plotly_chart")]


def shown_text(at: AppTest) -> str:
    """Everything the page displays: texts, alerts, metrics, image captions and chart specs."""
    parts = [texts(at, k) for k in ("title", "subheader", "markdown", "caption", "info", "warning", "error")]
    parts += [f"{m.label} {m.value}" for m in at.metric]
    parts += [c for img in at.image for c in img.captions] + charts(at)
    return "\n".join(parts)


def assert_ok(at: AppTest) -> None:
    assert not at.exception, [e.value for e in at.exception]


@pytest.fixture
def use_ws(monkeypatch):
    def use(ws: Path) -> Path:
        monkeypatch.setenv("FEDBRAIN_WORKSPACE", str(ws))
        return ws

    return use


# ---------------------------------------------------------------- sample images (all in memory)


def png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG")
    return buf.getvalue()


def slice_u8(n: int = 96, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:n, :n]
    head = ((yy - n / 2) ** 2 + (xx - n / 2) ** 2 < (n * 0.4) ** 2) * 140.0
    return np.clip(head + rng.normal(0, 20, (n, n)), 0, 255).astype(np.uint8)


def png_header_only(w: int, h: int) -> bytes:
    """A tiny PNG that declares ``w x h`` pixels (a decompression bomb's header)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 1, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b""))


def apng_two_frames() -> bytes:
    buf = io.BytesIO()
    a, b = Image.fromarray(slice_u8(seed=1)), Image.fromarray(slice_u8(seed=2))
    a.save(buf, "PNG", save_all=True, append_images=[b])
    return buf.getvalue()


def cmyk_jpeg() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.stack([slice_u8()] * 3, -1)).convert("CMYK").save(buf, "JPEG")
    return buf.getvalue()


def dicom(pixels: np.ndarray | None, frames: int = 1) -> bytes:
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = MRImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID, ds.Modality = MRImageStorage, meta.MediaStorageSOPInstanceUID, "MR"
    if pixels is not None:
        ds.Rows, ds.Columns = pixels.shape[-2:]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.WindowCenter, ds.WindowWidth = 1200, 2000
        if frames > 1:
            ds.NumberOfFrames = frames
        ds.PixelData = pixels.astype("<u2").tobytes()
    buf = io.BytesIO()
    try:
        ds.save_as(buf, enforce_file_format=True)
    except TypeError:  # pydicom 2
        ds.preamble = b"\0" * 128
        ds.is_little_endian, ds.is_implicit_VR = True, False
        ds.save_as(buf, write_like_original=False)
    return buf.getvalue()


def br35h_slice() -> bytes:
    """A real tumour slice of the embedded Br35H set (bytes only: it is uploaded from memory)."""
    from fedbrain.data.readers import embedded_br35h_root

    return (embedded_br35h_root() / "yes" / "y1.jpg").read_bytes()


# ---------------------------------------------------------------- readers


def test_list_runs_tolerates_missing_and_corrupt(tmp_path):
    assert R.list_runs(tmp_path / "nope") == []
    (tmp_path / "not-a-run").mkdir()
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text("{not json")
    (tmp_path / "ok").mkdir()
    (tmp_path / "ok" / "config.json").write_text(json.dumps({"kind": "federated"}))
    runs = {r.name: r.kind for r in R.list_runs(tmp_path)}
    assert runs == {"broken": "unknown", "ok": "federated"}
    broken = R.Run(tmp_path / "broken", "unknown")
    for reader in (R.final_results, R.cross_site, R.source_summary):
        assert not reader(broken)
    for reader in (R.data_summary, R.class_counts, R.compare_rows, R.compression_report):
        assert reader(broken).empty
    assert R.read_metrics(tmp_path / "broken" / "metrics.jsonl").empty
    assert R.bench_models(tmp_path).empty


def test_read_metrics_skips_a_half_written_line(tmp_path):
    p = tmp_path / "metrics.jsonl"
    p.write_text('{"round": 1, "site": "global", "split": "val", "macro_f1": 0.5}\n{"round": 2, "si')
    df = R.read_metrics(p)
    assert len(df) == 1 and df["macro_f1"].iloc[0] == 0.5


def test_readers_on_the_real_run(small_run):
    run = R.list_runs(small_run.parent)[0]
    assert run.path == small_run and run.kind == "centralized"
    df = R.read_metrics(small_run / "metrics.jsonl")
    curves, what = R.global_curves(df)
    assert not curves.empty and what.startswith("pooled training set")
    sites = R.site_curves(df)
    assert set(sites["site"]) == {"hospital-1", "hospital-2", "hospital-3"}
    summary = R.data_summary(run)
    assert list(summary["site"]) == ["hospital-1", "hospital-2", "hospital-3"]
    assert {"files", "distinct pictures", "train", "val", "test"} <= set(summary.columns)
    table = R.comparison_from_runs([run])
    assert set(table["mode"]) == {"centralized"} and "union" in set(table["site"])
    assert "best.pt (torch)" in R.model_files(run)


def test_the_global_curve_is_the_servers_pooled_score_not_a_mean_of_site_scores():
    """One small site scoring 0.9 and one large at 0.1: the curve shows the server's pooled score of their summed
    counts (its best-model criterion), not a mean of the two sites' scores."""
    rows = [{"round": 0, "site": "small", "split": "val", "macro_f1": 0.9, "n": 10},
            {"round": 0, "site": "large", "split": "val", "macro_f1": 0.1, "n": 90},
            {"round": 0, "site": "global", "split": "val", "macro_f1": 0.27, "score": 0.27, "n": 100, "pooled": True},
            {"round": 0, "site": "union", "split": "test", "macro_f1": 0.3, "checkpoint": "best"}]
    curves, what = R.global_curves(pd.DataFrame(rows))
    assert list(curves["macro_f1"]) == [0.27] and "pooled validation" in what
    assert "score" not in R.metric_columns(curves) and "pooled" not in R.metric_columns(curves)
    legacy = pd.DataFrame([{**rows[2], "pooled": None, "macro_f1": 0.18}])  # a run from before the server's rows
    assert R.global_curves(legacy)[1] == "global model (size-weighted mean of the sites' scores)"


def test_compression_ratios_are_filled_from_the_fp32_row(tmp_path):
    (tmp_path / "compression").mkdir()
    rows = [{"variant": "fp32", "file_bytes": 1000, "macs": 100, "latency_ms_p50_1t": 4.0, "macro_f1": 0.9},
            {"variant": "int8", "file_bytes": 250, "macs": 100, "latency_ms_p50_1t": 2.0, "macro_f1": 0.88}]
    pd.DataFrame(rows).to_csv(tmp_path / "compression" / "report.csv", index=False)
    df = R.compression_report(tmp_path)  # the CSV twin when report.json is missing
    int8 = df[df["variant"] == "int8"].iloc[0]
    assert int8["size_ratio"] == 0.25 and int8["latency_ratio_1t"] == 0.5 and int8["macs_ratio"] == 1.0
    assert int8["macro_f1_delta"] == pytest.approx(-0.02)


def test_cross_site_grid_marks_missing_cells(tmp_path):
    cs = {"models": ["global", "site-a"], "sites": ["a", "b"],
          "matrix": {"global": {"a": {"macro_f1": 0.8}, "b": {"macro_f1": float("nan")}},
                     "site-a": {"a": {"macro_f1": 0.9}}}}
    (tmp_path / "cross_site.json").write_text(json.dumps(cs))
    models, sites, grid = R.cross_site_grid(R.cross_site(R.Run(tmp_path, "federated")), "macro_f1")
    assert models == ["global", "site-a"] and sites == ["a", "b"]
    assert grid == [[0.8, None], [0.9, None]]


def test_cross_site_reads_the_simulator_naming(tmp_path):
    cell = {"test_n": 31, "test_tumour_auroc": 0.8, "test_macro_f1": 0.7, "val_score": 0.8}
    models = ["hospital-1", "SRV_FL_global_model.pt", "SRV_best_FL_global_model.pt"]  # NVFlare's names
    cs = {"models": models, "sites": ["hospital-1"], "matrix": {m: {"hospital-1": cell} for m in models}}
    (tmp_path / "cross_site.json").write_text(json.dumps(cs))
    parsed = R.cross_site(R.Run(tmp_path, "federated"))
    assert parsed["models"] == ["global (last)", "global (best)", "hospital-1"]
    assert R.cross_site_metrics(parsed) == ["macro_f1", "tumour_auroc", "val_score"]
    assert R.cross_site_grid(parsed, "tumour_auroc")[2] == [[0.8], [0.8], [0.8]]


# ---------------------------------------------------------------- Grad-CAM


class _Spot(nn.Module):
    """Conv -> in-place ReLU -> pool -> linear: the score is the mean activation (Grad-CAM = the input)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 1)
        self.act = nn.ReLU(inplace=True)
        self.fc = nn.Linear(2, 2)
        with torch.no_grad():
            self.conv.weight.fill_(1.0)
            self.conv.bias.zero_()
            self.fc.weight.copy_(torch.tensor([[1.0, 1.0], [-1.0, -1.0]]))
            self.fc.bias.zero_()

    def forward(self, x):
        return self.fc(self.act(self.conv(x)).mean(dim=(2, 3)))


def test_gradcam_localises_the_evidence():
    model = _Spot().eval()
    x = torch.zeros(1, 1, 16, 16)
    x[0, 0, 2:6, 2:6] = 1.0
    cam = gradcam(model, x, 0)
    assert cam.shape == (16, 16) and cam.dtype == np.float32
    assert 0.0 <= cam.min() and cam.max() == pytest.approx(1.0)
    assert cam[2:6, 2:6].mean() > 0.9 and cam[10:, 10:].max() < 0.1
    assert not gradcam(model, x, 1).any()  # class 1 is evidence against: ReLU leaves nothing
    assert not model.conv._forward_hooks and all(p.grad is None for p in model.parameters())


def test_gradcam_on_the_real_checkpoint(small_run):
    from fedbrain.checkpoint import load_checkpoint
    from fedbrain.contract import TUMOUR_CLASSES

    model, card = load_checkpoint(small_run / "checkpoints" / "best.pt")
    size = card.preprocessing.image_size
    x = torch.randn(1, card.preprocessing.channels, size, size)
    layer = last_conv(model, x)
    assert isinstance(layer, nn.Conv2d)
    cam = gradcam(model, x, list(TUMOUR_CLASSES))
    assert cam.shape == (size, size) and np.isfinite(cam).all() and 0 <= cam.min() <= cam.max() <= 1
    assert not layer._forward_hooks and not model.training


def test_overlay_keeps_cold_regions_and_colours_hot_ones():
    gray = slice_u8(40)
    assert (overlay(gray, np.zeros((8, 8))) == np.repeat(gray[..., None], 3, -1)).all()
    hot = overlay(gray, np.ones((8, 8)))
    assert hot.shape == (40, 40, 3) and hot.dtype == np.uint8
    assert (hot != np.repeat(gray[..., None], 3, -1)).any()
    with pytest.raises(ValueError):
        overlay(np.zeros((4, 4, 3), np.uint8), np.zeros((4, 4)))


# ---------------------------------------------------------------- CLI


def test_dashboard_command_binds_loopback_headless_without_telemetry(capsys, tmp_path):
    from fedbrain.cli.main import main

    assert main(["dashboard", "--workspace", str(tmp_path), "--port", "9123", "--print-command"]) == 0
    out = capsys.readouterr().out
    for flag in ("--server.address 127.0.0.1", "--server.port 9123", "--server.headless true",
                 "--browser.gatherUsageStats false", f"--server.maxUploadSize {MAX_UPLOAD_MB}"):
        assert flag in out
    assert str(tmp_path) in out and "app.py" in out


# ---------------------------------------------------------------- pages: empty state


@pytest.mark.parametrize("page, commands", [
    ("federation_page", ["fedbrain simulate", "fedbrain train", "fedbrain compare"]),
    ("compression_page", ["fedbrain compress"]),
    ("predict_page", ["fedbrain simulate", "fedbrain train"]),
    ("models_page", ["fedbrain bench models"]),
])
def test_empty_workspace_says_which_command_creates_what(page, commands, tmp_path, use_ws):
    use_ws(tmp_path / "missing")
    at = page_app(page).run()
    assert_ok(at)
    info = texts(at, "info")
    assert all(c in info for c in commands), info
    if page == "predict_page":
        assert "Research use only" in texts(at, "warning")


def test_router_runs_the_default_page(workspace_dir, use_ws):
    use_ws(workspace_dir)
    at = AppTest.from_file(str(APP), default_timeout=TIMEOUT).run()
    assert_ok(at)
    assert [t.value for t in at.title] == ["Federation"]


# ---------------------------------------------------------------- Federation


def test_federation_page_over_the_real_run(workspace_dir, small_run, use_ws):
    use_ws(workspace_dir)
    at = page_app("federation_page").run()
    assert_ok(at)
    assert [s.value for s in at.subheader] == [
        "Training curve per epoch", "Per-site curves", "Best model on each site's test split and their union",
        "Federated vs centralised vs local-only", "Cross-site evaluation", "Per-hospital data", "Run config"]
    tests = at.dataframe[0].value  # every headline with its 95 % interval, small-n metrics flagged
    assert "union" in list(tests["site"]) and "[" in str(tests["tumour AUROC"].iloc[0])
    flagged = tests[tests["unreliable"].astype(str) != ""]
    assert all("⚠" in " ".join(map(str, row)) for row in flagged.values), flagged.to_dict("records")
    info = texts(at, "info")
    assert "cross_site.json" in info and "fedbrain simulate" in info  # a centralised run has none
    assert "fedbrain simulate" in texts(at, "caption")  # missing modes say how to add them
    assert len(charts(at)) >= 4  # global curve, per-site bars, comparison bars, label counts
    summary = at.dataframe[2].value
    assert list(summary["site"]) == ["hospital-1", "hospital-2", "hospital-3"]
    at.selectbox(key="fed_metric").set_value("tumour_auroc").run()
    assert_ok(at)


def _federated_sample(ws: Path, small_run: Path) -> Path:
    """A federated run and a compare run in the documented schema (until the simulator fixture exists)."""
    run = ws / "federated-fedavg-sample"
    run.mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({"kind": "federated", "algorithm": "fedavg"}))
    (run / "data_summary.json").write_text((small_run / "data_summary.json").read_text())
    rows = []
    for r in range(1, 4):
        for split in ("val", "test"):
            rows.append({"round": r, "site": "global", "split": split, "macro_f1": 0.5 + r / 10,
                         "loss": 1 / r, "pooled": True, "score": 0.5 + r / 10})
        for s in ("hospital-1", "hospital-2"):
            rows.append({"round": r, "site": s, "split": "train", "loss": 1.2 / r, "samples": 30})
            rows.append({"round": r, "site": s, "split": "val", "macro_f1": 0.4 + r / 10})
    (run / "metrics.jsonl").write_text("\n".join(json.dumps(x) for x in rows) + "\n")
    matrix = {m: {s: {"macro_f1": 0.6, "accuracy": 0.7} for s in ("hospital-1", "hospital-2")}
              for m in ("global", "hospital-1", "hospital-2")}
    (run / "cross_site.json").write_text(json.dumps(
        {"models": list(matrix), "sites": ["hospital-1", "hospital-2"], "matrix": matrix}))
    cmp_run = ws / "compare-sample"
    cmp_run.mkdir()
    (cmp_run / "config.json").write_text(json.dumps({"kind": "compare"}))
    (cmp_run / "compare.json").write_text(json.dumps([
        {"mode": m, "site": s, "macro_f1": 0.7, "accuracy": 0.8, "tumour_auroc": 0.9, "budget": 3}
        for m in ("federated", "centralized", "local") for s in ("hospital-1", "union")]))
    os.utime(cmp_run / "config.json", (1, 1))  # oldest: the federated run is picked first
    return run


def test_federation_page_federated_schema(tmp_path, small_run, use_ws):
    ws = use_ws(tmp_path / "ws")
    _federated_sample(ws, small_run)
    at = page_app("federation_page").run()
    assert_ok(at)
    assert at.selectbox(key="fed_run").value == "federated-fedavg-sample"
    specs = charts(at)
    assert any('"heatmap"' in s for s in specs), "cross-site heatmap missing"
    assert "global model (pooled validation of all sites" in specs[0]  # the server's selection score
    assert "compare.json" in texts(at, "caption")
    assert "No per-round" not in texts(at, "info") and "cross_site.json" not in texts(at, "info")
    at.selectbox(key="fed_run").set_value("compare-sample").run()  # a compare run: the rest degrades
    assert_ok(at)
    assert "fedbrain simulate" in texts(at, "info")


@pytest.mark.slow
def test_federation_page_over_the_real_simulator_run(sim_run, use_ws):
    """The page over the run made by the real NVFlare simulator fixture (``sim_run``)."""
    use_ws(sim_run.parent)
    at = page_app("federation_page").run()
    assert_ok(at)
    assert at.selectbox(key="fed_run").value == sim_run.name
    specs = charts(at)
    assert any('"heatmap"' in s for s in specs), "cross-site heatmap missing"
    assert "cross_site.json" not in texts(at, "info")  # the simulator wrote it
    summary = at.dataframe[2].value
    assert list(summary["site"]) == ["hospital-1", "hospital-2", "hospital-3"]


# ---------------------------------------------------------------- Compression


SAMPLE_REPORT = [
    {"variant": v, "params": p, "macs": m, "file_bytes": b, "accuracy": 0.9, "macro_f1": f,
     "tumour_auroc": 0.95, "latency_ms_p50_1t": lat, "latency_ms_p95_1t": lat * 1.2,
     "latency_ms_p50_2t": lat * 0.6, "latency_ms_p95_2t": lat * 0.7}
    for v, p, m, b, f, lat in (("fp32", 400_000, 30e6, 1_600_000, 0.90, 5.0),
                               ("int8", 400_000, 30e6, 420_000, 0.89, 3.0),
                               ("pruned", 200_000, 15e6, 800_000, 0.88, 3.2),
                               ("pruned_int8", 200_000, 15e6, 220_000, 0.87, 2.1))
]


def test_compression_page_without_a_report_gives_the_command(tmp_path, use_ws):
    ws = use_ws(tmp_path / "ws")
    (ws / "run-a" / "checkpoints").mkdir(parents=True)
    (ws / "run-a" / "config.json").write_text(json.dumps({"kind": "centralized"}))
    (ws / "run-a" / "checkpoints" / "best.pt").write_bytes(b"stub")
    at = page_app("compression_page").run()
    assert_ok(at)
    assert f"fedbrain compress {ws / 'run-a' / 'checkpoints' / 'best.pt'}" in texts(at, "info")


def test_compression_page_documented_schema(tmp_path, use_ws):
    ws = use_ws(tmp_path / "ws")
    (ws / "run-a" / "compression").mkdir(parents=True)
    (ws / "run-a" / "config.json").write_text(json.dumps({"kind": "federated"}))
    (ws / "run-a" / "compression" / "report.json").write_text(json.dumps(SAMPLE_REPORT))
    at = page_app("compression_page").run()
    assert_ok(at)
    assert [s.value for s in at.subheader] == ["Size vs macro-F1 vs latency", "Report", "Ratios vs fp32"]
    assert len(at.dataframe[0].value) == 4
    ratios = at.dataframe[1].value.set_index("variant")
    assert ratios.loc["int8", "size_ratio"] == pytest.approx(420_000 / 1_600_000)
    assert len(charts(at)) == 2


def test_compression_page_over_the_real_report(workspace_dir, small_run_compression, use_ws):
    use_ws(workspace_dir)
    at = page_app("compression_page").run()
    assert_ok(at)
    assert not at.error
    report = at.dataframe[0].value
    assert "fp32" in set(report["variant"]) and len(charts(at)) == 2


# ---------------------------------------------------------------- Predict


def _multiclass_workspace(ws: Path) -> Path:
    from fedbrain.checkpoint import ModelCard, save_checkpoint
    from fedbrain.models import create_model, default_preprocessing

    run = ws / "centralized-multiclass"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({"kind": "centralized"}))
    torch.manual_seed(0)
    save_checkpoint(run / "checkpoints" / "best.pt", create_model("fedbrain_cnn", pretrained=False),
                    ModelCard("fedbrain_cnn", default_preprocessing("fedbrain_cnn"), "multiclass"))
    return run


def _predict(at: AppTest, name: str, data: bytes, mime: str = "image/png") -> AppTest:
    at.file_uploader(key="scan").set_value((name, data, mime)).run()
    assert_ok(at)
    return at


def test_predict_page_binary_model_shows_tumour_vs_no_tumour(workspace_dir, small_run, use_ws):
    use_ws(workspace_dir)
    at = page_app("predict_page").run()
    assert_ok(at)
    assert "Research use only" in texts(at, "warning")
    assert "never saw tumour-type labels" in texts(at, "info")
    _predict(at, "slice.jpg", br35h_slice(), "image/jpeg")
    assert not at.error
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["Prediction"] in ("Tumour", "No tumour")
    assert metrics["Tumour probability"].endswith("%") and metrics["Latency"].endswith("ms")
    spec = charts(at)[-1]
    assert "No tumour" in spec and "Glioma" not in spec and "Meningioma" not in spec
    captions = [c for img in at.image for c in img.captions]
    assert any(c.startswith("Grad-CAM") for c in captions), captions


def test_predict_page_multiclass_model_shows_four_classes(tmp_path, use_ws):
    ws = use_ws(tmp_path / "ws")
    _multiclass_workspace(ws)
    at = page_app("predict_page").run()
    assert "never saw" not in texts(at, "info")
    _predict(at, "slice.png", png(slice_u8(128)))
    spec = charts(at)[-1]
    assert all(c in spec for c in ("Glioma", "Meningioma", "Pituitary", "No tumour"))
    assert "Tumour vs no tumour:" in texts(at, "caption")
    assert any(c.startswith("Grad-CAM") for img in at.image for c in img.captions)


BAD_UPLOADS = [
    ("empty.png", b"", "file is empty"),
    ("truncated.jpg", None, "truncated or corrupt"),
    ("notes.jpg", b"%PDF-1.4 this is a PDF renamed to .jpg\n" * 20, "not a JPEG, PNG or DICOM image"),
    ("bomb.png", png_header_only(30_000, 30_000), "too many pixels"),
    ("huge.png", png_header_only(9_000, 9_000), "too many pixels"),
    ("big.png", b"\x89PNG\r\n\x1a\n" + b"\0" * (MAX_UPLOAD_MB * 1024 * 1024 + 1),
     f"larger than {MAX_UPLOAD_MB} MB"),
    ("cine.png", None, "several frames"),
    ("cine.dcm", None, "several frames"),
    ("report.dcm", None, "no pixel data"),
]


def test_predict_page_bad_uploads_give_a_clear_message_and_the_app_keeps_working(workspace_dir, use_ws):
    use_ws(workspace_dir)
    made = {"truncated.jpg": br35h_slice()[:1500], "cine.png": apng_two_frames(),
            "cine.dcm": dicom(np.full((2, 32, 32), 900) + np.arange(32), frames=2), "report.dcm": dicom(None)}
    at = page_app("predict_page").run()
    for name, data, expected in BAD_UPLOADS:
        _predict(at, name, made.get(name, data))
        errors = texts(at, "error")
        assert expected in errors, (name, errors)
        assert errors.startswith("This file cannot be used") and not at.metric, name
    _predict(at, "fine.png", png(slice_u8()))
    assert not at.error and {m.label for m in at.metric} == {"Prediction", "Tumour probability", "Latency"}


@pytest.mark.parametrize("name, data, note", [
    ("rgba.png", png(np.dstack([slice_u8()] * 3 + [np.full((96, 96), 200, np.uint8)])), "transparency"),
    ("deep.png", png(slice_u8().astype(np.uint16) * 200), "16-bit"),
    ("cmyk.jpg", cmyk_jpeg(), "CMYK"),
    ("mr.dcm", dicom(np.clip(slice_u8(64).astype(np.uint16) * 12, 0, 4095)), "DICOM pixel data windowed"),
])
def test_predict_page_converts_unusual_formats_and_says_so(name, data, note, workspace_dir, use_ws):
    use_ws(workspace_dir)
    at = _predict(page_app("predict_page").run(), name, data)
    assert not at.error, texts(at, "error")
    assert note in texts(at, "info")
    assert {m.label for m in at.metric} == {"Prediction", "Tumour probability", "Latency"}


def _tree(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in root.rglob("*") if p.is_file()}


def test_uploads_are_never_written_to_disk_or_logged(workspace_dir, tmp_path, monkeypatch, caplog, capfd,
                                                     use_ws):
    use_ws(workspace_dir)
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))  # where any temp file would land
    monkeypatch.setenv("TMPDIR", str(scratch))
    monkeypatch.chdir(tmp_path)
    caplog.set_level(logging.DEBUG)
    before = _tree(workspace_dir)
    at = page_app("predict_page").run()  # loads the model before the upload
    name = "patient-7f3c9e-DOE-JANE.png"
    _predict(at, name, png(slice_u8(128, seed=7)))
    assert {m.label for m in at.metric} == {"Prediction", "Tumour probability", "Latency"}
    _predict(at, name.replace(".png", ".jpg"), b"not an image at all")  # the error path too
    assert at.error
    assert _tree(workspace_dir) == before, "the workspace changed"
    assert not any(scratch.iterdir()), list(scratch.iterdir())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tmp"]
    out, err = capfd.readouterr()
    logged = caplog.text + out + err
    assert "patient-7f3c9e" not in logged
    assert "patient-7f3c9e" not in shown_text(at)  # not echoed on the page either


def test_predict_page_onnx_variant_has_no_gradcam(workspace_dir, small_run_compression, use_ws):
    onnx = sorted(small_run_compression.glob("*.onnx"))
    if not onnx:
        pytest.skip("the compression report has no ONNX variant")
    use_ws(workspace_dir)
    at = page_app("predict_page").run()
    at.selectbox(key="pred_variant").set_value(f"{onnx[0].stem}.onnx (ONNX Runtime)").run()
    _predict(at, "slice.jpg", br35h_slice(), "image/jpeg")
    assert not at.error and "Grad-CAM is shown for torch variants" in texts(at, "caption")
    assert {m.label for m in at.metric} == {"Prediction", "Tumour probability", "Latency"}


# ---------------------------------------------------------------- Models (placeholder for bench models)


def test_models_page_reads_bench_models(tmp_path, use_ws):
    ws = use_ws(tmp_path / "ws")
    ws.mkdir()
    (ws / "bench_models.json").write_text(json.dumps([
        {"model": "fedbrain_cnn", "params": 300_000, "macro_f1": 0.9, "latency_ms_p50_1t": 3.0},
        {"model": "resnet18", "params": 11_000_000, "macro_f1": 0.93, "latency_ms_p50_1t": 40.0}]))
    at = page_app("models_page").run()
    assert_ok(at)
    assert len(at.dataframe[0].value) == 2 and len(charts(at)) == 1


def test_federation_page_with_an_empty_cross_site_file(tmp_path, small_run, use_ws):
    ws = use_ws(tmp_path / "ws")
    run = _federated_sample(ws, small_run)
    (run / "cross_site.json").write_text(json.dumps({"models": [], "sites": [], "matrix": {}}))
    at = page_app("federation_page").run()
    assert_ok(at)
    assert "holds no evaluations" in texts(at, "info")


# ---------------------------------------------------------------- Evaluation (issue 14)


@pytest.mark.slow  # a real `fedbrain evaluate --robustness`: 36 shifted copies of the test split
def test_evaluation_page_shows_calibration_robustness_and_external_results(small_run, tmp_path, use_ws):
    ws = tmp_path / "ws"
    run = ws / small_run.name
    shutil.copytree(small_run, run, ignore=shutil.ignore_patterns("compression"))
    use_ws(ws)
    at = page_app("evaluation_page").run()
    assert_ok(at)
    assert [s.value for s in at.subheader] == ["Calibration: does “92 % tumour” mean 92 %?",
                                               "Robustness to acquisition shifts", "External validation"]
    labels = {m.label for m in at.metric}
    assert "Tumour ECE" in labels  # a pooled run fits its calibration on validation data, and says which
    card_params = json.loads((run / "results.json").read_text())["test"]["union"]["calibration"]
    assert ("Tumour log-odds slope" if card_params else "Calibration") in labels
    info = texts(at, "info")
    assert "--robustness" in info and "--external" in info  # what is missing says how to make it
    from fedbrain.cli.main import main

    assert main(["evaluate", str(run), "--robustness"]) == 0
    yes, no = tmp_path / "ext" / "yes", tmp_path / "ext" / "no"
    yes.mkdir(parents=True), no.mkdir(parents=True)
    rows = list(csv.DictReader((run / "splits" / "hospital-1.csv").open()))
    for r in rows[:12]:
        shutil.copy(r["path"], (no if r["label"] == "no_tumor" else yes) / Path(r["path"]).name)
    assert main(["evaluate", str(run), "--external", str(tmp_path / "ext"), "--layout", "yesno"]) == 0
    at = page_app("evaluation_page").run()
    assert_ok(at)
    assert len(charts(at)) >= 2  # reliability diagram(s) and the robustness curves
    assert "Worst tumour auroc drop at moderate strength" in texts(at, "caption")
    assert "near-duplicates of training images" in texts(at, "markdown")
    assert len(at.dataframe) == 2
