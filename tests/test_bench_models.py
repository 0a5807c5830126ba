"""``fedbrain bench models`` on a tiny budget: a complete, well-formed table whose numbers come from the run."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from fedbrain.cli.main import main
from fedbrain.experiments import bench_models as bm
from fedbrain.models import apply_finetune, count_macs, count_parameters, create_model, default_preprocessing

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
needs_data = pytest.mark.skipif(not (DATA / "MANIFEST.csv").is_file(),
                                reason=f"real benchmark data not found at {DATA} (../shared/data beside the checkout)")
MODELS = ["fedbrain_cnn", "efficientnet_lite0"]  # random init vs offline ImageNet weights + partial fine-tuning


@pytest.fixture(scope="module")
def bench(tmp_path_factory) -> tuple[Path, Path]:
    """One real tiny benchmark: 2 models x (federated in the NVFlare simulator, centralised), 1 round."""
    if not (DATA / "MANIFEST.csv").is_file():
        pytest.skip(f"real benchmark data not found at {DATA}")
    ws = tmp_path_factory.mktemp("bench_ws")
    rc = main(["bench", "models", "--data-root", str(DATA), "--set", "data.max_images_per_site=40", "--models", *MODELS,
               "--rounds", "1", "--image-size", "64", "--finetune", "last-1", "--latency-repeats", "3",
               "--workspace", str(ws)])
    assert rc == 0
    run = next(ws.glob("bench-models-*"))
    return ws, run


@pytest.mark.slow
@needs_data
def test_table_is_complete_and_from_the_run(bench):
    ws, run = bench
    doc = json.loads((ws / "bench_models.json").read_text())
    assert doc["format"] == bm.FORMAT and doc["hardware"]
    assert [r["command"] for r in doc["rows"]] == doc["commands"] * len(doc["rows"])
    assert doc["commands"][0].startswith("fedbrain bench models --data-root")
    rows = doc["rows"]
    assert [(r["model"], r["mode"]) for r in rows] == [(m, mode) for m in MODELS for mode in bm.MODES]
    for r in rows:
        assert not r.get("error"), r["error"]
        assert {f for f in bm.FIELDS if not f.endswith("error")} <= set(r), set(bm.FIELDS) - set(r)
        assert r["budget"] == "64px, 1x1 ep" and r["image_size"] == 64 and r["epochs"] == 1
        # the metrics are those the run's own evaluation wrote
        res = json.loads((run / r["model"] / r["mode"] / "results.json").read_text())["test"]["union"]
        assert r["macro_f1"] == pytest.approx(res["macro_f1"]) and r["accuracy"] == pytest.approx(res["accuracy"])
        assert r["n_test"] == res["n"] > 0
        assert 0 <= r["macro_f1"] <= 1 and 0 <= r["tumour_auroc"] <= 1
        assert all(0 <= r[f"{c}_recall"] <= 1 for c in ("glioma", "meningioma", "pituitary", "no_tumor"))
        # the profile is measured on this model
        model = create_model(r["model"], pretrained=False)
        assert r["params"] == count_parameters(model)
        assert r["macs"] == count_macs(model, default_preprocessing(r["model"], 64))
        onnx = run / r["model"] / "onnx"
        assert r["fp32_onnx_bytes"] == (onnx / "fp32.onnx").stat().st_size
        assert r["int8_onnx_bytes"] == (onnx / "int8.onnx").stat().st_size < r["fp32_onnx_bytes"]
        assert all(np.isfinite(r[k]) and r[k] > 0 for k in bm.PROFILE if k.startswith("latency"))
    cnn, lite = rows[0], rows[2]
    assert (cnn["weights"], cnn["finetune"], cnn["trainable_params"]) == ("random", "all", cnn["params"])
    assert (lite["weights"], lite["finetune"]) == ("imagenet", "last-1") and lite["trainable_params"] < lite["params"]
    with (ws / "bench_models.csv").open(newline="") as fh:
        table = list(csv.DictReader(fh))
    assert len(table) == len(rows) and list(table[0]) == list(bm.FIELDS)
    assert {g["mode"] for g in doc["goal"]} == set(bm.MODES)
    assert all(g["best_baseline"] == "efficientnet_lite0" and g["params_ratio"] > 10 for g in doc["goal"])


@pytest.mark.slow
@needs_data
def test_federated_baseline_starts_from_imagenet_and_keeps_frozen_blocks(bench):
    """The server's initial model holds the ImageNet weights and FedAvg leaves the frozen blocks as they were."""
    from fedbrain.checkpoint import load_checkpoint

    _, run = bench
    trained, _ = load_checkpoint(run / "efficientnet_lite0" / "federated" / "checkpoints" / "last.pt")
    imagenet = create_model("efficientnet_lite0", pretrained=True)
    stem = "_conv_stem.weight"
    got, ref = trained.state_dict(), imagenet.state_dict()
    assert torch.allclose(got[stem], ref[stem], atol=1e-6)  # frozen: first block
    assert torch.allclose(got["_bn0.running_mean"], ref["_bn0.running_mean"], atol=1e-6)  # frozen BN statistics
    assert not torch.allclose(got["_conv_head.weight"], ref["_conv_head.weight"])  # last block trained


def test_apply_finetune_freezes_all_but_the_last_blocks():
    model = create_model("fedbrain_cnn")
    info = apply_finetune(model, "fedbrain_cnn", "last-1")
    assert 0 < info["trainable_params"] < info["params"] == count_parameters(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model.train()
    loss = model(torch.randn(8, 1, 64, 64)).sum()
    loss.backward()
    opt.step()
    after = model.state_dict()
    assert torch.equal(before["features.0.0.weight"], after["features.0.0.weight"])
    assert torch.equal(before["features.0.1.running_mean"], after["features.0.1.running_mean"])  # BN stays frozen
    assert not torch.equal(before["classifier.weight"], after["classifier.weight"])
    with pytest.raises(ValueError, match="last-N"):
        apply_finetune(create_model("fedbrain_cnn"), "fedbrain_cnn", "some")
    with pytest.raises(ValueError, match="feature blocks"):
        apply_finetune(create_model("fedbrain_cnn"), "fedbrain_cnn", "last-99")


def test_merge_replaces_rows_of_the_same_model_mode_and_budget():
    old = [{"model": "a", "mode": "federated", "budget": "x", "finetune": "all", "macro_f1": 0.1},
           {"model": "a", "mode": "federated", "budget": "y", "finetune": "all", "macro_f1": 0.2},
           {"model": "a", "mode": "federated", "budget": "x", "finetune": "head", "macro_f1": 0.4}]
    new = [{"model": "a", "mode": "federated", "budget": "x", "finetune": "all", "macro_f1": 0.3}]
    merged = bm.merge_rows(old, new)
    assert [(r["budget"], r["macro_f1"]) for r in merged] == [("x", 0.3), ("y", 0.2), ("x", 0.4)]
    assert bm.merge_rows(old, [{"model": "b", "mode": "federated", "budget": "x"}])[-1]["model"] == "b"
    assert bm.Budget(lr=1e-4).label() == "128px, 5x1 ep, lr 0.0001, batch 32"


def test_goal_compares_within_one_budget_and_mode():
    rows = [{"model": "fedbrain_cnn", "mode": "centralized", "budget": "b", "macro_f1": 0.80, "params": 1e5,
             "latency_ms_fp32_1t": 1.0, "latency_ms_int8_1t": 0.4},
            {"model": "fedbrain_cnn_v2", "mode": "centralized", "budget": "b", "macro_f1": 0.90, "params": 1e5,
             "latency_ms_fp32_1t": 1.0, "latency_ms_int8_1t": 0.4, "teacher": "efficientnet_lite0 (federated)"},
            {"model": "resnet50", "mode": "centralized", "budget": "b", "macro_f1": 0.91, "params": 2e7,
             "latency_ms_fp32_1t": 30.0, "latency_ms_int8_1t": 10.0},
            {"model": "vgg16", "mode": "centralized", "budget": "other", "macro_f1": 0.99, "params": 1e8,
             "latency_ms_fp32_1t": 90.0}]
    (g,) = bm.goal(rows)  # fedbrain's best own model of the group, a distilled one included
    assert g["ours"] == "fedbrain_cnn_v2" and g["teacher"] and g["best_baseline"] == "resnet50"
    assert g["macro_f1_gap_pp"] == -1.0 and g["latency_ratio_1t"] == 30.0 and g["int8_latency_ratio_1t"] == 25.0
    assert g["int8_speedup_1t"] == 2.5 and g["met"]
    rows[2]["macro_f1"] = 0.95
    assert not bm.goal(rows)[0]["met"]
    assert "NOT met" in bm.format_goal(bm.goal(rows))
    rows[2]["macro_f1"], rows[1]["latency_ms_int8_1t"] = 0.91, 0.6  # int8 must pay: >= 2x faster than fp32
    assert not bm.goal(rows)[0]["met"]


def test_bad_model_and_finetune_are_clear_errors(capsys, tmp_path):
    assert main(["bench", "models", "--models", "alexnet", "--workspace", str(tmp_path)]) == 2
    assert "unknown model" in capsys.readouterr().err
    for cmd in (["bench", "models", "--finetune", "half"], ["train", "--finetune", "half"],
                ["simulate", "--set", "finetune=half"]):
        assert main([*cmd, "--workspace", str(tmp_path)]) == 2
        assert "last-N" in capsys.readouterr().err


@pytest.mark.slow
@needs_data
def test_retime_measures_again_and_keeps_accuracy(bench):
    ws, run = bench
    before = json.loads((run / "bench_models.json").read_text())["rows"]
    assert main(["bench", "models", "--retime", str(run), "--latency-repeats", "3", "--workspace", str(ws)]) == 0
    after = json.loads((run / "bench_models.json").read_text())
    assert after["retimed"] and len(after["rows"]) == len(before)
    for b, a in zip(before, after["rows"], strict=True):
        assert (a["model"], a["mode"], a["macro_f1"]) == (b["model"], b["mode"], b["macro_f1"])
        assert a["fp32_onnx_bytes"] == b["fp32_onnx_bytes"] and a["latency_ms_fp32_1t"] > 0


@pytest.mark.slow
@needs_data
def test_models_page_shows_the_benchmark(bench, monkeypatch):
    from streamlit.testing.v1 import AppTest

    ws, _ = bench
    monkeypatch.setenv("FEDBRAIN_WORKSPACE", str(ws))
    at = AppTest.from_string("from fedbrain.dashboard.views import models_page\nmodels_page()",
                             default_timeout=60).run()
    assert not at.exception, [e.value for e in at.exception]
    assert len(at.dataframe[0].value) == 4 and len(at.get("plotly_chart")) == 1
    assert "macro_f1_gap_pp" in at.dataframe[1].value.columns  # the goal check


def test_bench_train_reports_the_fine_tuned_share(tmp_path):
    out = tmp_path / "train.json"
    assert main(["bench", "train", "--models", "fedbrain_cnn", "--steps", "1", "--batch-size", "4",
                 "--finetune", "last-1", "--json", str(out)]) == 0
    (row,) = json.loads(out.read_text())
    assert row["finetune"] == "last-1" and 0 < row["trainable_params"] < row["params"] and row["images_per_s"] > 0
