"""Watching and managing runs (issue 15): status.json, `fedbrain runs`, numeric flags, the live dashboard.

Everything goes through the real entry point (`fedbrain.cli.main.main`, or the installed `fedbrain` script).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from fedbrain.cli.main import main
from fedbrain.runs import RunDir, read_metrics, write_json
from fedbrain.status import FAILED, FINISHED, RUNNING, StatusWriter, progress_text, read_status

FEDBRAIN = Path(sys.executable).with_name("fedbrain")


# ---------------------------------------------------------------- numeric flags: one line, exit 2, nothing left


@pytest.mark.parametrize("argv, flag", [
    (["simulate", "--rounds", "0"], "--rounds"),
    (["simulate", "--rounds", "-1"], "--rounds"),
    (["simulate", "--dp-epsilon", "-1"], "--dp-epsilon"),
    (["compare", "--rounds", "0"], "--rounds"),
    (["train", "--epochs", "0"], "--epochs"),
    (["train", "--lr", "nan"], "--lr"),
    (["train", "--batch-size", "0"], "--batch-size"),
    (["bench", "models", "--rounds", "0"], "--rounds"),
    (["dashboard", "--port", "70000"], "--port"),
    (["runs", "--limit", "-1"], "--limit"),
    (["compress", "x.pt", "--calib-images", "0"], "--calib-images"),
])
def test_bad_numeric_flags_are_one_line_and_exit_2(argv, flag, tmp_path, capsys):
    ws = tmp_path / "ws"
    ws.mkdir()
    with pytest.raises(SystemExit) as exc:
        main(argv if argv[0] == "compress" else [*argv, "--workspace", str(ws)])
    err = capsys.readouterr().err
    assert exc.value.code == 2
    assert len(err.strip().splitlines()) == 1, err
    assert f"argument {flag}" in err and "error:" in err
    assert not any(ws.iterdir()), "a run folder was left behind"


def test_the_installed_command_rejects_a_bad_value_before_any_work(tmp_path):
    proc = subprocess.run([str(FEDBRAIN), "simulate", "--rounds", "0", "--workspace", str(tmp_path)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert "--rounds: must be at least 1, not 0" in proc.stderr and not list(tmp_path.iterdir())


def test_version_and_dashboard_flags(tmp_path, capsys):
    from fedbrain import __version__

    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0 and capsys.readouterr().out.strip() == f"fedbrain {__version__}"
    assert main(["dashboard", "--workspace", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "is not a folder" in err
    assert main(["dashboard", "--workspace", str(tmp_path), "--host", "10.0.0.5", "--print-command"]) == 0
    cap = capsys.readouterr()
    assert "--server.address 10.0.0.5" in cap.out and "--server.allowedHosts 10.0.0.5" in cap.out
    assert "authenticating reverse proxy" in cap.err


# ---------------------------------------------------------------- status.json


def test_status_writer_reports_progress_eta_and_final_state(tmp_path):
    run = RunDir(tmp_path / "run")
    w = StatusWriter(run, kind="federated", total=10, done=0, unit="round")
    assert read_status(run)["state"] == "starting"
    w.progress(1, 10, round=0)
    time.sleep(0.05)
    doc = w.progress(3, 10, round=2)
    assert doc["state"] == RUNNING and doc["eta_s"] is not None and doc["eta_s"] > 0
    assert progress_text(read_status(run)).startswith("running, 3 of 10 rounds done (last: round 2), ETA")
    w.finish(FINISHED)
    st = read_status(run)
    assert st["state"] == FINISHED and st["finished"] and st["eta_s"] is None
    with pytest.raises(ValueError):
        w.finish("running")


def test_a_run_whose_process_died_reads_as_failed(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    run = RunDir(tmp_path / "run")
    StatusWriter(run, total=5, done=0).progress(2, 5)
    doc = json.loads(run.status.read_text())
    doc["pid"] = dead.pid
    write_json(run.status, doc)
    st = read_status(run)
    assert st["state"] == FAILED and "ended without finishing" in st["error"] and "--resume" in st["error"]


def test_runs_without_a_status_file_get_an_inferred_state(tmp_path):
    old = RunDir(tmp_path / "old")
    old.write_config(kind="federated")
    assert read_status(old) == {"state": "unknown", "inferred": True}
    old.write_results({"test": {}})
    assert read_status(old)["state"] == FINISHED


def test_a_jsonl_tail_reads_only_complete_new_lines(tmp_path):
    from fedbrain.runs import JsonlTail

    log = tmp_path / "metrics.jsonl"
    log.write_text('{"round": 0}\n')
    tail = JsonlTail(log)  # what was there before is not new
    assert tail.read() == []
    with log.open("a") as fh:
        fh.write('{"round": 1}\n{"rou')
    assert tail.read() == [{"round": 1}]  # the line still being written waits
    with log.open("a") as fh:
        fh.write('nd": 2}\nnot json\n')
    assert tail.read() == [{"round": 2}] and tail.read() == []
    assert JsonlTail(tmp_path / "missing.jsonl").read() == []


def _fake_runs(ws: Path) -> dict[str, RunDir]:
    """A finished, a failed (dead process) and a running (this process) federated run."""
    runs = {}
    for name, state in (("done", FINISHED), ("broken", FAILED), ("live", RUNNING)):
        run = RunDir(ws / name)
        run.write_config(kind="federated", model="fedbrain_cnn_gn", algorithm="fedavg")
        w = StatusWriter(run, kind="federated", total=4, done=0, unit="round",
                         sites={"hospital-1": {}, "hospital-2": {}})
        w.progress(2, 4, round=1, sites={"hospital-1": {"last_contact": "2026-12-02T06:00:00+00:00",
                                                        "last_round": 1}})
        if state == FINISHED:
            run.write_results({"test": {"union": {"macro_f1": 0.75, "n": 10}}})
            w.finish(FINISHED)
        elif state == FAILED:
            w.finish(FAILED, error="1 site(s) failed: hospital-2",
                     site_errors={"hospital-2": "RuntimeError: fault injection"})
        runs[name] = run
    return runs


def test_runs_lists_shows_follows_and_stops(tmp_path, capsys):
    ws = tmp_path / "ws"
    runs = _fake_runs(ws)
    assert main(["runs", "--workspace", str(ws)]) == 0
    out = capsys.readouterr().out
    lines = {ln.split()[0]: ln for ln in out.splitlines()[2:]}
    assert set(lines) == {"done", "broken", "live"}
    assert "finished" in lines["done"] and "macro-F1 0.750" in lines["done"]
    assert "failed" in lines["broken"] and "running" in lines["live"] and "2/4" in lines["live"]

    assert main(["runs", "--workspace", str(ws), "show", "broken"]) == 0
    out = capsys.readouterr().out
    assert "fault injection" in out and "hospital-1" in out and "2026-12-02T06:00:00" in out
    assert main(["runs", "show", str(runs["live"]), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["status"]["state"] == RUNNING

    assert main(["runs", "follow", str(runs["done"])]) == 0
    assert "finished, 2 of 4 rounds done" in capsys.readouterr().out
    assert main(["runs", "follow", str(runs["broken"])]) == 1
    assert main(["runs", "follow", str(runs["live"]), "--interval", "0.1", "--timeout", "0.3"]) == 4

    assert main(["runs", "stop", str(runs["done"])]) == 2
    assert "is not running (state: finished)" in capsys.readouterr().err
    assert main(["runs", "--workspace", str(ws), "stop", "live"]) == 0
    assert runs["live"].stop_request.is_file() and read_status(runs["live"])["stop_requested"]
    assert main(["runs", "show", "nosuch", "--workspace", str(ws)]) == 2


# ---------------------------------------------------------------- the dashboard


def _page() -> AppTest:
    return AppTest.from_string("from fedbrain.dashboard.views import federation_page\nfederation_page()",
                               default_timeout=60)


def test_federation_page_opens_the_live_run_and_never_a_failed_one(tmp_path, monkeypatch):
    ws = tmp_path / "ws"
    runs = _fake_runs(ws)
    monkeypatch.setenv("FEDBRAIN_WORKSPACE", str(ws))
    at = _page().run()
    assert not at.exception, [e.value for e in at.exception]
    assert at.selectbox(key="fed_run").value == "live"
    assert "2 of 4 rounds done" in "\n".join(str(p.proto.text) for p in at.get("progress"))

    runs["live"].status.unlink()  # no run is live any more: the newest that did not fail is the default
    (ws / "live").rename(tmp_path / "gone")
    os.utime(runs["broken"].config, None)  # the failed run is the newest
    at = _page().run()
    assert at.selectbox(key="fed_run").value == "done"
    at.selectbox(key="fed_run").set_value("broken").run()
    assert not at.exception
    errors = "\n".join(str(e.value) for e in at.error)
    assert "This run **failed**: 1 site(s) failed: hospital-2" in errors
    assert "fault injection" in "\n".join(str(c.value) for c in at.code)


# ---------------------------------------------------------------- a real run, stopped from the command line


@pytest.mark.slow
def test_stop_a_running_simulation_with_live_metrics_and_mlflow(tmp_path):
    """`fedbrain simulate` writes its metrics while it runs; `fedbrain runs stop` ends it after a round; the
    models so far are evaluated; MLflow (NVFlare experiment tracking) holds every site's rounds."""
    ws = tmp_path / "ws"
    rounds = 60
    log = tmp_path / "simulate.log"
    with log.open("wb") as fh:
        sim = subprocess.Popen([str(FEDBRAIN), "simulate", "--set", "data.max_images_per_site=40",
                                "--rounds", str(rounds),
                                "--set", "cross_site_eval=false", "--set", "tracking=mlflow",
                                "--set", "validations=0",  # every round validated: global rows from round 0
                                "--workspace", str(ws)],
                               stdout=fh, stderr=subprocess.STDOUT, env={**os.environ, "FEDBRAIN_OFFLINE": "1"})
    try:
        deadline = time.monotonic() + 240
        run = None
        while True:
            assert sim.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            found = [RunDir(d) for d in ws.glob("*") if (d / "status.json").is_file()] if ws.is_dir() else []
            if found and (read_status(found[0]).get("done") or 0) >= 3:
                run = found[0]
                break
            time.sleep(0.5)
        live = read_metrics(run.metrics)  # the run log grows while the run is live
        assert {r["site"] for r in live if r.get("split") == "train"} == {"hospital-1", "hospital-2", "hospital-3"}
        assert any(r["site"] == "global" for r in live)
        proc = subprocess.run([str(FEDBRAIN), "runs", "stop", str(run), "--wait", "300"], capture_output=True,
                              text=True, timeout=360)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert "stop requested" in proc.stdout and "stopped" in proc.stdout
        assert sim.wait(timeout=120) == 0, log.read_text()[-3000:]
    finally:
        if sim.poll() is None:
            sim.kill()
            sim.wait(timeout=30)
    st = read_status(run)
    assert st["state"] == "stopped" and 3 <= st["done"] < rounds, st
    last = st["round"]
    assert run.results.is_file() and run.best.is_file()
    rows = read_metrics(run.metrics)
    assert max(r["round"] for r in rows if r.get("split") == "train") == last
    assert {r["round"] for r in rows if r.get("split") == "test"} == {last}

    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{run.mlflow_db}")
    experiment = client.get_experiment_by_name("fedbrain")
    tracked = client.search_runs([experiment.experiment_id])
    assert len(tracked) == 3
    for t in tracked:
        steps = [m.step for m in client.get_metric_history(t.info.run_id, "train_loss")]
        assert sorted(steps) == list(range(last + 1)), (t.info.run_name, steps)
