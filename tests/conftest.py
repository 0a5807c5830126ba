"""Shared pytest fixtures. Each section belongs to the issue that added it; append, don't merge."""

from __future__ import annotations

import atexit
import csv
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fedbrain.checkpoint import ModelCard, save_checkpoint
from fedbrain.cli.main import main
from fedbrain.contract import CLASSES
from fedbrain.models import create_model, default_preprocessing

# ---------------------------------------------------------------- dashboard (issue 5): a small real run
# `workspace_dir` / `small_run`: one real centralised run on the embedded Br35H set (40 images per site,
# 1 epoch), made by the real `fedbrain train`, plus `fedbrain compress` of its best checkpoint when the
# compression command exists. The simulator fixture will replace this with a federated run.

_DASH_COMPRESS_TIMEOUT_S = 240
_DASH_NOTES: dict[str, str | None] = {}


def _dash_compress(run: Path) -> str | None:
    """Run the real ``fedbrain compress`` on the best checkpoint; returns the skip reason, or None."""
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
    from fedbrain.cli.main import main

    ws = tmp_path_factory.mktemp("dashboard_ws")
    rc = main(["train", "--set", "data.max_images_per_site=40", "--epochs", "1", "--batch-size", "32",
               "--workspace", str(ws)])
    assert rc == 0, "fedbrain train failed while building the dashboard fixture"
    runs = [d for d in ws.iterdir() if (d / "config.json").is_file()]
    assert len(runs) == 1, runs
    _DASH_NOTES["compression"] = _dash_compress(runs[0])
    return ws


@pytest.fixture(scope="session")
def small_run(workspace_dir) -> Path:
    """The run folder: config.json, metrics.jsonl, results.json, data_summary.json, checkpoints/best.pt
    and compression/report.json with its variants."""
    return next(d for d in workspace_dir.iterdir() if (d / "config.json").is_file())


@pytest.fixture(scope="session")
def small_run_compression(small_run) -> Path:
    """``small_run``'s compression folder; fails (with the reason) when `fedbrain compress` could not make it."""
    reason = _DASH_NOTES.get("compression")
    if reason:
        pytest.fail(f"no real compression report: {reason}")
    return small_run / "compression"
# ---------------------------------------------------------------- end of dashboard (issue 5) section


# ---------------------------------------------------------------- federation (issue 3): a small simulator run
@pytest.fixture(scope="session")
def sim_run(tmp_path_factory) -> Path:
    """One real FedAvg run in the NVFlare simulator: embedded Br35H, 3 hospitals x 30 images, 2 rounds."""
    from fedbrain.cli.main import main

    ws = tmp_path_factory.mktemp("sim_ws")
    rc = main(["simulate", "--set", "data.max_images_per_site=30", "--rounds", "2", "--workspace", str(ws)])
    assert rc == 0, "fedbrain simulate failed while building the sim_run fixture"
    return next(d for d in ws.iterdir() if (d / "config.json").is_file())
# ---------------------------------------------------------------- end of federation (issue 3) section


# ---------------------------------------------------------------- compression (issue 4): a tiny synthetic run
# 48 train / 8 val / 32 test images of 48 px (four brightness levels plus a random blob) and a fedbrain_cnn
# trained ~30 steps, so the model is confident and the int8-vs-fp32 agreement bar means something.
# `compression_output` is the real `fedbrain compress` of its best checkpoint.
LEVELS = (200, 140, 90, 35)  # mean brightness per class: learnable in a few steps
_COMPRESS_STATE: dict = {}


def _draw(c: int, rng: np.random.Generator, size: int = 48) -> np.ndarray:
    img = rng.normal(LEVELS[c], 12, (size, size))
    yy, xx = np.mgrid[:size, :size]
    cy, cx = rng.integers(12, size - 12, 2)
    img[np.hypot(yy - cy, xx - cx) < 6] += 40
    return np.clip(img, 0, 255).astype(np.uint8)


def _recalibrate_bn(model: torch.nn.Module, x: torch.Tensor) -> None:
    """Exact BatchNorm statistics of the training images (a 30-step model's running stats lag)."""
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None
    model.train()
    with torch.no_grad():
        model(x)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = 0.1
    model.eval()


def synthetic_run() -> Path:
    """``<tmp>/run`` with ``splits/site-a.csv`` (multiclass) and ``checkpoints/best.pt`` (built once)."""
    if "run" in _COMPRESS_STATE:
        return _COMPRESS_STATE["run"]
    from fedbrain.data.dataset import to_tensor
    from fedbrain.data.images import resize
    from fedbrain.training import TrainConfig, train_epochs

    root = Path(tempfile.mkdtemp(prefix="fedbrain-compress-test-"))
    atexit.register(shutil.rmtree, root, True)
    rng = np.random.default_rng(0)
    run = root / "run"
    (run / "splits").mkdir(parents=True)
    rows, train_x, train_y = [], [], []
    for split, n in (("train", 12), ("val", 2), ("test", 8)):
        for i in range(n):
            for c, name in enumerate(CLASSES):
                arr = _draw(c, rng)
                path = root / "images" / split / f"{name}_{i}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(arr).save(path)
                rows.append([str(path), name, split, "multiclass"])
                if split == "train":
                    train_x.append(resize(arr, 128))
                    train_y.append(c)
    with (run / "splits" / "site-a.csv").open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "label", "split", "scheme"])
        w.writerows(rows)
    pre = default_preprocessing("fedbrain_cnn")
    x, y = to_tensor(np.stack(train_x), pre), torch.tensor(train_y)
    torch.manual_seed(0)
    old = torch.get_num_threads()
    torch.set_num_threads(1)  # 2 threads on a busy 2-core box are ~10x slower
    model = create_model("fedbrain_cnn")
    batches = [(x[i:i + 16], y[i:i + 16]) for i in range(0, len(x), 16)]
    train_epochs(model, batches, TrainConfig(lr=3e-3, class_weighting=False), epochs=10)
    _recalibrate_bn(model, x)
    torch.set_num_threads(old)
    save_checkpoint(run / "checkpoints" / "best.pt", model,
                    ModelCard("fedbrain_cnn", pre, "multiclass", label_schemes={"site-a": "multiclass"}))
    _COMPRESS_STATE["run"] = run
    return run


def compressed_run() -> Path:
    """``fedbrain compress`` of the synthetic run's best checkpoint (CLI, once): ``<run>/compression``."""
    if "compression" in _COMPRESS_STATE:
        return _COMPRESS_STATE["compression"]
    run = synthetic_run()
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        rc = main(["compress", str(run / "checkpoints" / "best.pt"), "--finetune-epochs", "1",
                   "--warmup", "2", "--repeats", "10", "--calib-images", "32",
                   "--cache-dir", str(run / "cache")])
    finally:
        torch.set_num_threads(old)
    assert rc == 0
    _COMPRESS_STATE["compression"] = run / "compression"
    return _COMPRESS_STATE["compression"]





@pytest.fixture
def one_torch_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)  # 2 threads on a busy 2-core box are much slower for these tiny models
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="session")
def compression_synthetic_run() -> Path:
    return synthetic_run()


@pytest.fixture(scope="session")
def compression_output() -> Path:
    return compressed_run()
# ---------------------------------------------------------------- end of compression (issue 4) section
