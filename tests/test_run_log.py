"""One end of job (issue 27): a deployed run's folder is built from what its server left, as a simulated one.

The server's files are written here as the controller and NVFlare write them (``progress.json`` with the pooled
validation per round, ``server_rounds.jsonl``, ``round-NNNN.pt`` / ``best.pt``, ``cross_val_results.json``), from
real site counts; the run folder is then checked against metrics computed on the pooled images directly.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from fedbrain.checkpoint import load_checkpoint
from fedbrain.fl.controller import save_round
from fedbrain.fl.metrics import POOLED_VAL, pooled_row, pooled_validation, validation_counts
from fedbrain.fl.runlog import RunLog, finish_deployed_run, global_val_rows
from fedbrain.models import create_model
from fedbrain.runs import RunDir, read_json, read_metrics
from fedbrain.settings import JobSettings
from fedbrain.training import compute_metrics

SITES = ["hospital-a", "hospital-b"]


def _site_outputs(seed: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    """One site's (probabilities, targets) over the four classes, better than chance."""
    rng = np.random.default_rng(seed)
    t = rng.integers(0, 4, n)
    logits = rng.normal(0, 1, (n, 4))
    logits[np.arange(n), t] += 1.5
    return np.exp(logits) / np.exp(logits).sum(1, keepdims=True), t


def _progress(val_by_round: dict[int, list[dict]]) -> dict:
    """The controller's progress after these rounds: its pooled validation of each (what update_model keeps)."""
    pooled = {str(r): {**pooled_row(pooled_validation(rows)), "sites": len(rows)} for r, rows in val_by_round.items()}
    last = max(val_by_round)
    return {"last_round": last, "start_round": 0, "num_rounds": last + 1, "rounds_done": last + 1,
            "sites": {s: {"last_round": last} for s in SITES}, "stopped_early": False, POOLED_VAL: pooled}


@pytest.fixture
def server_result(tmp_path):
    return write_server_result(tmp_path)


def write_server_result(tmp_path):
    """A downloaded job result: two rounds, the best model from round 0, cross-site evaluation with test counts."""
    job = tmp_path / "result" / "workspace" / "app_server"
    rounds = job / "rounds"
    rounds.mkdir(parents=True)
    val = {r: [validation_counts(*_site_outputs(10 * r + i, 40)) for i in range(2)] for r in (0, 1)}
    progress = _progress(val)
    (rounds / "progress.json").write_text(json.dumps(progress))
    state = {k: v.numpy() for k, v in create_model("fedbrain_cnn_gn", pretrained=False).state_dict().items()}
    save_round(str(rounds / "round-0001.pt"), state, 1)
    save_round(str(rounds / "best.pt"), state, 0, {"val_score": progress[POOLED_VAL]["0"]["score"], "metrics": {}})
    (job / "server_rounds.jsonl").write_text("".join(
        json.dumps({"round": r, "site": s, "weight": 1.0, "samples": 40, "aggregated": True}) + "\n"
        for r in (0, 1) for s in SITES))
    tests = {s: _site_outputs(100 + i, 60) for i, s in enumerate(SITES)}
    cross = {s: {"SRV_best_FL_global_model.pt": {"test_macro_f1": compute_metrics(*tests[s])["macro_f1"],
                                                 **validation_counts(*tests[s], prefix="test")}} for s in SITES}
    (job / "cross_site_val").mkdir()
    (job / "cross_site_val" / "cross_val_results.json").write_text(json.dumps(cross))
    return tmp_path / "result", progress, tests


def test_the_global_rows_are_the_servers_pooled_validation_each_round_once(tmp_path, server_result):
    _, progress, _ = server_result
    run = RunDir(tmp_path / "run")
    log = RunLog(run)
    first = log.add_progress({**progress, POOLED_VAL: {"0": progress[POOLED_VAL]["0"]}})
    assert [r["round"] for r in first] == [0]
    assert [r["round"] for r in log.add_progress(progress)] == [1]  # round 0 is not written again
    assert log.add_progress(progress) == []
    log.close()
    rows = [r for r in read_metrics(run.metrics) if r["site"] == "global"]
    assert [r["score"] for r in rows] == [progress[POOLED_VAL][str(r)]["score"] for r in (0, 1)]
    assert global_val_rows({}) == []


def test_a_deployed_run_gets_the_run_folder_of_a_simulated_one(tmp_path, server_result):
    result_dir, progress, tests = server_result
    run = RunDir(tmp_path / "run")
    settings = JobSettings.create(rounds=2, model="fedbrain_cnn_gn")
    summary = finish_deployed_run(run, settings, result_dir, dict.fromkeys(SITES, "multiclass"),
                                  {"sites": SITES}, deployment="nvflare-prod", job_id="job-1")
    rows = read_metrics(run.metrics)
    glob = {r["round"]: r for r in rows if r["site"] == "global" and r["split"] == "val"}
    assert sorted(glob) == [0, 1] and all(glob[r]["pooled"] for r in glob)
    assert glob[0]["macro_f1"] == pytest.approx(progress[POOLED_VAL]["0"]["macro_f1"])
    assert {r["site"] for r in rows if r["split"] == "aggregation"} == set(SITES)
    # results.json: the union's metrics from the sites' summed test counts equal those of the pooled images
    results = read_json(run.results)
    union = results["test"]["union"]
    probs = np.concatenate([p for p, _ in tests.values()])
    targets = np.concatenate([t for _, t in tests.values()])
    direct = compute_metrics(probs, targets)
    assert union["macro_f1"] == pytest.approx(direct["macro_f1"])
    assert union["n"] == len(targets) and "summed test counts" in results["test_source"]
    assert union["glioma_recall"] == pytest.approx(direct["per_class"]["glioma"]["recall"])
    assert results["test"]["hospital-a"]["macro_f1"] == pytest.approx(compute_metrics(*tests["hospital-a"])[
        "macro_f1"])
    assert not any(k.startswith(("cm_", "hist_")) for k in results["test"]["hospital-a"])  # counts stay summed
    assert summary["best_round"] == results["best_round"] == 0
    assert {r["site"] for r in rows if r["split"] == "test"} == {*SITES, "union"}
    # the checkpoints: the best by the pooled score, its card built as a simulated run's
    _, best = load_checkpoint(run.best)
    assert best.training["best_round"] == 0 and best.training["job_id"] == "job-1"
    assert best.training["mode"] == "federated" and best.supervised_granularity == "multiclass"
    assert best.metrics["test"]["union"]["macro_f1"] == union["macro_f1"]
    _, last = load_checkpoint(run.last)
    assert last.training["last_round"] == 1
