"""Metrics, checkpoints and the centralised/local CLI on the embedded Br35H set (a few images per site)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from fedbrain.checkpoint import CheckpointError, load_checkpoint, read_card, read_checkpoint
from fedbrain.cli.main import main
from fedbrain.models import default_preprocessing
from fedbrain.runs import read_metrics
from fedbrain.settings import FEDERATED_MODEL
from fedbrain.training import compute_metrics


def test_metrics_on_known_predictions():
    probs = np.array([[0.9, 0.05, 0.03, 0.02], [0.1, 0.8, 0.05, 0.05], [0.1, 0.1, 0.1, 0.7],
                      [0.6, 0.2, 0.1, 0.1], [0.2, 0.2, 0.2, 0.4]])
    targets = np.array([0, 1, 3, 1, 4])  # last: tumour of unknown type (predicted no_tumor)
    m = compute_metrics(probs, targets)
    assert m["n"] == 5 and m["n_typed"] == 4
    assert m["accuracy"] == pytest.approx(0.75)
    assert m["confusion_matrix"][1] == [1, 1, 0, 0]
    assert m["tumour_accuracy"] == pytest.approx(0.8)
    assert 0 <= m["tumour_auroc"] <= 1


def test_binary_only_set_has_no_typed_metrics():
    probs = np.full((4, 4), 0.25)
    m = compute_metrics(probs, np.array([4, 4, 3, 3]))
    assert "macro_f1" not in m and "tumour_accuracy" in m


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    ws = tmp_path_factory.mktemp("ws")
    rc = main(["train", "--set", "data.max_images_per_site=40", "--epochs", "2", "--workspace", str(ws)])
    assert rc == 0
    return next(ws.iterdir())


def test_centralised_run_writes_the_documented_schema(trained):
    for f in ("config.json", "metrics.jsonl", "results.json", "data_summary.json",
              "checkpoints/best.pt", "checkpoints/last.pt", "splits/hospital-1.csv"):
        assert (trained / f).is_file(), f
    rows = read_metrics(trained / "metrics.jsonl")
    assert {r["split"] for r in rows} >= {"train", "val", "test"}
    results = json.loads((trained / "results.json").read_text())
    assert set(results["test"]) == {"hospital-1", "hospital-2", "hospital-3", "union"}


def test_checkpoint_describes_itself(trained):
    model, card = load_checkpoint(trained / "checkpoints" / "best.pt")
    assert card.classes == ("glioma", "meningioma", "pituitary", "no_tumor")
    assert card.supervised_granularity == "binary"  # Br35H has no tumour types
    assert card.model == FEDERATED_MODEL and card.preprocessing == default_preprocessing(FEDERATED_MODEL, 128)
    assert "test" in card.metrics


def test_evaluate_cli_reproduces_the_stored_test_metrics(trained, tmp_path):
    out = tmp_path / "m.json"
    assert main(["evaluate", str(trained / "checkpoints" / "best.pt"), "--set", "data.max_images_per_site=40",
                 "--json", str(out)]) == 0
    again = json.loads(out.read_text())
    stored = read_card(trained / "checkpoints" / "best.pt").metrics["test"]
    assert again["union"]["tumour_accuracy"] == pytest.approx(stored["union"]["tumour_accuracy"])


def test_local_mode_and_clear_errors(tmp_path, capsys):
    assert main(["train", "--mode", "local", "--set", "data.max_images_per_site=40", "--epochs", "1"]) == 2
    assert "--site" in capsys.readouterr().err
    assert main(["train", "--data-root", str(tmp_path / "nope"), "--epochs", "1"]) == 2
    assert "--data-root" in capsys.readouterr().err
    bad = tmp_path / "x.pt"
    bad.write_text("junk")
    with pytest.raises(CheckpointError):
        read_checkpoint(bad)
    assert main(["train", "--mode", "local", "--site", "hospital-2", "--set", "data.max_images_per_site=40",
                 "--epochs", "1", "--workspace", str(tmp_path / "ws")]) == 0


def test_calibration_error_of_the_class_and_tumour_probabilities():
    """ECE (issue 14): 0 for a forecaster that is right as often as it says, large for an overconfident one."""
    import numpy as np

    from fedbrain.training import calibration_error, compute_metrics

    rng = np.random.default_rng(0)
    conf = rng.uniform(0.5, 1.0, 20000)
    assert calibration_error(conf, (rng.uniform(size=conf.size) < conf).astype(float)) < 0.02
    assert abs(calibration_error(np.full(1000, 0.99), np.r_[np.ones(500), np.zeros(500)]) - 0.49) < 1e-9
    # a model sure of every answer, right on half of them: both ECEs are about 0.5
    targets = np.array([0, 1, 2, 3] * 25)
    probs = np.full((100, 4), 0.001)
    probs[np.arange(100), np.where(np.arange(100) % 2 == 0, targets, (targets + 1) % 4)] = 0.997
    m = compute_metrics(probs, targets)
    assert abs(m["ece"] - 0.497) < 0.01 and 0.0 <= m["tumour_ece"] <= 1.0
