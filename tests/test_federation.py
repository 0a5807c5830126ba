"""Federation on NVFlare: a real simulator run, what sites send, differential privacy."""

from __future__ import annotations

import json
import math

import pytest
import torch

from fedbrain.checkpoint import load_checkpoint
from fedbrain.fl.metrics import SECURE_META
from fedbrain.fl.privacy import DPConfig, epsilon_after, privatize_update
from fedbrain.models import create_model
from fedbrain.runs import read_metrics
from fedbrain.secagg import CANARY, CANARY_SIZE
from fedbrain.settings import FEDERATED_MODEL

SITES = ["hospital-1", "hospital-2", "hospital-3"]


@pytest.mark.slow
def test_simulator_run_writes_the_documented_schema(sim_run):
    config = json.loads((sim_run / "config.json").read_text())
    assert config["kind"] == "federated" and config["algorithm"] == "fedavg"
    rows = read_metrics(sim_run / "metrics.jsonl")
    val = [r for r in rows if r["split"] == "val" and r.get("model") == "global"]
    # the final global model (after rounds 0 and 1) is always validated, by every site and pooled
    assert {(r["site"], r["round"]) for r in val} >= {(s, 2) for s in SITES + ["global"]}
    trained = [r for r in rows if r["split"] == "train"]
    assert {r["site"] for r in trained} == set(SITES) and all(r["samples"] > 0 for r in trained)
    results = json.loads((sim_run / "results.json").read_text())
    assert results["failed_sites"] == {}
    assert set(results["test"]) == set(SITES) | {"union"}
    probe = results["site_probe"]  # can the global model's features tell the hospitals apart?
    assert probe["chance"] == pytest.approx(1 / 3) and 0 <= probe["site_probe_balanced_accuracy"] <= 1
    model, card = load_checkpoint(sim_run / "checkpoints" / "best.pt")
    assert card.training["mode"] == "federated" and card.supervised_granularity == "binary"
    assert all(torch.isfinite(p).all() for p in model.state_dict().values() if p.is_floating_point())
    cse = json.loads((sim_run / "cross_site.json").read_text())
    assert set(cse["sites"]) == set(SITES) and cse["models"]
    assert (sim_run / "tensorboard").is_dir()


@pytest.mark.slow
def test_sites_send_only_weights_counts_and_scalar_metrics(sim_run):
    """The server-side audit of every update received: structure only, checked against the model."""
    audit = [json.loads(line) for line in (sim_run / "server_audit.jsonl").read_text().splitlines()]
    assert len(audit) == 2 * len(SITES)  # 2 rounds x 3 sites
    own = create_model(FEDERATED_MODEL).state_dict()
    expected = {k: list(v.shape) for k, v in own.items()} | {CANARY: [CANARY_SIZE]}  # secure aggregation (default)
    allowed_meta = {"NUM_STEPS_CURRENT_ROUND", "num_samples", "client_name", "current_round", "job_id",
                    "initial_metrics", "site_name", "props", SECURE_META}
    for row in audit:
        assert row["rejected"] is None
        assert set(row["params"]) == set(expected)
        for k, desc in row["params"].items():
            kind, _dtype, shape = desc.split(":")
            assert kind == "array" and json.loads(shape) == expected[k]
        assert row["metrics"] and all(t in ("float", "int") for t in row["metrics"].values()), row["metrics"]
        assert set(row["meta"]) <= allowed_meta, set(row["meta"]) - allowed_meta
        text = json.dumps(row)
        assert "/" not in text.replace("array:", "")  # no file paths
        assert ".jpg" not in text and ".png" not in text


def test_dp_clips_noises_and_accounts():
    g = {"w": torch.zeros(1000)}
    p = {"w": torch.full((1000,), 1.0)}  # update norm sqrt(1000) ~ 31.6
    out, info = privatize_update(p, g, DPConfig(clip=1.0, noise_multiplier=0.0), round_=0)
    assert torch.linalg.norm(out["w"]).item() == pytest.approx(1.0, rel=1e-4)
    out, info = privatize_update(p, g, DPConfig(clip=1.0, noise_multiplier=1.0), round_=0)
    assert torch.linalg.norm(out["w"] - 1.0 / math.sqrt(1000)).item() == pytest.approx(math.sqrt(1000), rel=0.1)
    e1, e5 = epsilon_after(1, 1.0, 1e-5), epsilon_after(5, 1.0, 1e-5)
    assert 0 < e1 < e5 < float("inf") and info["dp_epsilon"] == pytest.approx(e1)


def test_update_dp_releases_only_trained_weights_and_frozen_tensors_as_the_global_model_had_them():
    g = {"head": torch.zeros(100), "trunk": torch.ones(100), "running_var": torch.ones(10)}
    p = {"head": torch.full((100,), 0.5), "trunk": torch.ones(100), "running_var": torch.full((10,), 3.0)}
    out, _ = privatize_update(p, g, DPConfig(clip=1.0, noise_multiplier=1.0), round_=0, trained={"head"})
    assert torch.equal(out["trunk"], g["trunk"]) and torch.equal(out["running_var"], g["running_var"])
    assert not torch.equal(out["head"], p["head"])  # clipped and noised
    everything, _ = privatize_update(p, g, DPConfig(clip=1.0, noise_multiplier=1.0), round_=0)
    assert not torch.equal(everything["running_var"], g["running_var"])  # without the list: every float tensor


@pytest.mark.slow
@pytest.mark.parametrize("algorithm", ["fedavg", "scaffold"])
def test_dead_site_and_nan_update_do_not_stop_the_federation(tmp_path, algorithm):
    """hospital-3 crashes in round 1; hospital-2 sends NaN weights in round 0; min_clients=2 of 3.
    SCAFFOLD goes through the same validating aggregator and tolerates the dropout too."""
    from fedbrain.data.federation import build_federation, embedded_spec
    from fedbrain.fl.simulate import run_simulation
    from fedbrain.settings import JobSettings

    fed = build_federation(embedded_spec(max_images_per_site=30))
    settings = JobSettings.create(algorithm, rounds=3, min_clients=2, wait_after_min_s=5, cross_site_eval=False,
                                  extra_site_args="--fail-site hospital-3 --fail-at-round 1 "
                                                  "--corrupt-site hospital-2 --corrupt-at-round 0")
    out = run_simulation(fed, settings, tmp_path / "run")
    assert set(out["failed_sites"]) == {"hospital-3"}, out["failed_sites"]
    assert "fault injection" in out["failed_sites"]["hospital-3"]
    audit = [json.loads(line) for line in (tmp_path / "run" / "server_audit.jsonl").read_text().splitlines()]
    rejected = [(a["site"], a["round"]) for a in audit if a["rejected"]]
    assert rejected == [("hospital-2", 0)]
    accepted_rounds = {a["round"] for a in audit if not a["rejected"]}
    assert accepted_rounds == {0, 1, 2}  # every round completed with the remaining sites
    assert {a["site"] for a in audit if a["round"] == 2} == {"hospital-1", "hospital-2"}
    assert "test" in out  # a global model exists and was evaluated
    rounds = sorted(p.name for p in (tmp_path / "run" / "checkpoints" / "rounds").glob("round-*.pt"))
    assert rounds == ["round-0001.pt", "round-0002.pt"]  # persisted after every round; the newest two kept
    if algorithm == "scaffold":
        ctrl = torch.load(tmp_path / "run" / "checkpoints" / "rounds" / "round-0002.pt", weights_only=True)
        assert ctrl["scaffold_control"] and all(torch.isfinite(v).all() for v in ctrl["scaffold_control"].values())


@pytest.mark.slow
def test_resume_continues_at_the_next_round(sim_run, tmp_path):
    from fedbrain.cli.main import main

    rc = main(["simulate", "--set", "data.max_images_per_site=30", "--rounds", "1", "--set", "cross_site_eval=false",
               "--resume", str(sim_run), "--workspace", str(tmp_path)])
    assert rc == 0
    run = next(tmp_path.iterdir())
    rounds = {r["round"] for r in read_metrics(run / "metrics.jsonl") if r["split"] == "train"}
    assert rounds == {2}  # the fixture ran rounds 0 and 1
    _, card = load_checkpoint(run / "checkpoints" / "last.pt")
    assert card.training["start_round"] == 2


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_kill_9_mid_run_then_resume_accounts_for_every_round(tmp_path):
    """The whole simulation is killed (SIGKILL) once round 1 of 4 finished; --resume completes the rest in the
    same run folder: each round trained exactly once per site, and the results written."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from processes import stop_processes

    ws = tmp_path / "ws"
    argv = [sys.executable, "-m", "fedbrain.cli", "simulate", "--set", "data.max_images_per_site=30", "--rounds", "4",
            "--algorithm", "scaffold", "--set", "cross_site_eval=false", "--workspace", str(ws)]
    env = {**os.environ, "FEDBRAIN_OFFLINE": "1"}
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.monotonic() + 300
    marker = None
    while time.monotonic() < deadline and proc.poll() is None:
        found = [p for p in ws.glob("*/checkpoints/rounds/round-*.pt") if int(p.stem.split("-")[1]) >= 1]
        if found:
            marker = found[0]
            break
        time.sleep(0.2)
    assert marker is not None, "round 1 never finished"
    os.killpg(proc.pid, signal.SIGKILL)  # the whole simulation, server and sites, without warning
    proc.wait(timeout=30)
    stop_processes([], roots=[ws], grace=1.0)  # anything NVFlare started outside the process group
    run = marker.parents[2]
    assert not (run / "results.json").exists()

    from fedbrain.cli.main import main

    assert main(["simulate", "--resume", str(run)]) == 0
    rows = read_metrics(run / "metrics.jsonl")
    trained = sorted((r["site"], r["round"]) for r in rows if r["split"] == "train")
    assert trained == sorted((s, r) for s in SITES for r in range(4))  # every round once, none twice
    server = [json.loads(x) for x in (run / "server_rounds.jsonl").read_text().splitlines()]
    assert sorted((r["site"], r["round"]) for r in server if r.get("aggregated")) == trained
    assert sorted(p.name for p in (run / "checkpoints" / "rounds").glob("round-*.pt")) == [
        f"round-{r:04d}.pt" for r in (2, 3)]
    _, card = load_checkpoint(run / "checkpoints" / "last.pt")
    assert card.training["last_round"] == 3
    assert json.loads((run / "results.json").read_text())["failed_sites"] == {}


def test_a_bad_lever_is_a_usage_error(tmp_path, capsys):
    from fedbrain.cli.main import main

    # (numeric flags are the parser's: tests/test_live_runs.py); a lever the settings refuse is one line too
    assert main(["simulate", "--set", "finetune=no-such-layers", "--workspace", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fedbrain: error:") and len(err.strip().splitlines()) == 1 and "finetune" in err
    assert not any(tmp_path.iterdir())


def test_the_site_executor_shortens_nvflare_result_poll():
    from nvflare.app_common.executors.client_api import in_process_backend

    from fedbrain.fl.executor import POLL_INTERVAL_S, shorten_result_poll

    old = in_process_backend._RESULT_POLL_INTERVAL
    try:
        assert shorten_result_poll() and in_process_backend._RESULT_POLL_INTERVAL == POLL_INTERVAL_S < 0.5
    finally:
        in_process_backend._RESULT_POLL_INTERVAL = old


def test_the_servers_initial_model_is_drawn_from_the_jobs_seed():
    """NVFlare builds the initial global model in the server process: its weights follow the training seed,
    so a federation reruns to the same numbers (two runs of `fedbrain simulate` gave identical weights)."""
    import torch

    from fedbrain.fl.recipes import RegistryModel, build_recipe
    from fedbrain.settings import JobSettings

    def weights(seed):
        return torch.cat([p.detach().flatten() for p in RegistryModel("fedbrain_cnn_gn", seed=seed).parameters()])

    torch.manual_seed(123)
    before = torch.rand(1)
    assert torch.equal(weights(0), weights(0)) and not torch.equal(weights(0), weights(1))
    torch.manual_seed(123)
    weights(0)
    assert torch.equal(torch.rand(1), before), "building the model moved the caller's random stream"
    settings = JobSettings.create(rounds=1, cross_site_eval=False, train={"seed": 7})
    recipe = build_recipe(settings, ["a", "b"])
    assert recipe.model["args"]["seed"] == 7  # what the server's persistor builds the model from


@pytest.mark.slow
def test_with_dp_only_the_privatised_update_counts_and_validation_scalars_leave_a_site(tmp_path):
    """On the wire (the server's audit of every update, and the models cross-site evaluation collected):
    no update norm, no training loss, no training-image histograms, and each site's submitted model is the
    privatised update it already released, never its unclipped local model."""
    from nvflare.fuel.utils import fobs

    from fedbrain.cli.main import main
    from fedbrain.fl.privacy import weights_digest
    from fedbrain.runs import RunDir

    rc = main(["simulate", "--set", "data.max_images_per_site=30", "--rounds", "2", "--set", "dp_clip=1",
               "--set", "dp_noise=1", "--set", "secure_aggregation=false",
               "--workspace", str(tmp_path)])  # sites then submit their own models
    assert rc == 0
    run = next(d for d in tmp_path.iterdir() if (d / "config.json").is_file())
    audit = [json.loads(line) for line in (run / "server_audit.jsonl").read_text().splitlines()]
    assert len(audit) == 2 * len(SITES)
    for row in audit:
        assert {"dp_epsilon", "dp_delta"} <= set(row["meta"])
        assert not {"dp_update_norm", "dp_clip_scale"} & set(row["meta"]), row["meta"]
        assert "train_loss" not in row["metrics"]
        assert not [k for k in row["metrics"] if k.startswith("profile_")]
    shared = next(run.glob("nvflare/*/server/simulate_job/cross_site_val/model_shareables"))
    for site in SITES:
        released = [r["released_sha256"] for r in read_metrics(RunDir(run).site_metrics(site))
                    if r["split"] == "train"]
        assert len(released) == 2 and all(released)
        submitted = fobs.loadf(str(shared / site)).data
        assert weights_digest(submitted) == released[-1], site


def test_scaffold_with_dp_is_refused(tmp_path, capsys):
    from fedbrain.cli.main import main
    from fedbrain.settings import JobSettings

    with pytest.raises(ValueError, match="control variates"):
        JobSettings.create("scaffold", dp_clip=1.0, dp_noise=1.0)
    assert main(["simulate", "--algorithm", "scaffold", "--set", "dp_clip=1", "--set", "data.max_images_per_site=10",
                 "--workspace", str(tmp_path)]) != 0
    assert "control variates" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())  # refused before a run folder is made
