"""Shared pytest fixtures. Each section belongs to the issue that added it; append, don't merge."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

# ---------------------------------------------------------------- dashboard (issue 5): a small real run
# `workspace_dir` / `small_run`: one real centralised run on the embedded Br35H set (40 images per site,
# 1 epoch), made by the real `fedbrain train`, plus `fedbrain compress` of its best checkpoint when the
# compression command exists. The simulator fixture will replace this with a federated run.

_DASH_COMPRESS_TIMEOUT_S = 240
_DASH_NOTES: dict[str, str | None] = {}


def _dash_compress(run: Path) -> str | None:
    """Run the real ``fedbrain compress`` on the best checkpoint; returns the skip reason, or None."""
    if importlib.util.find_spec("fedbrain.compression.cli") is None:
        return "fedbrain.compression has no CLI yet (fedbrain.compression.cli is not importable)"
    cmd = [sys.executable, "-m", "fedbrain.cli", "compress", str(run / "checkpoints" / "best.pt")]
    quick = ["--finetune-epochs", "0", "--calib-images", "16", "--repeats", "10", "--warmup", "2",
             "--max-eval-images", "40"]
    env = {**os.environ, "FEDBRAIN_OFFLINE": "1"}
    opts = dict(capture_output=True, text=True, timeout=_DASH_COMPRESS_TIMEOUT_S, env=env)
    try:
        proc = subprocess.run(cmd + quick, **opts)
        if proc.returncode == 2 and "unrecognized arguments" in proc.stderr:  # quick options renamed
            proc = subprocess.run(cmd, **opts)
    except subprocess.TimeoutExpired:
        return f"`fedbrain compress` took over {_DASH_COMPRESS_TIMEOUT_S} s on the small run"
    if proc.returncode != 0:
        return f"`fedbrain compress` failed (exit {proc.returncode}): {(proc.stderr or proc.stdout)[-400:]}"
    if not (run / "compression" / "report.json").is_file():
        return "`fedbrain compress` wrote no compression/report.json"
    return None


@pytest.fixture(scope="session")
def workspace_dir(tmp_path_factory) -> Path:
    """A workspace holding one small real run (see `small_run`)."""
    from fedbrain.cli import main

    ws = tmp_path_factory.mktemp("dashboard_ws")
    rc = main(["train", "--max-images-per-site", "40", "--epochs", "1", "--batch-size", "32",
               "--workspace", str(ws)])
    assert rc == 0, "fedbrain train failed while building the dashboard fixture"
    runs = [d for d in ws.iterdir() if (d / "config.json").is_file()]
    assert len(runs) == 1, runs
    _DASH_NOTES["compression"] = _dash_compress(runs[0])
    return ws


@pytest.fixture(scope="session")
def small_run(workspace_dir) -> Path:
    """The run folder: config.json, metrics.jsonl, results.json, data_summary.json, checkpoints/best.pt
    and, when `fedbrain compress` is available, compression/report.json with its variants."""
    return next(d for d in workspace_dir.iterdir() if (d / "config.json").is_file())


@pytest.fixture(scope="session")
def small_run_compression(small_run) -> Path:
    """``small_run``'s compression folder; skips (with the reason) when it could not be made."""
    reason = _DASH_NOTES.get("compression")
    if reason:
        pytest.skip(f"no real compression report: {reason}")
    return small_run / "compression"
# ---------------------------------------------------------------- end of dashboard (issue 5) section


# ---------------------------------------------------------------- federation (issue 3): a small simulator run
@pytest.fixture(scope="session")
def sim_run(tmp_path_factory) -> Path:
    """One real FedAvg run in the NVFlare simulator: embedded Br35H, 3 hospitals x 30 images, 2 rounds."""
    from fedbrain.cli import main

    ws = tmp_path_factory.mktemp("sim_ws")
    rc = main(["simulate", "--max-images-per-site", "30", "--rounds", "2", "--workspace", str(ws)])
    assert rc == 0, "fedbrain simulate failed while building the sim_run fixture"
    return next(d for d in ws.iterdir() if (d / "config.json").is_file())
# ---------------------------------------------------------------- end of federation (issue 3) section
