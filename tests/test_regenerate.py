"""`fedbrain results regenerate`: the registry of docs/results/, provenance stamps, the plan, resuming; and the
paired statistics of `fedbrain compare` (issue 26, item 4). No real training runs here: the runner is faked."""

from __future__ import annotations

import csv
import json
import math
import re
import shutil
import statistics
import subprocess
from pathlib import Path

import pytest

from fedbrain.cli.main import build_parser, main
from fedbrain.cli.options import run_config
from fedbrain.experiments import regenerate as regen
from fedbrain.experiments.compare import FIELDS, compare_table, summarise
from fedbrain.experiments.report import render_table
from fedbrain.experiments.stats import paired_difference, t_interval

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "docs" / "results"


# ---------------------------------------------------------------- synthetic compare rows


def _rows(seeds: int, fed_f1: list[float], central_f1: list[float]) -> list[dict]:
    rows = []
    for mode, kind, f1s in (("fedavg", "federated", fed_f1), ("centralized", "centralized", central_f1)):
        for seed in range(seeds):
            rows.append({"mode": mode, "kind": kind, "seed": seed, "site": "union", "n": 748, "n_no_tumor": 66,
                         "macro_f1": f1s[seed], "macro_f1_raw": f1s[seed] - 0.01 * (kind == "federated"),
                         "tumour_auroc": 0.95 + 0.001 * seed, "no_tumor_recall": 0.7, "accuracy": 0.8})
    return rows


FED, CENTRAL = [0.74, 0.71, 0.76, 0.73], [0.72, 0.72, 0.71, 0.70]


def _fake_compare_run(workspace: Path, rows: list[dict]) -> None:
    run = workspace / "compare-fedbrain_cnn_gn-20260101-000000"
    run.mkdir(parents=True)
    (run / "config.json").write_text("{}")
    (run / "status.json").write_text(json.dumps({"state": "finished"}))
    (run / "compare.json").write_text(json.dumps({"rows": rows, "summary": summarise(rows)}))
    with (run / "compare.csv").open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=FIELDS, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)


def _workspace_of(argv: list[str]) -> Path:
    return Path(argv[argv.index("--workspace") + 1])


class FakeRunner:
    """Stands in for `fedbrain ARGV`: records every call and writes what the real command would."""

    def __init__(self, fail: set[str] = frozenset()) -> None:
        self.calls: list[list[str]] = []
        self.fail = set(fail)

    def __call__(self, argv: list[str]) -> int:
        self.calls.append(argv)
        if argv[0] == "compare":
            _fake_compare_run(_workspace_of(argv), _rows(4, FED, CENTRAL))
        elif argv[0] == "simulate":
            run = Path(argv[argv.index("--resume") + 1]) if "--resume" in argv else \
                _workspace_of(argv) / f"fedavg-run{len(self.calls)}"
            run.mkdir(parents=True, exist_ok=True)
            (run / "config.json").write_text("{}")
            state = "running" if "simulate" in self.fail else "finished"
            (run / "status.json").write_text(json.dumps({"state": state}))
            self.fail.discard("simulate")
            return 1 if state == "running" else 0
        elif argv[0] == "compress":
            out = Path(argv[argv.index("--out") + 1])
            out.mkdir(parents=True)
            (out / "report.json").write_text(json.dumps({"rows": [], "checkpoint": argv[1]}))
            (out / "report.csv").write_text("variant\nfp32\n")
        elif argv[0] == "evaluate":
            Path(argv[argv.index("--json") + 1]).write_text(json.dumps({"union": {"macro_f1": 0.7}}))
        return 0


# ---------------------------------------------------------------- the registry


def test_every_committed_results_file_is_named_by_exactly_one_registry_entry():
    named = [f for e in regen.REGISTRY for f in e.files]
    on_disk = sorted(p.name for p in RESULTS.iterdir() if not p.name.endswith(".provenance.json"))
    assert sorted(named) == on_disk


def test_registry_commands_hold_no_machine_path_and_read_only_earlier_runs():
    order = [e.name for e in regen.REGISTRY]
    for entry in regen.REGISTRY:
        for argv in entry.commands:
            assert not [a for a in argv if a.startswith(("/", "~", "..", "workspace"))], entry.name
            for other in order:
                if f"{{run:{other}}}" in " ".join(argv):
                    assert other in entry.needs and order.index(other) < order.index(entry.name), entry.name


def test_every_registered_command_is_accepted_by_fedbrains_parser_and_its_settings_exist(tmp_path):
    parser = build_parser()
    for entry in regen.REGISTRY:
        for argv in entry.commands:
            filled = [re.sub(r"\{run(:\w+)?\}", "RUN", a).replace("{out}", str(tmp_path))
                      .replace("{data_root}", "DATA") for a in argv]
            args = parser.parse_args(filled)
            if hasattr(args, "set_values"):
                run_config(args)  # every --set key and value is checked against the settings


def test_the_three_hand_copied_tables_are_planned_and_captioned_as_hand_made():
    steps = {s.entry.name: s for s in regen.plan(RESULTS)}
    for name in ("architecture_search", "local_calibration", "bench_infer"):
        assert steps[name].reason == regen.HAND_MADE and not steps[name].run
    assert "Made: hand-made, no command." in render_table("bench_infer", RESULTS).splitlines()[0]


# ---------------------------------------------------------------- provenance and the plan


def test_a_stamp_records_commit_command_time_and_code_digest_json_in_place_csv_beside(tmp_path):
    js, cs = tmp_path / "a.json", tmp_path / "b.csv"
    js.write_text(json.dumps({"rows": []}))
    cs.write_text("x\n1\n")
    regen.stamp(js, ["fedbrain", "compare"], "abc1234")
    regen.stamp(cs, ["fedbrain", "compare"], "abc1234")
    doc = json.loads(js.read_text())
    assert doc["rows"] == [] and doc["provenance"]["command"] == ["fedbrain", "compare"]
    assert cs.read_text() == "x\n1\n"
    for path in (js, cs):
        prov = regen.read_provenance(path)
        assert prov["commit"] == "abc1234" and prov["code_digest"] == regen.code_digest()
        assert prov["written"][:2] == "20"
        assert regen.file_state(path) == regen.UP_TO_DATE


def test_the_plan_runs_missing_and_stale_files_and_keeps_up_to_date_ones(tmp_path):
    for stem in ("benchmark_compare", "benchmark_ablation"):
        for ext in ("json", "csv"):
            (tmp_path / f"{stem}.{ext}").write_text(json.dumps({"rows": []}) if ext == "json" else "x\n")
            regen.stamp(tmp_path / f"{stem}.{ext}", ["fedbrain"], "c0ffee0")
    older = json.loads((tmp_path / "benchmark_ablation.json").read_text())
    older["provenance"]["code_digest"] = "0" * 64
    (tmp_path / "benchmark_ablation.json").write_text(json.dumps(older))
    steps = {s.entry.name: s for s in regen.plan(tmp_path, ["benchmark_compare", "benchmark_ablation",
                                                            "leave_one_out", "evaluate_robust"])}
    assert (steps["benchmark_compare"].run, steps["benchmark_compare"].reason) == (False, regen.UP_TO_DATE)
    assert (steps["benchmark_ablation"].run, steps["benchmark_ablation"].reason) == (True, regen.STALE)
    assert (steps["leave_one_out"].run, steps["leave_one_out"].reason) == (True, regen.MISSING)
    assert steps["federation_robust"].run and "evaluate_robust" in steps["federation_robust"].reason
    assert "4 of 5 to run" in regen.describe(list(steps.values()))


def test_an_unknown_entry_is_a_one_line_error(tmp_path):
    with pytest.raises(regen.RegenerateError, match="unknown results nope"):
        regen.plan(tmp_path, ["nope"])


def test_dry_run_prints_the_plan_and_runs_nothing(tmp_path, monkeypatch, capsys):
    (tmp_path / "results").mkdir()
    (tmp_path / "results.md").write_text("# Results\n")
    runner = FakeRunner()
    monkeypatch.setattr(regen, "run_fedbrain", runner)
    assert main(["results", "regenerate", "leave_one_out", "--dry-run", "--doc", str(tmp_path / "results.md"),
                 "--workspace", str(tmp_path / "ws")]) == 0
    assert "run  leave_one_out" in capsys.readouterr().out and runner.calls == []


# ---------------------------------------------------------------- running (the runner faked)


def test_a_regenerated_file_is_copied_from_its_run_folder_stamped_and_rendered(tmp_path, monkeypatch):
    results = tmp_path / "docs" / "results"
    results.mkdir(parents=True)
    doc = tmp_path / "docs" / "results.md"
    doc.write_text("<!-- results:compare_paired -->\n<!-- /results:compare_paired -->\n")
    runner = FakeRunner()
    monkeypatch.setattr(regen, "run_fedbrain", runner)
    assert main(["results", "regenerate", "benchmark_compare", "--doc", str(doc), "--workspace",
                 str(tmp_path / "ws"), "--data-root", "DATA"]) == 0
    assert [a[0] for a in runner.calls] == ["compare"] and runner.calls[0][2] == "DATA"
    rows = json.loads((results / "benchmark_compare.json").read_text())["rows"]
    assert [r["macro_f1"] for r in rows if r["mode"] == "fedavg"] == FED
    prov = regen.read_provenance(results / "benchmark_compare.csv")
    assert prov["command"][:2] == ["fedbrain", "compare"] and "{data_root}" in prov["command"]
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    assert prov["commit"].removesuffix("-dirty") == head
    assert regen.file_state(results / "benchmark_compare.json") == regen.UP_TO_DATE
    assert "minus centralized" in doc.read_text() and "Made: commit" in doc.read_text()
    assert [s.run for s in regen.plan(results, ["benchmark_compare"])] == [False]


def test_resume_finishes_an_interrupted_run_in_place_and_never_reruns_a_finished_entry(tmp_path):
    results, ws = tmp_path / "results", tmp_path / "ws"
    results.mkdir()
    runner = FakeRunner(fail={"simulate"})
    with pytest.raises(regen.RegenerateError, match="federation_intensity"):
        regen.regenerate(results, ws, ["evaluate_intensity"], runner=runner, log=lambda _: None)
    interrupted = next((ws / "federation_intensity").glob("fedavg-run*"))
    regen.regenerate(results, ws, ["evaluate_intensity"], resume=True, runner=runner, log=lambda _: None)
    assert runner.calls[1][0] == "simulate" and runner.calls[1][-2:] == ["--resume", str(interrupted)]
    assert runner.calls[2][:2] == ["evaluate", str(interrupted)]
    (results / "evaluate_intensity.json").unlink()  # both entries finished in the workspace: copied, not rerun
    regen.regenerate(results, ws, ["evaluate_intensity"], runner=runner, log=lambda _: None)
    assert [a[0] for a in runner.calls] == ["simulate", "simulate", "evaluate"]
    assert regen.file_state(results / "evaluate_intensity.json") == regen.UP_TO_DATE


def test_without_resume_an_interrupted_entry_starts_over(tmp_path):
    results, ws = tmp_path / "results", tmp_path / "ws"
    results.mkdir()
    runner = FakeRunner(fail={"simulate"})
    with pytest.raises(regen.RegenerateError):
        regen.regenerate(results, ws, ["evaluate_intensity"], runner=runner, log=lambda _: None)
    regen.regenerate(results, ws, ["evaluate_intensity"], runner=runner, log=lambda _: None)
    assert "--resume" not in runner.calls[1]
    assert len(list((ws / "federation_intensity").glob("fedavg-run*"))) == 1


def test_an_up_to_date_run_that_a_due_entry_reads_is_made_first_when_the_workspace_lacks_it(tmp_path):
    results, ws, runner = tmp_path / "results", tmp_path / "ws", FakeRunner()
    results.mkdir()
    for ext in ("json", "csv"):  # up to date, but its run folder is not in this workspace
        (results / f"benchmark_compare.{ext}").write_text(json.dumps({"rows": []}) if ext == "json" else "x\n")
        regen.stamp(results / f"benchmark_compare.{ext}", ["fedbrain"], "abc")
    plan = regen.describe(regen.plan(results), regen.Regeneration(results, ws)).splitlines()
    assert "keep benchmark_compare " in plan[0]
    assert "first makes the run of benchmark_compare" in next(ln for ln in plan if " compression_report " in ln)
    written = regen.regenerate(results, ws, ["compression_report"], runner=runner, log=lambda _: None)
    assert [a[0] for a in runner.calls] == ["compare", "compress"]
    assert runner.calls[1][1].endswith("/fedavg-seed0/checkpoints/best.pt") and "{run" not in runner.calls[1][1]
    assert {p.name for p in written} >= {"compression_report.json", "compression_report.csv"}


# ---------------------------------------------------------------- captions


def test_a_table_made_by_older_code_says_so_and_one_without_a_stamp_says_no_provenance(tmp_path):
    results = tmp_path / "results"
    results.mkdir()
    doc = json.loads((RESULTS / "benchmark_compare.json").read_text())
    doc.pop(regen.PROVENANCE, None)  # as a file made before the stamps
    (results / "benchmark_compare.json").write_text(json.dumps(doc))
    assert "Made: no provenance." in render_table("compare_summary", results)
    regen.stamp(results / "benchmark_compare.json", ["fedbrain", "compare"], "1234567890abcdef")
    current = render_table("compare_summary", results).splitlines()[0]
    assert "commit 1234567, 20" in current and "older code" not in current
    doc = json.loads((results / "benchmark_compare.json").read_text())
    doc["provenance"]["code_digest"] = "f" * 64
    (results / "benchmark_compare.json").write_text(json.dumps(doc))
    assert "commit 1234567" in render_table("compare_summary", results) and \
        "made by older code" in render_table("compare_summary", results).splitlines()[0]


def test_a_stamped_evaluation_file_renders_its_sites_and_not_its_stamp(tmp_path):
    shutil.copy(RESULTS / "evaluate_intensity.json", tmp_path)
    before = render_table("evaluate_sites", tmp_path).splitlines()[2:]
    regen.stamp(tmp_path / "evaluate_intensity.json", ["fedbrain", "evaluate"], "abc")
    assert render_table("evaluate_sites", tmp_path).splitlines()[2:] == before


# ---------------------------------------------------------------- paired statistics


def test_the_paired_t_interval_matches_a_hand_computation():
    diffs = [a - b for a, b in zip(FED, CENTRAL, strict=True)]  # 0.02, -0.01, 0.05, 0.03
    mean = sum(diffs) / 4
    sd = math.sqrt(sum((d - mean) ** 2 for d in diffs) / 3)
    half = 3.182446305284263 * sd / math.sqrt(4)  # Student t, 3 degrees of freedom, 97.5 %
    got = paired_difference(_rows(4, FED, CENTRAL), "fedavg", "macro_f1", "union")
    assert got["n"] == 4 and got["mean"] == pytest.approx(mean)
    assert (got["lo"], got["hi"]) == pytest.approx((mean - half, mean + half))
    assert got["per_seed"]["2"] == pytest.approx(0.05)
    assert statistics.fmean(got["per_seed"].values()) == pytest.approx(mean)


def test_fewer_than_three_paired_seeds_give_the_differences_without_an_interval():
    assert t_interval([0.1, 0.3])[1:] == (None, None)
    got = paired_difference(_rows(2, FED, CENTRAL), "fedavg", "macro_f1", "union")
    assert got["n"] == 2 and got["lo"] is None and got["mean"] == pytest.approx(0.005)


def test_compare_summary_carries_calibrated_and_raw_paired_gaps_for_every_federated_mode():
    rows = _rows(4, FED, CENTRAL)
    summary = {e["mode"]: e for e in summarise(rows)}
    paired = summary["fedavg"]["paired"]
    assert set(paired) == {"macro_f1", "macro_f1_raw", "tumour_auroc", "no_tumor_recall"}
    assert paired["macro_f1_raw"]["mean"] == pytest.approx(paired["macro_f1"]["mean"] - 0.01)
    assert "paired" not in summary["centralized"]
    assert "lead (4 seeds)" in compare_table(rows, ["figshare_cheng"])


def test_the_paired_table_reads_a_positive_gap_as_a_lead(tmp_path):
    rows = _rows(4, [0.80, 0.81, 0.82, 0.83], CENTRAL)
    (tmp_path / "benchmark_compare.json").write_text(json.dumps({"rows": rows, "summary": summarise(rows)}))
    lines = [ln for ln in render_table("compare_paired", tmp_path).splitlines() if ln.startswith("| fedavg")]
    f1 = next(ln for ln in lines if "| macro-F1 |" in ln)
    assert f1.endswith("| lead |") and "[+" in f1
