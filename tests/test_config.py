"""The job configuration: one TOML file per run, `--set`, `fedbrain config show`, and `--help` that tells the truth."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest
import tomllib

from fedbrain.cli.main import build_parser, main
from fedbrain.cli.options import CONFIG_FLAGS, UsageError, job_settings, run_config, save_config
from fedbrain.config import RunConfig, keys, load
from fedbrain.settings import legacy_overrides

ROOT = Path(__file__).resolve().parents[1]
JOB_FILES = sorted(p for p in (ROOT / "jobs").glob("*.toml") if p.name != "sites.example.toml")


def subparsers(parser: argparse.ArgumentParser, prefix: str = "fedbrain"):
    """(command line, parser) for every runnable command."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from subparsers(sub, f"{prefix} {name}")
            return
    yield prefix, parser


def option_count(parser: argparse.ArgumentParser) -> int:
    return sum(1 for a in parser._actions if a.option_strings)


def test_simulate_help_shows_at_most_fifteen_options():
    parsers = dict(subparsers(build_parser()))
    assert option_count(parsers["fedbrain simulate"]) <= 15


STATED = re.compile(r"\(default:? ([^;,)]+)")


def effective_default(action: argparse.Action, parser: argparse.ArgumentParser):
    """What an unset option means: the command's own default for its configuration key, else the key's default,
    else argparse's default."""
    dest_keys = CONFIG_FLAGS.get(action.dest)
    if dest_keys and action.default is None:
        command_defaults = parser.get_default("_command_defaults") or {}
        return command_defaults.get(dest_keys[0], keys()[dest_keys[0]])
    return action.default


def as_number(text: str):
    try:
        return float(text)
    except ValueError:
        return None


def test_every_default_stated_in_any_help_is_the_effective_default():
    checked, wrong = 0, []
    for command, parser in subparsers(build_parser()):
        for action in parser._actions:
            if not action.option_strings or not action.help:
                continue
            match = STATED.search(action.help % {"default": action.default} if "%(" in action.help else action.help)
            if not match:
                continue
            stated = match.group(1).split(" ")[0].strip()
            actual = effective_default(action, parser)
            number = as_number(stated)
            if number is not None and isinstance(actual, (int, float)) and not isinstance(actual, bool):
                ok = number == pytest.approx(float(actual))
            elif action.choices and stated in action.choices or stated in ("auto", "none"):
                ok = stated == str(actual) or (stated == "none" and actual in (None, ""))
            else:
                continue  # prose ("the model's", "as many as ...")
            checked += 1
            if not ok:
                wrong.append(f"{command} {action.option_strings[0]}: help says {stated!r}, really {actual!r}")
    assert checked > 30
    assert not wrong, "\n".join(wrong)


def test_every_everyday_flag_of_simulate_changes_its_configuration():
    base = run_config(build_parser().parse_args(["simulate"])).to_table()
    changes = {"--data-root": "x", "--site-config": "y.toml", "--seed": "3", "--algorithm": "fedprox",
               "--model": "fedbrain_cnn_v2", "--rounds": "7", "--dp-epsilon": "8", "--device": "cpu"}
    for flag, value in changes.items():
        changed = run_config(build_parser().parse_args(["simulate", flag, value])).to_table()
        assert changed != base, f"{flag} {value} changed no setting"


@pytest.mark.parametrize("argv", [
    ["simulate", "--algorithm", "fedprox", "--rounds", "7", "--set", "local.steps=4", "--set", "server_lr=0.001",
     "--set", "data.max_images_per_site=20", "--seed", "2"],
    ["train", "--epochs", "3", "--lr", "0.01", "--model", "fedbrain_cnn_v2", "--set", "data.num_sites=2"],
    ["compare", "--rounds", "5", "--set", "local.batch_size=16", "--seeds", "0", "1"],
    ["submit", "--admin-kit", "kit", "--sites", "a,b", "--rounds", "4", "--set", "dp_epsilon=8",
     "--set", "dp_sample_rate=0.5", "--seed", "5"],
])
def test_a_run_is_rebuilt_from_its_saved_configuration_alone(argv, tmp_path):
    first = build_parser().parse_args(argv)
    job_settings(first)
    saved = save_config(first, tmp_path)
    deployment = ["--admin-kit", "kit", "--sites", "a,b"] if argv[0] == "submit" else []
    again = build_parser().parse_args([argv[0], "--config", str(saved), *deployment])
    job_settings(again)
    assert run_config(again).to_table() == run_config(first).to_table()
    assert run_config(again).job.site_dict() == run_config(first).job.site_dict()


def test_a_simulated_run_writes_the_configuration_that_runs_it_again(tmp_path, monkeypatch):
    from fedbrain.cli import federation

    seen = {}

    def run_simulation(fed, settings, run, cache_dir=None):
        seen["s"] = settings
        return {"wall_seconds": 0}

    monkeypatch.setattr("fedbrain.fl.simulate.run_simulation", run_simulation)
    assert federation  # the command module under test
    rc = main(["simulate", "--set", "data.max_images_per_site=12", "--set", "local.steps=2", "--workspace",
               str(tmp_path)])
    assert rc == 0
    saved = next(tmp_path.glob("*/config.toml"))
    table = tomllib.loads(saved.read_text())
    assert table["local"]["steps"] == 2 and table["data"]["max_images_per_site"] == 12
    assert table["rounds"] == seen["s"].rounds  # the rounds the budget gave, written down
    rebuilt = load([str(saved)])
    assert rebuilt.job.rounds == seen["s"].rounds and rebuilt.job.train == seen["s"].train


def test_set_names_an_unknown_key_and_suggests_the_right_one():
    with pytest.raises(UsageError, match="unknown setting 'server_l'.*server_lr"):
        run_config(build_parser().parse_args(["simulate", "--set", "server_l=1"]))


@pytest.mark.parametrize("item, message", [
    ("rounds=1.5", "rounds: expected int"), ("data.num_sites=0", "data.num_sites must be >= 1"),
    ("server_momentum=1", "server_momentum must be >= 0 and < 1"), ("local.lr=0", "local.lr must be > 0"),
    ("data.alpha=-1", "data.alpha must be > 0"), ("budget_epochs=0", "budget_epochs must be > 0"),
    ("cross_site_eval=maybe", "cross_site_eval: expected bool"), ("rounds", "expected KEY=VALUE"),
    ("local.lr=nan", "local.lr must be > 0"), ("local.batch_size=0", "local.batch_size must be >= 1"),
    ("min_clients=0", "min_clients must be >= 1"), ("dp_noise=-0.5", "dp_noise must be >= 0"),
    ("data.max_images_per_site=-1", "data.max_images_per_site must be >= 0"),
    ("dp_sample_rate=0", "dp_sample_rate must be > 0"),
])
def test_a_bad_setting_is_one_clear_error_naming_the_key_before_any_run_folder(item, message, capsys, tmp_path):
    assert main(["simulate", "--set", item, "--workspace", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not any(tmp_path.iterdir())


def test_later_sources_win_and_config_show_names_each_source(tmp_path, capsys):
    file = tmp_path / "job.toml"
    file.write_text('server_lr = 0.01\nrounds = 9\n[local]\nsteps = 4\n')
    cfg = run_config(build_parser().parse_args(["simulate", "--config", str(file), "--rounds", "3",
                                                "--set", "local.steps=8"]))
    assert (cfg.job.server_lr, cfg.job.rounds, cfg.job.train.steps) == (0.01, 3, 8)
    assert main(["config", "show", "--config", str(file), "--set", "local.steps=8"]) == 0
    out = {line.split()[0]: line.split()[-1] for line in capsys.readouterr().out.splitlines() if line.strip()}
    assert out["server_lr"] == str(file) and out["local.steps"] == "local.steps" and out["algorithm"] == "default"


def test_the_committed_default_configuration_is_the_codes_default(capsys):
    assert main(["config", "show", "--toml"]) == 0
    printed = tomllib.loads(capsys.readouterr().out)
    assert tomllib.loads((ROOT / "jobs" / "default.toml").read_text()) == printed


def test_the_legacy_configuration_is_the_legacy_federation():
    table = tomllib.loads((ROOT / "jobs" / "legacy.toml").read_text())
    legacy = legacy_overrides()
    assert table.pop("local") == legacy.pop("train")
    assert table == legacy


@pytest.mark.parametrize("path", JOB_FILES, ids=lambda p: p.name)
def test_every_committed_job_configuration_loads(path):
    cfg = load([str(path)])
    assert isinstance(cfg, RunConfig) and cfg.sources
