"""Secure aggregation by pairwise masking (issue 13, part 2): the server only ever holds masked sums, and the
global model is plain FedAvg's to float rounding."""

from __future__ import annotations

import json

import numpy as np
import pytest
from nvflare.app_common.abstract.fl_model import FLMetaKey, FLModel

from fedbrain.cli.main import main
from fedbrain.fl.aggregator import ValidatingAggregator
from fedbrain.fl.metrics import NUM_SAMPLES, SECURE_META
from fedbrain.runs import RunDir, read_metrics
from fedbrain.secagg import SecureAggregationError, SiteKeys, add_masked, dequantise, mask_update, provision_keys

SITES = ["a", "b", "c"]


@pytest.fixture(scope="module")
def keys() -> dict[str, SiteKeys]:
    return provision_keys(SITES)


def _updates(seed: int = 0) -> tuple[dict, dict, dict]:
    rng = np.random.default_rng(seed)
    ref = {"w": rng.normal(size=(8, 5)).astype(np.float32), "b": rng.normal(size=5).astype(np.float32)}
    deltas = {s: {k: rng.normal(scale=0.01, size=v.shape) for k, v in ref.items()} for s in SITES}
    weights = {"a": 120.0, "b": 30.0, "c": 850.0}
    return ref, deltas, weights


def test_masks_cancel_in_the_sum_and_hide_every_update_and_partial_sum(keys):
    _, deltas, weights = _updates()
    masked = {s: mask_update(deltas[s], weights[s], keys[s], round_=3) for s in SITES}
    total = {}
    for s in SITES:
        add_masked(total, masked[s])
    want = sum(weights[s] * deltas[s]["w"] for s in SITES)
    assert np.allclose(dequantise(total["w"]), want, atol=1e-8)
    partial = add_masked(add_masked({}, masked["a"]), masked["b"])
    for seen in (*(m["w"] for m in masked.values()), partial["w"].view(np.int64)):
        assert np.abs(dequantise(seen.view(np.uint64))).min() > 1e3  # nowhere near a real weighted update (~1)
    # another round draws other masks; a site without the others' secrets cannot unmask
    assert not np.array_equal(mask_update(deltas["a"], 1.0, keys["a"], 4)["w"], masked["a"]["w"])


def test_the_secure_aggregator_holds_masked_sums_and_needs_every_site(keys):
    ref, deltas, weights = _updates(1)

    def site_model(s: str, rnd: int, masked: bool = True) -> FLModel:
        params = mask_update(deltas[s], weights[s], keys[s], rnd) if masked else \
            {k: ref[k] + deltas[s][k].astype(np.float32) for k in ref}
        return FLModel(params=params, meta={FLMetaKey.NUM_STEPS_CURRENT_ROUND: 1, NUM_SAMPLES: weights[s],
                                            "client_name": s, **({SECURE_META: True} if masked else {})})

    agg = ValidatingAggregator(weighting="samples", secure_sites=SITES)
    agg.set_reference(ref, 0)
    for s in SITES:
        agg.accept_model(site_model(s, 0))
        assert all(v.dtype == np.uint64 for v in agg._masked.values())  # all it holds: masked sums
    out = agg.aggregate_model()
    plain = ValidatingAggregator(weighting="samples")
    plain.set_reference(ref, 0)
    for s in SITES:
        plain.accept_model(site_model(s, 0, masked=False))
    expected = plain.aggregate_model()
    for k in ref:
        assert np.allclose(out.params[k], expected.params[k], atol=1e-6)
    agg.set_reference(ref, 1)
    agg.accept_model(site_model("a", 1))
    agg.accept_model(site_model("b", 1, masked=False))
    assert agg.rejected[-1]["reason"].startswith("not masked")
    assert "missing ['b', 'c']" in agg.aggregate_model().meta["unchanged"]


def test_key_files_are_checked(tmp_path, keys):
    keys["a"].write(tmp_path / "k.json")
    assert SiteKeys.read(tmp_path / "k.json") == keys["a"]
    assert (tmp_path / "k.json").stat().st_mode & 0o077 == 0  # a private key: readable by its owner only
    (tmp_path / "bad.json").write_text('{"site": "z", "private_key": "00", "public_keys": {"a": "00"}}')
    with pytest.raises(SecureAggregationError, match="not among"):
        SiteKeys.read(tmp_path / "bad.json")
    with pytest.raises(SecureAggregationError, match="too large"):
        mask_update({"w": np.array([1e12])}, 1.0, keys["a"], 0)


@pytest.mark.parametrize("flags, message", [
    ([], "cross_site_eval = false"),
    (["--set", "cross_site_eval=false", "--algorithm", "scaffold"], "SCAFFOLD"),
    (["--set", "cross_site_eval=false", "--set", "site_weighting=steps"], "site_weighting = samples"),
    (["--set", "cross_site_eval=false", "--set", "min_clients=2"], "every site in every round"),
])
def test_secure_aggregation_flags_are_checked_before_a_run(tmp_path, capsys, flags, message):
    rc = main(["simulate", "--set", "secure_aggregation=true", "--set", "data.max_images_per_site=10", "--rounds", "1",
               "--workspace", str(tmp_path), *flags])
    assert rc == 2 and message in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


@pytest.mark.slow
def test_secure_aggregation_gives_fedavgs_model_and_the_server_sees_only_ciphertexts(tmp_path, capsys):
    """The real simulator, the same job plain and masked (`fedbrain bench secure-aggregation`): the same global
    model to float rounding, and every update the server received was 64-bit masked integers."""
    rc = main(["bench", "secure-aggregation", "--set", "data.max_images_per_site=30", "--rounds", "2", "--model",
               "fedbrain_cnn_v2", "--set", "server_optimizer=sgd", "--set", "server_lr=1",
                   "--workspace", str(tmp_path)])
    assert rc == 0
    run = RunDir(next(tmp_path.iterdir()))
    res = json.loads(run.bench_secure_aggregation_json.read_text())
    assert res["max_abs_difference"] < 1e-6 and res["float_floor"] >= 0
    assert res["secure"]["dtypes"] == ["int64"] and res["plain"]["dtypes"] == ["float32"]
    assert res["bytes_ratio"] == pytest.approx(2.0)
    secure = run.child("secure")
    audit = read_metrics(secure.server_audit)
    assert len(audit) == 2 * 3 and not any(a["rejected"] for a in audit)
    assert all(kind.startswith("array:int64:") for a in audit for kind in a["params"].values())
    assert all(secure.site_keys(s).is_file() for s in secure.site_names())
    assert "max |difference|" in capsys.readouterr().out
