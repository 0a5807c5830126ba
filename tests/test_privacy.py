"""Record-level DP (DP-SGD at each site), the site's own privacy policy, the membership-inference audit and the
Privacy page (issue 13)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from fedbrain.cli.main import main
from fedbrain.data.dataset import PoissonLoader
from fedbrain.dp import DPSGDConfig, PrivacyBudgetError, PrivateTraining, epsilon_spent, noise_multiplier_for
from fedbrain.fl.policy import PolicyError, SitePolicy, check_outgoing, find_policy
from fedbrain.fl.privacy import weights_digest
from fedbrain.models import create_model, default_preprocessing
from fedbrain.settings import JobSettings
from fedbrain.training import TrainConfig, make_optimizer, train_epochs


class _Images:
    """A SliceDataset stand-in: random 32 px slices with labels."""

    def __init__(self, n: int, seed: int = 0):
        rng = np.random.default_rng(seed)
        self.images = rng.integers(0, 255, (n, 32, 32), dtype=np.uint8)
        self.targets = torch.as_tensor(rng.integers(0, 4, n))
        self.pre = default_preprocessing("fedbrain_cnn_v2", 32)

    def __len__(self) -> int:
        return len(self.images)


ONE_STEP = TrainConfig(steps=1, optimizer="sgd", momentum=0.0, lr=1.0, weight_decay=0.0, class_weighting=False)


def _private(model, n=64, epsilon=8.0, rate=0.25, planned=4, ledger=None, **kw):
    return PrivateTraining(model, DPSGDConfig(epsilon=epsilon, sample_rate=rate, **kw), n, planned, ledger=ledger)


# ---------------------------------------------------------------- DP-SGD


def test_the_noise_spends_the_budget_in_exactly_the_planned_steps():
    cfg = DPSGDConfig(epsilon=3.0, sample_rate=0.1)
    sigma = noise_multiplier_for(cfg, 200)
    assert epsilon_spent(sigma, 0.1, 200, cfg.delta) <= 3.0
    assert epsilon_spent(sigma, 0.1, 200, cfg.delta) > 2.9  # not wastefully noisy
    assert epsilon_spent(sigma, 0.1, 400, cfg.delta) > 3.0
    assert epsilon_spent(sigma, 0.1, 0, cfg.delta) == 0.0
    assert noise_multiplier_for(DPSGDConfig(epsilon=1.0, sample_rate=0.1), 200) > sigma


@pytest.mark.parametrize("bad", [dict(epsilon=-1), dict(delta=0), dict(delta=1), dict(max_grad_norm=0),
                                 dict(sample_rate=0), dict(sample_rate=1.5), dict(accountant="moments")])
def test_dp_settings_are_checked(bad):
    with pytest.raises(ValueError):
        DPSGDConfig(**bad)


def test_training_stops_when_the_budget_is_spent_and_the_ledger_resumes_it(tmp_path):
    ledger = tmp_path / "privacy_ledger.json"
    model = create_model("fedbrain_cnn_v2", pretrained=False)
    ds = _Images(64)
    private = _private(model, ledger=ledger, planned=3)
    cfg = TrainConfig(**{**ONE_STEP.to_dict(), "steps": 5})
    out = train_epochs(model, PoissonLoader(ds, 0.25, seed=0), cfg, optimizer=make_optimizer(model, cfg),
                       private=private)
    assert out["steps"] == 3 and out["dp_stopped_early"] and out["dp_budget_spent"]
    assert out["dp_epsilon"] <= 8.0 and out["dp_mechanism"] == "dp-sgd"
    saved = json.loads(ledger.read_text())
    assert saved["steps"] == 3 and saved["epsilon"] == pytest.approx(out["dp_epsilon"])
    again = _private(create_model("fedbrain_cnn_v2", pretrained=False), ledger=ledger, planned=3)
    assert again.steps == 3 and not again.can_step()  # a restarted site goes on from what it spent
    with pytest.raises(PrivacyBudgetError, match="already spent"):
        _private(create_model("fedbrain_cnn_v2", pretrained=False), ledger=ledger, planned=3, epsilon=3.0)


def test_each_images_gradient_is_clipped_and_the_noise_is_not_from_a_known_seed():
    torch.manual_seed(0)
    start = create_model("fedbrain_cnn_v2", pretrained=False).state_dict()
    ds = _Images(64)

    def update(noise: bool) -> torch.Tensor:
        model = create_model("fedbrain_cnn_v2", pretrained=False)
        model.load_state_dict(start)
        private = _private(model, n=len(ds), planned=10, max_grad_norm=0.01)
        if not noise:  # (no budget could pay for it: the accountant is bypassed to see the clipping alone)
            private.noise_multiplier = 0.0
            private.can_step = lambda: True
        torch.manual_seed(0)  # a known seed everywhere: DP noise must not follow it
        train_epochs(model, PoissonLoader(ds, 0.25, seed=0), ONE_STEP, optimizer=make_optimizer(model, ONE_STEP),
                     private=private)
        return torch.cat([(model.state_dict()[k] - start[k]).flatten() for k in start])

    clipped = update(noise=False)
    # the step is the mean of per-image gradients each clipped to 0.01: its norm is at most 0.01 x batch / E[batch]
    assert 0 < clipped.norm() <= 0.01 * 64 / 16 + 1e-6
    a, b = update(noise=True), update(noise=True)
    assert not torch.allclose(a, b), "two DP runs with the same seed drew the same noise"


def test_batchnorm_is_frozen_under_dp_and_small_sites_get_a_clear_error():
    model = create_model("fedbrain_cnn", pretrained=False)  # BatchNorm: frozen to its running statistics
    _private(model, n=64)
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bns and not any(p.requires_grad for m in bns for p in m.parameters())
    with pytest.raises(PrivacyBudgetError, match="raise dp_sample_rate"):
        _private(create_model("fedbrain_cnn_v2", pretrained=False), n=20, rate=0.1)


def test_poisson_batches_vary_in_size_and_come_from_os_entropy():
    ds = _Images(200)
    sizes = [len(y) for _, y in PoissonLoader(ds, 0.1)]
    assert len(sizes) == 10 and len(set(sizes)) > 1 and 5 < np.mean(sizes) < 40
    first = lambda: next(iter(PoissonLoader(ds, 0.1)))[1]  # noqa: E731
    assert any(not torch.equal(first(), first()) for _ in range(3))
    assert torch.equal(next(iter(PoissonLoader(ds, 0.1, seed=1)))[1], next(iter(PoissonLoader(ds, 0.1, seed=1)))[1])


# ---------------------------------------------------------------- the site's own policy


def test_a_site_policy_makes_every_job_at_least_as_strict():
    policy = SitePolicy(dp_epsilon=3.0, dp_delta=1e-6)
    assert policy.apply(DPSGDConfig()).epsilon == 3.0  # a job without DP gets the site's budget
    assert policy.apply(DPSGDConfig(epsilon=8.0)).epsilon == 3.0
    assert policy.apply(DPSGDConfig(epsilon=1.0)).epsilon == 1.0  # a stricter job keeps its own
    assert policy.apply(DPSGDConfig(epsilon=8.0)).delta == 1e-6
    assert SitePolicy().apply(DPSGDConfig(epsilon=8.0)).epsilon == 8.0
    check_outgoing(policy, {"dp_mechanism": "dp-sgd", "dp_epsilon": 2.5})
    with pytest.raises(PolicyError, match="requires record-level DP"):
        check_outgoing(policy, {"dp_mechanism": "client-level", "dp_epsilon": 1.0})
    with pytest.raises(PolicyError, match="allows ε ≤ 3"):
        check_outgoing(policy, {"dp_mechanism": "dp-sgd", "dp_epsilon": 4.0})
    check_outgoing(SitePolicy(), {})


def test_the_policy_is_found_in_the_site_workspace_and_bad_files_are_named(tmp_path, monkeypatch):
    monkeypatch.delenv("FEDBRAIN_PRIVACY_POLICY", raising=False)
    kit = tmp_path / "hospital-1"
    (kit / "startup").mkdir(parents=True)
    (kit / "local").mkdir()
    job_script = kit / "job-123" / "app_hospital-1" / "custom"
    job_script.mkdir(parents=True)
    assert find_policy(starts=(job_script,)) == SitePolicy()
    (kit / "local" / "fedbrain_privacy.json").write_text('{"dp_epsilon": 4, "comment": "set by the admin"}')
    assert find_policy(starts=(job_script,)).dp_epsilon == 4
    bad = tmp_path / "bad.json"
    for text, match in (("{", "not valid JSON"), ('{"dp_epsilon": -1}', "≥ 0"), ('{"epsilon": 1}', "unknown"),
                        ("[1]", "JSON object")):
        bad.write_text(text)
        with pytest.raises(PolicyError, match=match):
            SitePolicy.read(bad)
    monkeypatch.setenv("FEDBRAIN_PRIVACY_POLICY", str(bad))
    with pytest.raises(PolicyError):
        find_policy(starts=(job_script,))


def test_dp_flags_are_checked_before_a_run_starts(tmp_path, capsys):
    bad_policy = tmp_path / "p.json"
    bad_policy.write_text('{"dp_epsilon": 8}')
    cases = [
        (["--dp-epsilon", "8", "--algorithm", "scaffold"], "not privatised"),
        (["--dp-epsilon", "8", "--set", "dp_clip=1", "--set", "dp_noise=1"], "one kind of DP"),
        (["--site-policy", f"nowhere={bad_policy}"], "no site 'nowhere'"),
        (["--site-policy", "all"], "SITE=FILE"),
    ]
    for flags, message in cases:
        ws = tmp_path / "ws"
        rc = main(["simulate", "--set", "data.max_images_per_site=10", "--rounds", "1", "--workspace", str(ws), *flags])
        assert rc != 0, flags
        assert message in capsys.readouterr().err, flags
        assert not ws.exists() or not list(ws.iterdir()), flags  # refused before a run folder is made
    assert main(["simulate", "--dp-epsilon", "8", "--set", "dp_sample_rate=0"]) == 2
    assert "dp_sample_rate" in capsys.readouterr().err


# ---------------------------------------------------------------- the audit


def test_the_loss_attack_separates_memorised_images_and_not_random_ones():
    from fedbrain.privacy_audit import attack, label_loss

    probs = np.array([[0.9, 0.05, 0.03, 0.02], [0.1, 0.2, 0.3, 0.4]])
    assert label_loss(probs, np.array([0, 4])) == pytest.approx([-np.log(0.9), -np.log(0.6)])  # 4: any tumour
    rng = np.random.default_rng(0)
    leaky = attack(rng.exponential(0.1, 300), rng.exponential(1.0, 300))
    fair = attack(rng.exponential(1.0, 300), rng.exponential(1.0, 300))
    assert leaky["auroc"] > 0.8 and leaky["tpr_at_1pct_fpr"] > 0.02
    assert abs(fair["auroc"] - 0.5) < 0.07 and fair["auroc_ci"][0] < 0.5 < fair["auroc_ci"][1]
    assert len(fair["roc"]["fpr"]) == len(fair["roc"]["tpr"]) == 101


def test_the_calibrated_attack_finds_members_that_the_loss_attack_misses_among_hard_and_easy_images():
    from fedbrain.privacy_audit import attack, calibrated_attack

    rng = np.random.default_rng(0)
    difficulty = rng.exponential(1.0, 600)  # some images are hard for any model, some easy
    member_ref, nonmember_ref = difficulty[:300], difficulty[300:]  # a reference model trained without them
    member, nonmember = 0.8 * member_ref, nonmember_ref * rng.uniform(0.95, 1.05, 300)  # training shaved 20 %
    plain = attack(member, nonmember)
    calibrated = calibrated_attack(member, nonmember, member_ref, nonmember_ref)
    assert calibrated["auroc"] > 0.9 > plain["auroc"]
    blind = calibrated_attack(nonmember_ref, nonmember_ref[::-1].copy(), nonmember_ref, nonmember_ref[::-1].copy())
    assert abs(blind["auroc"] - 0.5) < 0.1  # no training, no signal


def test_the_calibrated_attack_leaves_out_every_image_the_reference_saw_and_its_near_duplicates(tmp_path):
    from PIL import Image

    from fedbrain.data.federation import SiteData
    from fedbrain.data.readers import Record
    from fedbrain.privacy_audit import membership_inference

    rng = np.random.default_rng(0)
    recs = []
    for i in range(40):
        path = tmp_path / f"{i}.png"
        smooth = Image.fromarray(rng.integers(0, 255, (6, 6), dtype=np.uint8)).resize((48, 48), Image.BILINEAR)
        smooth.save(path)  # a slice, not noise (the reader refuses i.i.d. noise)
        recs.append(Record(str(path), ("glioma", "meningioma", "pituitary", "no_tumor")[i % 4]))
    twin = tmp_path / "copy_of_a_validation_image.png"
    twin.write_bytes(Path(recs[20].path).read_bytes())
    site = SiteData("a", "four_class", {"train": recs[:20], "val": recs[20:30], "test": recs[30:]}, {})
    model = create_model("fedbrain_cnn_v2").eval()
    pre = default_preprocessing("fedbrain_cnn_v2", 32)
    seen = recs[:10] + [Record(str(twin), "glioma")]  # half the members and a copy of one non-member
    out = membership_inference(model, {"a": site}, pre, cache_dir=tmp_path / "cache", reference=model,
                               reference_seen=seen)["sites"]["a"]
    assert (out["members"], out["nonmembers"]) == (20, 20)  # the loss attack keeps every image
    assert (out["calibrated"]["members"], out["calibrated"]["nonmembers"]) == (10, 19)
    everything = membership_inference(model, {"a": site}, pre, cache_dir=tmp_path / "cache", reference=model,
                                      reference_seen=recs)["sites"]["a"]
    assert "too few" in everything["calibrated"]["skipped"]


def test_a_reference_model_outside_a_run_is_refused(tmp_path):
    from fedbrain.privacy_audit import reference_images

    with pytest.raises(ValueError, match="not inside a run folder"):
        reference_images(tmp_path / "best.pt")


def test_the_aggregator_takes_a_spent_site_s_counts_but_no_update():
    from nvflare.app_common.abstract.fl_model import FLMetaKey, FLModel

    from fedbrain.fl.aggregator import ValidatingAggregator

    agg = ValidatingAggregator(weighting="samples")
    ref = {"w": np.zeros(3, dtype=np.float32)}
    agg.set_reference(ref, 5)
    agg.accept_model(FLModel(params={"w": np.ones(3, dtype=np.float32)},
                             meta={FLMetaKey.NUM_STEPS_CURRENT_ROUND: 1, "num_samples": 10, "client_name": "a"}))
    agg.accept_model(FLModel(params=dict(ref), metrics={"val_score": 0.5},
                             meta={FLMetaKey.NUM_STEPS_CURRENT_ROUND: 0, "num_samples": 90, "client_name": "b",
                                   "dp_budget_spent": True, "dp_epsilon": 8.0}))
    assert not agg.rejected
    out = agg.aggregate_model()
    assert np.allclose(out.params["w"], 1.0)  # b's unchanged weights did not pull the average back
    agg.set_reference(ref, 6)
    agg.accept_model(FLModel(params=dict(ref), meta={FLMetaKey.NUM_STEPS_CURRENT_ROUND: 0, "num_samples": 90,
                                                     "client_name": "b", "dp_budget_spent": True}))
    assert "privacy budget" in agg.aggregate_model().meta["unchanged"]


# ---------------------------------------------------------------- end to end


@pytest.mark.slow
def test_dp_sgd_federation_end_to_end_with_a_stricter_site_audit_and_privacy_page(tmp_path, monkeypatch):
    """A real simulator run with DP-SGD at every site, one hospital's own policy stricter than the job: on the wire
    only privatised updates with DP-SGD accounting, each site's ε within its budget per round, the checkpoint's
    privacy record, then ``fedbrain audit`` and the dashboard's Privacy page over the run."""
    from streamlit.testing.v1 import AppTest

    from fedbrain.checkpoint import read_card
    from fedbrain.runs import RunDir, read_metrics

    policy = tmp_path / "strict.json"
    policy.write_text('{"dp_epsilon": 2}')
    ws = tmp_path / "ws"
    rc = main(["simulate", "--set", "data.max_images_per_site=40", "--rounds", "2", "--model", "fedbrain_cnn_v2",
               "--dp-epsilon", "8", "--set", "dp_sample_rate=0.5", "--site-policy", f"hospital-2={policy}",
               "--set", "secure_aggregation=false",  # cross-site evaluation then asks each site for its model
               "--workspace", str(ws)])
    assert rc == 0
    run = RunDir(next(d for d in ws.iterdir() if (d / "config.json").is_file()))
    audit = read_metrics(run.server_audit)
    assert len(audit) == 2 * 3
    for row in audit:
        assert {"dp_mechanism", "dp_epsilon", "dp_noise_multiplier", "dp_sample_rate"} <= set(row["meta"])
        assert "train_loss" not in row["metrics"] and not [k for k in row["metrics"] if k.startswith("profile_")]
    budgets = {"hospital-1": 8.0, "hospital-2": 2.0, "hospital-3": 8.0}
    for site, budget in budgets.items():
        rows = [r for r in read_metrics(run.site_metrics(site)) if r["split"] == "train"]
        assert len(rows) == 2 and all(r["dp_mechanism"] == "dp-sgd" for r in rows)
        assert rows[0]["dp_epsilon"] < rows[1]["dp_epsilon"] <= budget * (1 + 1e-9)
        assert rows[1]["dp_epsilon"] > 0.9 * budget  # the planned rounds spend the budget
        assert rows[0]["dp_epsilon_budget"] == budget
        # a hospital with its own policy keeps its ledger in its own folder (all jobs), the others per job
        own = run.site_policy(site).is_file()
        ledger = SitePolicy.read(run.site_policy(site)).ledger(site).path if own else run.site_privacy_ledger(site)
        assert ledger.is_file() and own == (site == "hospital-2")
    # cross-site evaluation (on by default) received the update each site already released, nothing else
    from nvflare.fuel.utils import fobs

    from fedbrain.fl.privacy import weights_digest

    shared = next(Path(run).glob("nvflare/*/server/simulate_job/cross_site_val/model_shareables"))
    for site in budgets:
        released = [r["released_sha256"] for r in read_metrics(run.site_metrics(site)) if r["split"] == "train"]
        assert weights_digest(fobs.loadf(str(shared / site)).data) == released[-1], site
    card = read_card(run.best)
    assert card.training["privacy"]["mechanism"] == ["dp-sgd"]
    assert set(card.training["privacy"]["epsilon_per_site"]) == set(budgets)
    spent = card.training["privacy"]
    assert spent["site_epsilon_per_site"]["hospital-2"] == pytest.approx(  # the DP-SGD ε plus the counts'
        spent["epsilon_per_site"]["hospital-2"] + JobSettings().dp_count_epsilon, abs=1e-3)

    assert main(["audit", str(run), "--max-images", "20"]) == 0
    result = json.loads(run.membership_audit.read_text())
    assert set(result["membership"]["sites"]) == set(budgets)
    attacked = [m for m in result["membership"]["sites"].values() if "auroc" in m]
    assert attacked and all(0 <= m["auroc"] <= 1 and m["members"] == m["nonmembers"] for m in attacked)
    assert all(w["without_dp"] == 0 and not w["training_data_scalars"] for w in result["what_left"].values())
    assert result["privacy"]["hospital-2"]["final_epsilon"] <= 2.0

    monkeypatch.setenv("FEDBRAIN_WORKSPACE", str(ws))
    at = AppTest.from_string("from fedbrain.dashboard.views import privacy_page\nprivacy_page()",
                             default_timeout=60).run()
    assert not at.exception, [e.value for e in at.exception]
    assert len(at.get("plotly_chart")) == 2  # ε per site over rounds, and the attack's ROC
    assert "Membership-inference" in "\n".join(str(s.value) for s in at.subheader)
    shown = "\n".join(str(d.value) for d in at.dataframe)
    assert "hospital-2" in shown and "all sites" in shown


def test_privacy_page_says_which_command_makes_what_is_missing(monkeypatch, tmp_path):
    from streamlit.testing.v1 import AppTest

    monkeypatch.setenv("FEDBRAIN_WORKSPACE", str(tmp_path))
    at = AppTest.from_string("from fedbrain.dashboard.views import privacy_page\nprivacy_page()",
                             default_timeout=60).run()
    assert not at.exception
    assert "fedbrain simulate --dp-epsilon" in "\n".join(str(i.value) for i in at.info)


def test_epsilon_inf_is_the_same_schedule_without_privacy():
    from fedbrain.cli.options import epsilon_budget

    cfg = DPSGDConfig(epsilon=float("inf"), sample_rate=0.2)
    assert cfg.enabled and not cfg.private
    assert epsilon_budget("inf") == float("inf") and epsilon_budget("3") == 3.0
    with pytest.raises(PrivacyBudgetError.__mro__[1]):
        PrivateTraining(create_model("fedbrain_cnn_v2", pretrained=False), cfg, 100, 10)
    job = JobSettings.create(dp_epsilon=float("inf"), dp_sample_rate=0.2)
    assert JobSettings.from_dict(json.loads(json.dumps(job.to_dict()))).dp_sgd() == job.dp_sgd()
    assert SitePolicy(dp_epsilon=8).apply(cfg).epsilon == 8  # a site's policy still imposes its budget


# ---------------------------------------------------------------- the policy as NVFlare's filter


def _result(meta: dict, metrics: dict):
    from nvflare.app_common.abstract.fl_model import FLModel
    from nvflare.app_common.utils.fl_model_utils import FLModelUtils

    return FLModelUtils.to_shareable(FLModel(params={"w": np.zeros(2, np.float32)}, metrics=metrics, meta=meta))


def _ctx(task: str):
    from nvflare.apis.fl_constant import FLContextKey
    from nvflare.apis.fl_context import FLContext

    ctx = FLContext()
    ctx.set_prop(FLContextKey.TASK_NAME, task, private=True, sticky=False)
    return ctx


def test_the_policy_filter_refuses_results_without_dp_and_strips_training_scalars(tmp_path):
    from nvflare.apis.dxo import MetaKey, from_shareable

    from fedbrain.fl.policy_filter import SitePolicyFilter

    policy = tmp_path / "p.json"
    flt = SitePolicyFilter(str(policy))
    metrics = {"val_score": 0.5, "train_loss": 0.3, "profile_hist_mean_3": 4, "train_count_0": 7}
    plain = _result({}, metrics)
    assert flt.process(plain, _ctx("train")) is plain  # no policy file: everything passes unchanged
    policy.write_text('{"dp_epsilon": 3}')
    with pytest.raises(PolicyError, match="requires record-level DP"):
        flt.process(_result({}, metrics), _ctx("train"))
    with pytest.raises(PolicyError, match="allows ε ≤ 3"):
        flt.process(_result({"dp_mechanism": "dp-sgd", "dp_epsilon": 5.0}, metrics), _ctx("train"))
    with pytest.raises(PolicyError, match="not an update this site's DP mechanism produced"):
        flt.process(_result({"dp_mechanism": "dp-sgd", "dp_epsilon": 2.0}, metrics), _ctx("train"))
    SitePolicy.read(policy).ledger("").record_release(weights_digest({"w": np.zeros(2, np.float32)}))
    ok = flt.process(_result({"dp_mechanism": "dp-sgd", "dp_epsilon": 2.0}, metrics), _ctx("train"))
    assert from_shareable(ok).meta[MetaKey.INITIAL_METRICS] == {"val_score": 0.5, "train_count_0": 7}
    flt.process(_result({}, {}), _ctx("submit_model"))  # the model a site already released, sent again


@pytest.mark.slow
def test_the_policy_filter_stops_a_job_that_ignores_the_sites_policy(tmp_path, monkeypatch, capsys):
    """The job's site code is pointed at an empty policy (as a job that ignored the site's would be), while the
    hospital's own file requires DP: NVFlare's result filter refuses to send its update, and the run fails."""
    empty, strict = tmp_path / "none.json", tmp_path / "strict.json"
    empty.write_text("{}")
    strict.write_text('{"dp_epsilon": 3}')
    monkeypatch.setenv("FEDBRAIN_PRIVACY_POLICY", str(empty))
    ws = tmp_path / "ws"
    rc = main(["simulate", "--set", "data.max_images_per_site=30", "--rounds", "1", "--model", "fedbrain_cnn_v2",
               "--set", "cross_site_eval=false", "--site-policy", f"hospital-2={strict}", "--workspace", str(ws)])
    assert rc == 3
    run = next(d for d in ws.iterdir() if (d / "config.json").is_file())
    from fedbrain.runs import read_metrics

    assert "hospital-2" not in {r["site"] for r in read_metrics(run / "server_audit.jsonl")}
    logs = "\n".join(p.read_text() for p in (run / "nvflare").rglob("log.txt"))
    assert "requires record-level DP, and the update was not trained by DP-SGD" in logs


@pytest.mark.slow
def test_exclude_twins_of_a_run_leaves_out_every_image_it_recorded(sim_run):
    """Public pretraining without the federation's scans: the same images as a run's splits are all left out."""
    from fedbrain.cli.main import build_parser
    from fedbrain.cli.options import load_federation

    args = build_parser().parse_args(["train", "--set", "data.max_images_per_site=30"])
    before = load_federation(args, progress=False)
    args = build_parser().parse_args(["train", "--set", "data.max_images_per_site=30",
                                      "--set", f"data.exclude_twins_of={sim_run}"])
    fed = load_federation(args, progress=False)
    assert all(not recs for s in fed.sites.values() for recs in s.splits.values())
    dropped = fed.summary["excluded_twins"]["dropped"]
    assert dropped == {n: {k: len(v) for k, v in s.splits.items()} for n, s in before.sites.items()}


def test_the_none_augmentation_leaves_images_as_they_are():
    from fedbrain.contract import AUGMENTATIONS
    from fedbrain.data.dataset import BatchLoader

    assert not AUGMENTATIONS["none"].changes_images and AUGMENTATIONS["standard"].changes_images
    ds = _Images(16)
    (a, _), = list(BatchLoader(ds, 16, train=False))
    (b, _), = list(BatchLoader(ds, 16, train=True, augmentation=AUGMENTATIONS["none"]))
    assert torch.equal(a.sort(0).values, b.sort(0).values)


@pytest.mark.slow
def test_compare_dp_curve_runs_one_row_per_budget_at_the_same_epochs(tmp_path):
    import csv

    rc = main(["compare", "--set", "data.max_images_per_site=30", "--rounds", "2", "--model", "fedbrain_cnn_v2",
               "--algorithms", "--no-baselines", "--dp-curve", "inf", "8", "--set", "dp_sample_rate=0.5",
               "--workspace", str(tmp_path)])
    assert rc == 0
    run = next(tmp_path.iterdir())
    rows = [r for r in csv.DictReader((run / "compare.csv").open()) if r["site"] == "union"]
    assert [r["mode"] for r in rows] == ["fedavg dp-sgd ε=inf", "fedavg dp-sgd ε=8"]
    assert rows[0]["dp_epsilon"] == "inf" and 0 < float(rows[1]["dp_epsilon"]) <= 8
    assert rows[0]["rounds"] == rows[1]["rounds"]  # the same epochs: rounds = epochs / sampling rate
    assert main(["compare", "--dp-epsilon", "8", "--workspace", str(tmp_path / "x")]) == 2
