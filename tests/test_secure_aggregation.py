"""Secure aggregation by pairwise masking (issue 13 part 2, issue 28 item 2): the server only ever holds masked
sums, the global model is plain FedAvg's to float rounding, and each attack of issue 28's findings 1, 2 and 6
fails against it."""

from __future__ import annotations

import json

import numpy as np
import pytest
from nvflare.app_common.abstract.fl_model import FLMetaKey, FLModel

from fedbrain.cli.main import main
from fedbrain.fl.aggregator import ValidatingAggregator
from fedbrain.fl.metrics import NUM_SAMPLES, SECURE_META
from fedbrain.runs import RunDir, read_metrics
from fedbrain.secagg import (
    CANARY,
    KEY_FILE,
    SecureAggregationError,
    SiteMasker,
    add_masked,
    check_unmasked,
    dequantise,
    secure_aggregation_on,
    verify_announcement,
)
from fedbrain.settings import JobSettings

SITES = ["a", "b", "c"]


def _federation(tmp_path, sites=SITES) -> tuple[dict[str, SiteMasker], dict]:
    """Each site makes its own key in its own folder; the server relays the public keys."""
    maskers = {s: SiteMasker(s, tmp_path / s) for s in sites}
    return maskers, {s: m.announcement() for s, m in maskers.items()}


def _updates(seed: int = 0) -> tuple[dict, dict, dict]:
    rng = np.random.default_rng(seed)
    ref = {"w": rng.normal(size=(8, 5)).astype(np.float32), "b": rng.normal(size=5).astype(np.float32)}
    deltas = {s: {k: rng.normal(scale=0.01, size=v.shape) for k, v in ref.items()} for s in SITES}
    weights = {"a": 120.0, "b": 30.0, "c": 850.0}
    return ref, deltas, weights


def _site_model(masked: dict, s: str, weight: float) -> FLModel:
    return FLModel(params=masked, meta={FLMetaKey.NUM_STEPS_CURRENT_ROUND: 1, NUM_SAMPLES: weight,
                                        "client_name": s, SECURE_META: True})


def test_masks_cancel_in_the_sum_and_hide_every_update_and_partial_sum(tmp_path):
    maskers, keys = _federation(tmp_path)
    _, deltas, weights = _updates()
    masked = {s: maskers[s].mask(deltas[s], weights[s], "job-1", 3, keys) for s in SITES}
    total = {}
    for s in SITES:
        add_masked(total, masked[s])
    sums = check_unmasked(total, len(SITES))
    assert np.allclose(sums["w"], sum(weights[s] * deltas[s]["w"] for s in SITES), atol=1e-8)
    partial = add_masked(add_masked({}, masked["a"]), masked["b"])
    for seen in (*(m["w"] for m in masked.values()), partial["w"].view(np.int64)):
        assert np.abs(dequantise(seen.view(np.uint64))).min() > 1e3  # nowhere near a real weighted update (~1)


def test_a_zero_dimensional_tensor_is_masked_as_an_array_and_unmasked_exactly(tmp_path):
    """BatchNorm's ``num_batches_tracked`` is a 0-d tensor: its masked form must stay an array (torch.from_numpy)."""
    import torch

    maskers, keys = _federation(tmp_path)
    masked = {s: maskers[s].mask({"n": np.array(float(i + 1))}, 1.0, "job-1", 0, keys) for i, s in enumerate(SITES)}
    assert all(isinstance(m["n"], np.ndarray) and m["n"].shape == () for m in masked.values())
    torch.from_numpy(masked["a"]["n"])  # what the site sends
    total = {}
    for m in masked.values():
        add_masked(total, m)
    assert float(check_unmasked(total, len(SITES))["n"]) == pytest.approx(6.0)


def test_server_cannot_unmask_a_site_with_a_known_update_in_another_job(tmp_path):
    """Finding 1: a known (zero) update at round r of one job revealed the site's mask for round r of any job."""
    maskers, keys = _federation(tmp_path)
    _, deltas, _ = _updates()
    zero = {k: np.zeros_like(v) for k, v in deltas["a"].items()}
    known = maskers["a"].mask(zero, 1.0, "job-1", 0, keys)  # the server learns a's mask for (job-1, round 0)
    secret = maskers["a"].mask(deltas["a"], 1.0, "job-2", 0, keys)  # same round number, another job
    with np.errstate(over="ignore"):
        recovered = dequantise(secret["w"].view(np.uint64) - known["w"].view(np.uint64))
    assert not np.allclose(recovered, deltas["a"]["w"], atol=1e-3)
    assert np.abs(recovered).min() > 1e3  # the difference is still uniformly random


def test_a_site_refuses_to_mask_a_repeated_or_passed_round(tmp_path):
    """Finding 1: a server that re-sends a round (or reuses a round number) gets a refusal, not a second mask."""
    maskers, keys = _federation(tmp_path)
    _, deltas, _ = _updates()
    maskers["a"].mask(deltas["a"], 1.0, "job-1", 4, keys)
    for rnd in (4, 2):
        with pytest.raises(SecureAggregationError, match="already masked round 4"):
            maskers["a"].mask(deltas["a"], 1.0, "job-1", rnd, keys)
    # the ledger is kept in the site's folder: a restarted site refuses too
    with pytest.raises(SecureAggregationError, match="already masked"):
        SiteMasker("a", tmp_path / "a").mask(deltas["a"], 1.0, "job-1", 4, keys)
    maskers["a"].mask(deltas["a"], 1.0, "job-1", 5, keys)  # the next round is fine
    # only where the server is trusted (no certificates: the simulator, every job "simulate_job") does its session
    # tell two executions apart; a deployed site binds to the NVFlare job id alone
    assert maskers["a"].job_identity("simulate_job", "s1") != maskers["a"].job_identity("simulate_job", "s2")
    deployed = SiteMasker("a", tmp_path / "a")
    deployed.kit = tmp_path  # as if it had a kit with certificates
    assert deployed.job_identity("job-1", "s1") == deployed.job_identity("job-1", "s2") == "job-1"


def test_a_nan_update_is_refused_at_the_site_before_masking(tmp_path):
    """Finding 6: a NaN update became INT64_MIN and a global model of -1.43e6 was accepted."""
    maskers, keys = _federation(tmp_path)
    _, deltas, _ = _updates()
    bad = {**deltas["a"], "w": np.full_like(deltas["a"]["w"], np.nan)}
    with pytest.raises(SecureAggregationError, match="not finite"):
        maskers["a"].mask(bad, 1.0, "job-1", 0, keys)
    maskers["a"].mask(deltas["a"], 1.0, "job-1", 0, keys)  # refused before the ledger: the round is still open


def test_mismatched_keys_abandon_the_round_instead_of_accepting_a_random_model(tmp_path):
    """Finding 6: with keys that do not match, the masks do not cancel; the canary says so."""
    maskers, keys = _federation(tmp_path)
    ref, deltas, weights = _updates(1)
    stale = dict(keys, c=SiteMasker("c", tmp_path / "c-old").announcement())  # b holds an old key of c
    agg = ValidatingAggregator(weighting="samples", secure_sites=SITES)
    agg.set_reference(ref, 0)
    for s in SITES:
        masked = maskers[s].mask(deltas[s], weights[s], "job-1", 0, stale if s == "b" else keys)
        agg.accept_model(_site_model(masked, s, weights[s]))
    out = agg.aggregate_model()
    assert out.meta["unchanged"].startswith("secure aggregation keys do not match")
    assert all(np.array_equal(out.params[k], ref[k]) for k in ref)  # the global model stays


def test_an_int64_wrap_is_refused_at_the_site_and_detected_at_the_server(tmp_path):
    maskers, keys = _federation(tmp_path)
    with pytest.raises(SecureAggregationError, match="too large"):
        maskers["a"].mask({"w": np.array([2.0**30])}, 1.0, "job-1", 0, keys)
    # sites that skip the check: their quantised values wrap in the sum, which the server refuses
    big = np.array([2.0**30 * 0.9 * 2.0**32]).astype(np.int64).view(np.uint64)
    canary = np.full(4, 2.0**32).astype(np.int64).view(np.uint64)
    total = add_masked(add_masked({}, {"w": big, CANARY: canary}), {"w": big, CANARY: canary})
    with pytest.raises(SecureAggregationError, match="out of range"):
        check_unmasked(add_masked(total, {"w": big, CANARY: canary}), 3)


def test_the_secure_aggregator_gives_fedavgs_mean_and_a_missing_site_abandons_the_round(tmp_path):
    maskers, keys = _federation(tmp_path)
    ref, deltas, weights = _updates(1)
    agg = ValidatingAggregator(weighting="samples", secure_sites=SITES)
    agg.set_reference(ref, 0)
    for s in SITES:
        agg.accept_model(_site_model(maskers[s].mask(deltas[s], weights[s], "job-1", 0, keys), s, weights[s]))
        assert all(v.dtype == np.uint64 for v in agg._masked.values())  # all it holds: masked sums
    out = agg.aggregate_model()
    total = sum(weights.values())
    for k in ref:
        want = ref[k] + sum(weights[s] * deltas[s][k] for s in SITES) / total
        assert np.allclose(out.params[k], want, atol=1e-6)
    agg.set_reference(ref, 1)
    agg.accept_model(_site_model(maskers["a"].mask(deltas["a"], weights["a"], "job-1", 1, keys), "a", 120.0))
    agg.refused("b", "not finite")
    out = agg.aggregate_model()
    assert "missing ['b', 'c']" in out.meta["unchanged"]
    assert all(np.array_equal(out.params[k], ref[k]) for k in ref)


def test_the_private_key_stays_in_the_sites_folder_and_provisioned_kits_hold_none(tmp_path):
    """Finding 2: every private key was made on the coordinator's machine and shipped in the kits."""
    maskers, _ = _federation(tmp_path)
    key_file = tmp_path / "a" / KEY_FILE
    assert key_file.stat().st_mode & 0o077 == 0 and (tmp_path / "a").stat().st_mode & 0o077 == 0
    assert maskers["a"].public_key not in key_file.read_text()  # the file holds the private key only
    ann = maskers["a"].announcement()
    assert set(ann) == {"public_key", "signature", "certificate"}
    assert json.loads(key_file.read_text())["private_key"] not in json.dumps(ann)
    assert SiteMasker("a", tmp_path / "a").public_key == maskers["a"].public_key  # made once, kept
    from fedbrain import secagg

    assert not hasattr(secagg, "provision_keys")


def test_a_forged_public_key_is_refused_where_sites_have_certificates(tmp_path):
    """Key substitution by the server: a key not signed by the site's NVFlare certificate is refused."""
    from datetime import datetime, timedelta, timezone

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    from cryptography.x509.oid import NameOID

    def cert(name: str, key, issuer_name: str, issuer_key) -> bytes:
        now = datetime.now(timezone.utc)
        c = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
             .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer_name)]))
             .public_key(key.public_key()).serial_number(x509.random_serial_number())
             .not_valid_before(now).not_valid_after(now + timedelta(days=1)).sign(issuer_key, hashes.SHA256()))
        return c.public_bytes(serialization.Encoding.PEM)

    ca_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    root = cert("root", ca_key, "root", ca_key)
    for s in SITES:
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        kit = tmp_path / f"kit-{s}" / "startup"
        kit.mkdir(parents=True)
        (kit / "rootCA.pem").write_bytes(root)
        (kit / "client.crt").write_bytes(cert(s, key, "root", ca_key))
        (kit / "client.key").write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                                           serialization.PrivateFormat.PKCS8,
                                                           serialization.NoEncryption()))
    maskers = {s: SiteMasker(s, tmp_path / s, tmp_path / f"kit-{s}" / "startup") for s in SITES}
    keys = {s: m.announcement() for s, m in maskers.items()}
    for s in SITES:
        verify_announcement(s, keys[s], root)
    forged = dict(keys, b={**keys["b"], "public_key": SiteMasker("b", tmp_path / "server-made").public_key})
    with pytest.raises(SecureAggregationError, match="not signed"):
        maskers["a"].mask({"w": np.zeros(3)}, 1.0, "job-1", 0, forged)
    with pytest.raises(SecureAggregationError, match="certificate sent for 'c'"):
        verify_announcement("c", keys["b"], root)  # b's certificate cannot vouch for c


def test_nvflare_kits_sign_the_sites_public_keys_and_another_projects_kit_cannot(tmp_path):
    """Keys bound to the site's NVFlare identity: a server that relays a key signed by a kit of another project
    (its own CA, a client of the same name) is refused."""
    from fedbrain.fl import deploy as d

    names = ["hospital-a", "hospital-b", "hospital-c"]
    kits = d.provision(d.ProjectSpec(sites=names), tmp_path / "ours").clients
    theirs = d.provision(d.ProjectSpec(sites=["hospital-b"]), tmp_path / "theirs").clients
    maskers = {s: SiteMasker(s, tmp_path / s, kits[s] / "startup") for s in names}
    keys = {s: m.announcement() for s, m in maskers.items()}
    assert maskers["hospital-a"].mask({"w": np.zeros(3)}, 1.0, "job-1", 0, keys)
    impostor = SiteMasker("hospital-b", tmp_path / "impostor", theirs["hospital-b"] / "startup").announcement()
    with pytest.raises(SecureAggregationError, match="not signed"):
        maskers["hospital-c"].mask({"w": np.zeros(3)}, 1.0, "job-1", 0, dict(keys, **{"hospital-b": impostor}))


def test_secure_aggregation_is_on_by_default_with_three_sites_where_the_job_allows_it():
    assert secure_aggregation_on(JobSettings.create("fedavg"), 3)
    assert not secure_aggregation_on(JobSettings.create("fedavg"), 2)
    assert not secure_aggregation_on(JobSettings.create("scaffold"), 3)
    assert not secure_aggregation_on(JobSettings.create("fedavg", min_clients=2), 3)
    assert not secure_aggregation_on(JobSettings.create("fedavg", secure_aggregation=False), 5)
    assert secure_aggregation_on(JobSettings.create("fedavg", secure_aggregation=True), 2)


def test_cross_site_evaluation_under_secure_aggregation_asks_for_no_site_model(tmp_path):
    from fedbrain.fl.recipes import build_recipe

    recipe = build_recipe(JobSettings.create("fedavg", rounds=1), SITES)
    recipe.export(str(tmp_path))
    server = json.loads(next(tmp_path.rglob("config_fed_server.json")).read_text())
    cse = [w for w in server["workflows"] if w["path"].endswith("CrossSiteModelEval")]
    assert cse and cse[0]["args"]["submit_model_task_name"] == ""


@pytest.mark.parametrize("flags, message", [
    (["--algorithm", "scaffold"], "SCAFFOLD"),
    (["--set", "site_weighting=steps"], "site_weighting = samples"),
    (["--set", "min_clients=2"], "every site in every round"),
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
    assert res["bytes_ratio"] == pytest.approx(2.0, rel=0.01)
    secure = run.child("secure")
    audit = read_metrics(secure.server_audit)
    assert len(audit) == 2 * 3 and not any(a["rejected"] for a in audit)
    assert all(kind.startswith("array:int64:") for a in audit for kind in a["params"].values())
    assert all((secure.site_keys(s) / KEY_FILE).is_file() for s in secure.site_names())
    assert "max |difference|" in capsys.readouterr().out


@pytest.mark.slow
def test_a_nan_site_is_refused_at_the_site_and_its_round_abandoned_in_a_real_federation(tmp_path):
    """The simulator with secure aggregation on by default (3 sites): hospital-2's NaN update in round 0 never
    leaves it masked; round 0 keeps the global model, round 1 goes on with every site."""
    from fedbrain.data.federation import build_federation, embedded_spec
    from fedbrain.fl.simulate import run_simulation

    fed = build_federation(embedded_spec(max_images_per_site=12))
    settings = JobSettings.create("fedavg", rounds=2, extra_site_args="--corrupt-site hospital-2 --corrupt-at-round 0")
    run_simulation(fed, settings, tmp_path / "run", evaluate=False)  # the rounds are the question, not the test split
    assert settings.secure_aggregation is True
    rows = read_metrics(tmp_path / "run" / "server_rounds.jsonl")
    why = [r["why"] for r in rows if r.get("site") == "server"]
    assert len(why) == 1 and "missing ['hospital-2']" in why[0]
    assert sorted(r["site"] for r in rows if r.get("round") == 1 and r.get("aggregated")) == sorted(fed.sites)
    ledger = json.loads((RunDir(tmp_path / "run").site_keys("hospital-2") / "secagg_ledger.json").read_text())
    assert list(ledger.values()) == [1]  # round 0 was refused before the ledger, round 1 masked
