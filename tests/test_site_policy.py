"""Attacks on a hospital's privacy policy (issue 28, findings 3, 4, 5, 8, 9): each test performs the attack and
asserts that it now fails."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from fedbrain.cli.main import main
from fedbrain.data.readers import Record
from fedbrain.dp import DPSGDConfig, PrivateTraining, SiteLedger, group_privacy
from fedbrain.fl.policy import PolicyError, SitePolicy
from fedbrain.fl.privacy import weights_digest
from fedbrain.models import create_model

WEIGHTS = {"conv.weight": np.arange(2000, dtype=np.float32).reshape(20, 100)}  # "raw" local weights


def _policy(tmp_path: Path, **fields) -> Path:
    path = tmp_path / "local" / "fedbrain_privacy.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"dp_epsilon": 3, **fields}))
    return path


def _shareable(params=None, metrics=None, meta=None):
    from nvflare.app_common.abstract.fl_model import FLModel
    from nvflare.app_common.utils.fl_model_utils import FLModelUtils

    return FLModelUtils.to_shareable(FLModel(params=params, metrics=metrics, meta=meta or {}))


def _ctx(task: str = "train", site: str = "hospital-a"):
    from nvflare.apis.fl_constant import FLContextKey
    from nvflare.apis.fl_context import FLContext

    ctx = FLContext()
    ctx.set_prop(FLContextKey.TASK_NAME, task, private=True, sticky=False)
    ctx.set_prop(FLContextKey.CLIENT_NAME, site, private=False, sticky=True)
    ctx.get_identity_name = lambda default="": site  # the site's NVFlare identity, as its engine gives it
    return ctx


def _filter(policy: Path):
    from fedbrain.fl.policy_filter import SitePolicyFilter

    return SitePolicyFilter(str(policy))


# ---------------------------------------------------------------- finding 3: the filter trusts labels


def test_raw_weights_labelled_dp_sgd_by_the_job_are_refused(tmp_path):
    policy = _policy(tmp_path)
    labelled = {"dp_mechanism": "dp-sgd", "dp_epsilon": 0.5}  # what a careless (or hostile) job writes
    with pytest.raises(PolicyError, match="not an update this site's DP mechanism produced"):
        _filter(policy).process(_shareable(WEIGHTS, {"val_score": 0.5}, labelled), _ctx())
    # the same weights pass once the site's own DP mechanism has recorded releasing them
    SitePolicy.read(policy).ledger("hospital-a").record_release(weights_digest(WEIGHTS))
    assert _filter(policy).process(_shareable(WEIGHTS, {"val_score": 0.5}, labelled), _ctx()) is not None
    # another site's release does not let them out of this one
    with pytest.raises(PolicyError, match="not an update"):
        _filter(policy).process(_shareable(WEIGHTS, {}, labelled), _ctx(site="hospital-b"))


def test_weights_sent_as_metrics_are_refused(tmp_path):
    policy = _policy(tmp_path)
    as_array = {"val_score": 0.5, "hidden": WEIGHTS["conv.weight"].ravel().tolist()}
    with pytest.raises(PolicyError, match="array of 2000 numbers"):
        _filter(policy).process(_shareable(metrics=as_array), _ctx("validate"))
    as_scalars = {f"w_{i}": float(v) for i, v in enumerate(WEIGHTS["conv.weight"].ravel())} | \
        {f"x_{i}": 0.0 for i in range(3000)}
    with pytest.raises(PolicyError, match="numbers as metrics"):
        _filter(policy).process(_shareable(metrics=as_scalars), _ctx("validate"))
    ok = _filter(policy).process(_shareable(metrics={"val_score": 0.5, "val_cm_0_0": 3}), _ctx("validate"))
    assert ok is not None  # a site's real scalar metrics still leave


def test_a_result_that_is_not_a_dxo_is_refused(tmp_path):
    from nvflare.apis.shareable import Shareable

    raw = Shareable()
    raw["weights"] = WEIGHTS["conv.weight"]
    with pytest.raises(PolicyError, match="not a DXO"):
        _filter(_policy(tmp_path)).process(raw, _ctx())


def test_a_job_carries_configuration_only_and_sites_run_their_installed_pinned_fedbrain(tmp_path):
    import fedbrain
    from fedbrain.fl.executor import JobRefused, installed_site_script
    from fedbrain.fl.recipes import build_recipe
    from fedbrain.settings import JobSettings

    build_recipe(JobSettings.create(cross_site_eval=False), ["a", "b"]).export(job_dir=str(tmp_path))
    assert not [p for p in tmp_path.rglob("*.py")]  # no code travels with the job
    client = json.loads(next(tmp_path.rglob("config_fed_client.json")).read_text())["executors"][0]["executor"]
    assert client["args"]["task_script_path"] == "fedbrain.fl.site"
    assert client["args"]["fedbrain_version"] == fedbrain.__version__
    assert installed_site_script("fedbrain.fl.site", fedbrain.__version__) == str(
        Path(fedbrain.__file__).parent / "fl" / "site.py")
    with pytest.raises(JobRefused, match="built for fedbrain 0.0.1"):
        installed_site_script("fedbrain.fl.site", "0.0.1")
    with pytest.raises(JobRefused, match="runs only its installed"):  # a job naming its own script
        installed_site_script("custom/site.py", fedbrain.__version__)


# ---------------------------------------------------------------- finding 4: no bound on a site's total ε


def _train_one_job(ledger: SiteLedger, policy: SitePolicy, key: str, epsilon: float) -> PrivateTraining:
    """What the site script does for one job: admission against the lifetime budget, then DP-SGD accounting."""
    policy.admit(ledger, key, epsilon)
    model = create_model("fedbrain_cnn_gn", pretrained=False)
    private = PrivateTraining(model, DPSGDConfig(epsilon=epsilon, sample_rate=0.25), 64, 4, ledger=ledger.job(key))
    while private.can_step():
        private.record_step()
    private.save()
    return private


def test_a_new_job_cannot_reset_the_sites_spend_and_the_lifetime_budget_refuses_it(tmp_path):
    policy = SitePolicy.read(_policy(tmp_path, dp_epsilon=3, lifetime_epsilon=5))
    ledger = policy.ledger("hospital-a")
    first = _train_one_job(ledger, policy, ledger.job_key("job-1:/logs/a", resume=False), 3.0)
    assert ledger.spent()[0] == pytest.approx(first.epsilon) and first.epsilon > 2.5
    # a second job that picks a fresh log folder (the old per-job reset) still sees the site's spend
    key = ledger.job_key("job-1:/logs/a", resume=False)
    assert key != "job-1:/logs/a"  # the same name without resume never reuses an entry
    with pytest.raises(PolicyError, match="lifetime privacy budget ε=5 .* has 2.* left"):
        _train_one_job(ledger, policy, key, 3.0)
    assert ledger.path.parent == policy.ledger("hospital-a").path.parent == Path(policy.source).parent


@pytest.mark.slow
def test_two_jobs_in_a_row_at_one_site_the_second_is_refused_when_the_lifetime_budget_is_spent(tmp_path,
                                                                                                monkeypatch):
    """The real simulator, twice, with every hospital's policy in its own folder (outside both jobs' run
    folders): the first job spends its ε, the second finds the lifetime budget short and is refused."""
    from fedbrain.runs import RunDir, read_metrics

    hospital = tmp_path / "hospital"
    policy = _policy(hospital, dp_epsilon=2, lifetime_epsilon=3)
    monkeypatch.setenv("FEDBRAIN_PRIVACY_POLICY", str(policy))
    args = ["simulate", "--set", "data.max_images_per_site=40", "--rounds", "1", "--model", "fedbrain_cnn_v2",
            "--dp-epsilon", "2", "--set", "dp_sample_rate=0.5", "--set", "cross_site_eval=false"]
    assert main([*args, "--workspace", str(tmp_path / "ws1")]) == 0
    run1 = RunDir(next(d for d in (tmp_path / "ws1").iterdir() if (d / "config.json").is_file()))
    ledgers = sorted(policy.parent.glob("fedbrain_ledger.*.json"))
    assert len(ledgers) == 3  # one per site, in the hospital's folder, not the run's
    site = ledgers[0].name.split(".")[1]
    spent = SiteLedger(ledgers[0]).spent()[0]
    assert 1.5 < spent <= 2.1
    rows = [r for r in read_metrics(run1.site_metrics(site)) if r["split"] == "train"]
    assert rows[-1]["dp_site_epsilon"] == pytest.approx(spent)
    assert main([*args, "--workspace", str(tmp_path / "ws2")]) != 0
    run2 = next(d for d in (tmp_path / "ws2").iterdir() if (d / "config.json").is_file())
    logs = "\n".join(p.read_text() for p in (run2 / "nvflare").rglob("log.txt"))
    assert "lifetime privacy budget ε=3" in logs and "refused before training" in logs
    assert SiteLedger(ledgers[0]).spent()[0] == pytest.approx(spent)  # the refused job spent nothing


# ---------------------------------------------------------------- finding 5: ε per image, not per patient


def test_epsilon_per_patient_is_group_privacy_over_the_most_slices_of_one_patient():
    from fedbrain.fl.site import slices_per_patient

    records = [Record(f"{i}.png", "glioma", patient_id=f"p{i % 3}") for i in range(13)]  # p0 has 5 slices
    assert slices_per_patient(records) == 5
    assert slices_per_patient([Record("a.png", "glioma")]) == 1  # no patient ids: per image
    eps, delta = group_privacy(0.5, 1e-5, 5)
    assert eps == pytest.approx(2.5) and delta == pytest.approx(5 * np.exp(4 * 0.5) * 1e-5)
    assert group_privacy(8, 1e-5, 13)[1] == 1.0  # a bound that says nothing is stated as nothing (δ = 1)


def test_the_split_file_keeps_patient_ids_at_the_site(tmp_path):
    from fedbrain.data.federation import SiteData

    site = SiteData("h", "multiclass", {"train": [Record("a.png", "glioma", "train", "p7")], "val": [], "test": []},
                    {})
    site.write_split_file(tmp_path / "h.csv")
    assert SiteData.read_split_file("h", tmp_path / "h.csv").splits["train"][0].patient_id == "p7"


# ---------------------------------------------------------------- finding 8: counts and queries outside accounting


def test_under_dp_label_counts_leave_once_noised_and_are_charged_to_the_sites_ledger(tmp_path):
    from fedbrain.fl.site import released_counts
    from fedbrain.settings import JobSettings

    ledger = SitePolicy.read(_policy(tmp_path)).ledger("hospital-a")
    exact = np.array([120, 80, 0, 45])
    job = JobSettings.create(dp_epsilon=3)
    entry = ledger.job(ledger.job_key("job", resume=False))
    sent = released_counts(exact, job, entry)
    assert released_counts(exact, job, entry) == sent  # released once: a resumed job sends the same numbers
    assert ledger.spent()[0] == pytest.approx(job.dp_count_epsilon)
    draws = np.array([released_counts(exact, job, None) for _ in range(200)])
    assert (draws != exact).any(axis=1).mean() > 0.9  # noised, not the exact counts
    unclipped = exact > 0  # (an empty class's noisy count is clipped at 0, so its mean sits above it)
    assert abs(draws.mean(0) - exact)[unclipped].max() < 4  # still near them (Laplace scale 1/0.1 = 10, s.e. 1)


def test_evaluation_beyond_the_sites_query_limit_is_refused(tmp_path):
    policy = SitePolicy.read(_policy(tmp_path, max_eval_queries=2))
    ledger = policy.ledger("hospital-a")
    assert [ledger.count_query(policy.max_eval_queries) for _ in range(4)] == [True, True, False, False]
    assert SitePolicy.read(_policy(tmp_path, max_eval_queries=2)).ledger("hospital-a").state()["eval_queries"] == 2
    with pytest.raises(PolicyError, match="max_eval_queries must be an integer"):
        SitePolicy(max_eval_queries=-1)


# ---------------------------------------------------------------- finding 9: dashboard and model cards


def test_a_remote_client_claiming_host_localhost_is_refused():
    from streamlit import config
    from streamlit.web.server.starlette.starlette_websocket import is_host_allowed

    from fedbrain.dashboard.launch import allowed_hosts, streamlit_command

    cmd = streamlit_command(host="10.0.0.5")
    assert [cmd[i + 1] for i, a in enumerate(cmd) if a == "--server.allowedHosts"] == ["10.0.0.5"]
    before = config.get_option("server.allowedHosts")
    try:
        config.set_option("server.allowedHosts", list(allowed_hosts("10.0.0.5")))
        assert not is_host_allowed("localhost:8501") and not is_host_allowed("127.0.0.1")  # the lie is refused
        assert is_host_allowed("10.0.0.5:8501")
        config.set_option("server.allowedHosts", list(allowed_hosts("127.0.0.1")))
        assert is_host_allowed("localhost:8501")  # on a loopback bind only local peers can connect at all
    finally:
        config.set_option("server.allowedHosts", before)
    for wildcard in ("0.0.0.0", "::"):
        with pytest.raises(ValueError, match="every interface"):
            allowed_hosts(wildcard)


def test_the_dashboard_refuses_a_wildcard_bind_with_a_one_line_error(tmp_path, capsys):
    rc = main(["dashboard", "--workspace", str(tmp_path), "--host", "0.0.0.0", "--print-command"])
    err = capsys.readouterr().err
    assert rc != 0 and "every interface" in err and "streamlit" not in capsys.readouterr().out


def test_a_model_card_asking_for_huge_layers_is_refused_before_allocating(tmp_path):
    import tracemalloc

    from fedbrain.checkpoint import MAX_MODEL_NUMBERS, CheckpointError, ModelCard, load_checkpoint, save_checkpoint
    from fedbrain.models import default_preprocessing

    model = create_model("fedbrain_cnn_gn", pretrained=False)
    card = ModelCard(model="fedbrain_cnn_gn", preprocessing=default_preprocessing("fedbrain_cnn_gn"),
                     supervised_granularity="multiclass")
    path = save_checkpoint(tmp_path / "m.pt", model, card)
    payload = torch.load(path, weights_only=True)
    payload["model"]["kwargs"]["width"] = 4000.0  # ~2·10^12 weights
    torch.save(payload, path)
    tracemalloc.start()
    with pytest.raises(CheckpointError, match="refused before allocating"):
        load_checkpoint(path)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 50e6
    grown = card.replace(pruned={"layers": {"classifier": {"type": "Linear", "in_features": 10 ** 6,
                                                           "out_features": MAX_MODEL_NUMBERS // 10 ** 6 + 1}}})
    with pytest.raises(CheckpointError, match="refused before allocating"):
        grown.build_model()  # a "pruned" card that grows a layer


def test_the_audit_and_the_privacy_page_show_the_sites_total_and_per_patient_epsilon():
    from fedbrain.dashboard.readers import membership_table
    from fedbrain.privacy_audit import privacy_spent

    rows = [{"site": "h", "split": "train", "round": r, "dp_mechanism": "dp-sgd", "dp_epsilon": e,
             "dp_site_epsilon": e + 4, "dp_patient_epsilon": 13 * e, "dp_slices_per_patient": 13}
            for r, e in ((0, 0.5), (1, 1.0))]
    spent = privacy_spent(rows)["h"]
    assert (spent["final_epsilon"], spent["site_epsilon"], spent["patient_epsilon"]) == (1.0, 5.0, 13.0)
    table = membership_table({"privacy": {"h": spent}, "membership": {"sites": {"h": {"skipped": "-"}}}})
    assert table.loc[0, ["ε site (all jobs)", "ε per patient", "slices per patient"]].tolist() == [5.0, 13.0, 13]
