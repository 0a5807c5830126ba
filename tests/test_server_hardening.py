"""The server trusts nothing a site sends: the validating aggregator, pooled validation, weights-only loading."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
import torch
from nvflare.app_common.abstract.fl_model import FLMetaKey, FLModel
from nvflare.app_common.app_constant import AlgorithmConstants

from fedbrain.checkpoint import CheckpointError, global_state, load_weights
from fedbrain.fl.aggregator import ValidatingAggregator, check_update, check_weight
from fedbrain.fl.metrics import NUM_SAMPLES, pooled_validation, validation_counts
from fedbrain.training import compute_metrics

GLOBAL = {"w": np.zeros((2, 2), np.float32), "b": np.zeros(3, np.float32)}


def update(site: str, value: float = 1.0, steps=4, samples=None, params=None, meta=None) -> FLModel:
    params = params if params is not None else {k: np.full_like(v, value) for k, v in GLOBAL.items()}
    m = {FLMetaKey.NUM_STEPS_CURRENT_ROUND: steps, "client_name": site}
    if samples is not None:
        m[NUM_SAMPLES] = samples
    return FLModel(params=params, current_round=0, meta={**m, **(meta or {})})


def aggregator(**kw) -> ValidatingAggregator:
    agg = ValidatingAggregator(**kw)
    agg.set_reference(GLOBAL, 0)
    return agg


def test_a_rogue_first_update_does_not_fix_the_layout():
    """The expected layout is the server's global model, not whichever update arrives first."""
    agg = aggregator()
    agg.accept_model(update("rogue", params={"w": np.ones((5, 5), np.float32)}))
    agg.accept_model(update("honest-1", 1.0))
    agg.accept_model(update("honest-2", 3.0))
    out = agg.aggregate_model()
    assert [r["site"] for r in agg.rejected] == ["rogue"]
    np.testing.assert_allclose(out.params["w"], 2.0)


@pytest.mark.parametrize("steps, why", [(float("nan"), "not finite"), (-3, "not positive"), (0, "not positive"),
                                        (float("inf"), "not finite"), (1e12, "exceeds"), ("4", None),
                                        ("many", "not a number"), (True, "not a number"), (None, "no weight")])
def test_a_sites_reported_weight_is_validated(steps, why):
    agg = aggregator()
    agg.accept_model(update("honest", 1.0, steps=2))
    agg.accept_model(update("odd", 5.0, steps=steps))
    out = agg.aggregate_model()
    if why is None:  # a numeric string is a usable count
        assert agg.rejected == []
        np.testing.assert_allclose(out.params["w"], (2 * 1.0 + 4 * 5.0) / 6)
    else:
        assert len(agg.rejected) == 1 and why in agg.rejected[0]["reason"]
        np.testing.assert_allclose(out.params["w"], 1.0)  # the honest update alone: no NaN, no sign flip
    assert np.isfinite(out.params["w"]).all()


def test_huge_finite_updates_do_not_overflow():
    big = np.float32(3e38)
    agg = aggregator()
    agg.accept_model(update("a", float(big)))
    agg.accept_model(update("b", float(big)))
    out = agg.aggregate_model()
    assert np.isfinite(out.params["w"]).all() and out.params["w"].dtype == np.float32
    np.testing.assert_allclose(out.params["w"], big, rtol=1e-6)


def test_a_non_finite_aggregate_leaves_the_global_model_unchanged(tmp_path):
    agg = aggregator(rounds_file=str(tmp_path / "rounds.jsonl"))
    huge = {k: np.full(v.shape, 1e308, np.float64) for k, v in GLOBAL.items()}
    agg.accept_model(update("a", params=huge))
    agg.accept_model(update("b", params=huge))
    out = agg.aggregate_model()
    np.testing.assert_array_equal(out.params["w"], GLOBAL["w"])
    assert "not finite" in out.meta["unchanged"]
    assert any(r.get("why") for r in map(json.loads, (tmp_path / "rounds.jsonl").read_text().splitlines()))


def test_every_update_rejected_keeps_the_round_going():
    agg = aggregator()
    agg.accept_model(update("a", params={"w": np.full((2, 2), np.nan, np.float32), "b": GLOBAL["b"]}))
    out = agg.aggregate_model()
    np.testing.assert_array_equal(out.params["w"], GLOBAL["w"])
    assert "rejected" in out.meta["unchanged"]


@pytest.mark.parametrize("weighting, expected", [("steps", 0.75), ("equal", 0.5), ("samples", 0.9)])
def test_weightings(weighting, expected):
    agg = aggregator(weighting=weighting)
    agg.accept_model(update("small", 0.0, steps=1, samples=10))
    agg.accept_model(update("big", 1.0, steps=3, samples=90))
    assert float(agg.aggregate_model().params["w"][0, 0]) == pytest.approx(expected)
    with pytest.raises(ValueError, match="weighting"):
        ValidatingAggregator(weighting="size")


def test_batchnorm_statistics_are_pooled_as_moments():
    """Global running stats equal those of the pooled data, not the average of per-site variances."""
    rng = np.random.default_rng(0)
    a, b = rng.normal(0, 1, 400), rng.normal(5, 2, 100)
    ref = {"bn.running_mean": np.zeros(1, np.float32), "bn.running_var": np.ones(1, np.float32)}
    agg = ValidatingAggregator(weighting="equal")
    agg.set_reference(ref, 0)
    for site, x in (("a", a), ("b", b)):
        agg.accept_model(update(site, params={"bn.running_mean": np.array([x.mean()], np.float32),
                                              "bn.running_var": np.array([x.var()], np.float32)},
                                samples=len(x)))
    out = agg.aggregate_model().params
    pooled = np.concatenate([a, b])
    assert float(out["bn.running_mean"][0]) == pytest.approx(pooled.mean(), rel=1e-4)
    assert float(out["bn.running_var"][0]) == pytest.approx(pooled.var(), rel=1e-4)


def test_scaffold_control_differences_are_validated():
    agg = aggregator(scaffold=True)
    ok = {k: np.full_like(v, 0.5) for k, v in GLOBAL.items()}
    agg.accept_model(update("a", meta={AlgorithmConstants.SCAFFOLD_CTRL_DIFF: ok}))
    agg.accept_model(update("b", meta={AlgorithmConstants.SCAFFOLD_CTRL_DIFF: {"w": np.full((2, 2), np.nan)}}))
    agg.accept_model(update("c"))  # no control difference at all
    out = agg.aggregate_model()
    assert sorted(r["site"] for r in agg.rejected) == ["b", "c"]
    np.testing.assert_allclose(out.meta[AlgorithmConstants.SCAFFOLD_CTRL_DIFF]["w"], 0.5)


def test_the_round_log_names_each_sites_weight_share_and_update_norm(tmp_path):
    agg = aggregator(rounds_file=str(tmp_path / "r.jsonl"), weighting="samples")
    agg.accept_model(update("a", 1.0, samples=30))
    agg.accept_model(update("b", 2.0, samples=10))
    agg.aggregate_model()
    rows = {r["site"]: r for r in map(json.loads, (tmp_path / "r.jsonl").read_text().splitlines())}
    assert rows["a"]["weight_share"] == pytest.approx(0.75) and rows["b"]["weight_share"] == pytest.approx(0.25)
    assert rows["a"]["update_norm"] == pytest.approx(np.sqrt(7 * 1.0)) and rows["b"]["update_norm"] == pytest.approx(
        np.sqrt(7 * 4.0))


def test_check_update_and_weight_helpers():
    ref = {"w": (2, 2)}
    assert check_update({"w": np.ones((2, 2))}, ref) is None
    assert "non-finite" in check_update({"w": np.array([[1, np.nan], [0, 0]])}, ref)
    assert "shape" in check_update({"w": np.ones((3, 2))}, ref)
    assert "keys differ" in check_update({"v": np.ones((2, 2))}, ref)
    assert "not a number" in check_update({"w": np.array([["a", "b"], ["c", "d"]])}, ref)
    assert check_weight(3) == (3.0, None)


# ---------------------------------------------------------------- pooled validation from counts


def test_pooled_validation_equals_the_metrics_of_the_pooled_split():
    rng = np.random.default_rng(1)
    sites = []
    for n, labels in ((120, [0, 1, 2]), (60, [0, 1, 2, 3]), (40, [3, 4])):  # typed / all four / binary
        t = rng.choice(labels, n)
        logits = rng.normal(0, 1, (n, 4))
        logits[np.arange(n), np.where(t < 4, t, 0)] += 1.5
        p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
        sites.append((p, t))
    pooled = pooled_validation([validation_counts(p, t) for p, t in sites])
    ref = compute_metrics(np.concatenate([p for p, _ in sites]), np.concatenate([t for _, t in sites]))
    assert pooled["val_pooled_macro_f1"] == pytest.approx(ref["macro_f1"])
    assert pooled["val_pooled_tumour_auroc"] == pytest.approx(ref["tumour_auroc"], abs=0.02)
    assert pooled["val_score"] == pooled["val_pooled_macro_f1"]
    assert pooled["val_pooled_n"] == 220
    assert all(isinstance(v, int) for v in validation_counts(*sites[0]).values())  # counts only


# ---------------------------------------------------------------- model files never run code


class _Payload:
    def __reduce__(self):
        import pathlib

        return (pathlib.Path.touch, (pathlib.Path(_Payload.marker),))


def test_a_crafted_global_model_does_not_run_code(tmp_path):
    _Payload.marker = str(tmp_path / "pwned")
    evil = tmp_path / "FL_global_model.pt"
    torch.save({"model": {"w": torch.zeros(2)}, "x": _Payload()}, evil)
    pickle.loads(pickle.dumps(0))  # (pickle itself works here)
    for load in (global_state, load_weights):
        with pytest.raises(CheckpointError):
            load(evil)
    assert not (tmp_path / "pwned").exists()
