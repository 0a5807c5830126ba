"""The run folder: every path of the documented workspace schema (``workspace/README.md``), in one place.

Commands create a :class:`RunDir` under the workspace and write through its named paths; the dashboard,
``fedbrain compress`` and ``fedbrain evaluate`` read through the same names. Nothing else in fedbrain
joins run-folder path parts by hand.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
from pathlib import Path

DEFAULT_WORKSPACE = Path(os.environ.get("FEDBRAIN_WORKSPACE", "workspace"))


class RunDir:
    """One run: ``workspace/<run-id>/`` (a compare or benchmark run nests ordinary runs as children)."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    # -------------------------------------------------------------- creation / lookup

    @classmethod
    def create(cls, workspace: str | os.PathLike, prefix: str) -> RunDir:
        """A new, empty ``<workspace>/<prefix>-<YYYYmmdd-HHMMSS>[-k]`` folder."""
        stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        base = Path(workspace) / f"{prefix}-{stamp}"
        path, k = base, 1
        while path.exists():
            k += 1
            path = Path(f"{base}-{k}")
        path.mkdir(parents=True)
        return cls(path)

    @classmethod
    def of_checkpoint(cls, checkpoint: str | os.PathLike) -> RunDir | None:
        """The run whose ``checkpoints/`` folder holds ``checkpoint``, or None."""
        p = Path(checkpoint).resolve()
        return cls(p.parent.parent) if p.parent.name == CHECKPOINTS else None

    @classmethod
    def containing(cls, path: str | os.PathLike) -> RunDir | None:
        """The run folder (one with a ``config.json``) that holds ``path``, or None."""
        p = Path(path).resolve()
        return next((cls(d) for d in p.parents if cls(d).config.is_file()), None)

    @classmethod
    def of_model_file(cls, model: str | os.PathLike) -> RunDir | None:
        """The run holding a model file in its ``checkpoints/`` or ``compression/`` folder (with splits), or None."""
        p = Path(model).resolve()
        if p.parent.name in (CHECKPOINTS, COMPRESSION):
            run = cls(p.parent.parent)
            return run if run.has_splits() else None
        return None

    def child(self, name: str) -> RunDir:
        """A nested run (a compare mode, a benchmarked model's mode)."""
        return RunDir(self.root / name.replace(":", "-"))

    def __fspath__(self) -> str:
        return str(self.root)

    def __str__(self) -> str:
        return str(self.root)

    def __repr__(self) -> str:
        return f"RunDir({str(self.root)!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RunDir) and self.root == other.root

    def __hash__(self) -> int:
        return hash(self.root)

    @property
    def name(self) -> str:
        return self.root.name

    def exists(self) -> bool:
        return self.root.is_dir()

    # -------------------------------------------------------------- the schema

    @property
    def config(self) -> Path:
        return self.root / "config.json"

    @property
    def metrics(self) -> Path:
        return metrics_file(self.root)

    @property
    def results(self) -> Path:
        return self.root / "results.json"

    @property
    def data_summary(self) -> Path:
        return self.root / "data_summary.json"

    @property
    def splits(self) -> Path:
        return self.root / "splits"

    def split_file(self, site: str) -> Path:
        return self.splits / f"{site}.csv"

    def split_files(self, sites: list[str]) -> dict[str, str]:
        return {s: str(self.split_file(s)) for s in sites}

    @property
    def checkpoints(self) -> Path:
        return self.root / CHECKPOINTS

    @property
    def best(self) -> Path:
        return self.checkpoints / "best.pt"

    @property
    def last(self) -> Path:
        return self.checkpoints / "last.pt"

    @property
    def teacher(self) -> Path:
        """``checkpoints/teacher.pt``: the frozen teacher a distilled run learned from (the job carries it to sites)."""
        return self.checkpoints / "teacher.pt"

    @property
    def rounds(self) -> Path:
        """``checkpoints/rounds/``: the global model after every finished round (federated runs)."""
        return self.checkpoints / "rounds"

    def round_model(self, round_: int) -> Path:
        return self.rounds / ROUND_FILE.format(round_)

    @property
    def rounds_best(self) -> Path:
        """``checkpoints/rounds/best.pt``: the server's best global model by the pooled validation score."""
        return self.rounds / ROUNDS_BEST

    @property
    def rounds_progress(self) -> Path:
        return self.rounds / ROUNDS_PROGRESS

    @property
    def tensorboard(self) -> Path:
        return self.root / "tensorboard"

    @property
    def sites(self) -> Path:
        return self.root / "sites"

    def site_log_dir(self, site: str) -> Path:
        return self.sites / site

    def site_metrics(self, site: str) -> Path:
        return metrics_file(self.site_log_dir(site))

    def site_policy(self, site: str) -> Path:
        """A simulated hospital's own privacy policy (its admin's ``local/fedbrain_privacy.json``)."""
        return self.site_log_dir(site) / "local" / SITE_POLICY_FILE

    def site_keys(self, site: str) -> Path:
        """A simulated hospital's own secure-aggregation folder: the private key it made and its ledger."""
        return self.site_log_dir(site) / "secagg"

    def site_privacy_ledger(self, site: str) -> Path:
        return privacy_ledger(self.site_log_dir(site))

    @property
    def membership_audit(self) -> Path:
        """``fedbrain audit --membership``: the membership-inference attack on the best global model."""
        return self.evaluations / "membership.json"

    @property
    def inversion_audit(self) -> Path:
        """``fedbrain audit --attack inversion``: images rebuilt from one round's update, beside baselines."""
        return self.evaluations / "inversion.json"

    @property
    def nvflare(self) -> Path:
        return self.root / "nvflare"

    @property
    def cross_site(self) -> Path:
        return self.root / "cross_site.json"

    @property
    def server_audit(self) -> Path:
        return self.root / "server_audit.jsonl"

    @property
    def server_log(self) -> Path:
        """``server_rounds.jsonl``: per round, each site's aggregation weight and update norm (server side)."""
        return self.root / "server_rounds.jsonl"

    @property
    def status(self) -> Path:
        """``status.json``: the run's state, round x of N, each site's last contact, ETA, errors (live)."""
        return self.root / "status.json"

    @property
    def mlflow_db(self) -> Path:
        """``mlflow.db``: the MLflow store of a run with ``tracking = "mlflow"`` (sites' metrics per round)."""
        return self.root / "mlflow.db"

    @property
    def stop_request(self) -> Path:
        """``stop_request.json``: written by ``fedbrain runs stop``; the server stops after the current round."""
        return self.root / "stop_request.json"

    @property
    def initial_model(self) -> Path:
        return self.root / "initial_model.pt"

    @property
    def simulator_stdout(self) -> Path:
        return self.root / "simulator_stdout.txt"

    @property
    def nvflare_log_config(self) -> Path:
        return self.root / "nvflare_log_config.json"

    @property
    def compare_json(self) -> Path:
        return self.root / "compare.json"

    @property
    def compare_csv(self) -> Path:
        return self.root / "compare.csv"

    @property
    def bench_models_json(self) -> Path:
        return self.root / BENCH_MODELS

    @property
    def bench_federation_json(self) -> Path:
        return self.root / "bench_federation.json"

    @property
    def bench_secure_aggregation_json(self) -> Path:
        return self.root / "bench_secure_aggregation.json"

    @property
    def deploy_result(self) -> Path:
        return self.root / "deploy_result.json"

    @property
    def evaluations(self) -> Path:
        """``fedbrain evaluate --robustness / --external`` results of this run's models."""
        return self.root / "evaluation"

    def evaluation_file(self, kind: str, model: str | os.PathLike) -> Path:
        """``evaluation/<kind>-<model file stem>.json`` (kind: robustness | external-<folder name>)."""
        return self.evaluations / f"{kind}-{Path(model).stem}.json"

    @property
    def compression(self) -> Path:
        return self.root / COMPRESSION

    # -------------------------------------------------------------- reading and writing

    def write_config(self, **config) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        write_json(self.config, config)

    def read_config(self) -> dict:
        return read_json(self.config) or {}

    def read_results(self) -> dict:
        return read_json(self.results) or {}

    def write_results(self, results: dict) -> None:
        write_json(self.results, results)

    def site_names(self) -> list[str]:
        """Sites whose split file this run recorded."""
        return sorted(p.stem for p in self.splits.glob("*.csv")) if self.splits.is_dir() else []

    def has_splits(self) -> bool:
        return bool(self.site_names())


CHECKPOINTS = "checkpoints"
SITE_POLICY_FILE = "fedbrain_privacy.json"  # a site's own privacy policy, in its workspace's local/ folder
COMPRESSION = "compression"
BENCH_MODELS = "bench_models.json"
# the server writes these into its checkpoint folder (a run's checkpoints/rounds/, or its own job folder)
ROUND_FILE = "round-{:04d}.pt"
ROUNDS_BEST = "best.pt"
ROUNDS_PROGRESS = "progress.json"


def list_run_dirs(workspace: str | os.PathLike) -> list[RunDir]:
    """The run folders directly in a workspace (a ``config.json`` or ``status.json`` in them), newest first."""
    ws = Path(workspace)
    if not ws.is_dir():
        return []
    found = []
    for d in ws.iterdir():
        run = RunDir(d)
        marker = run.config if run.config.is_file() else run.status if run.status.is_file() else None
        if d.is_dir() and marker is not None:
            found.append((marker.stat().st_mtime, d.name, run))
    return [r for *_, r in sorted(found, key=lambda t: (t[0], t[1]), reverse=True)]


def privacy_ledger(folder: str | os.PathLike) -> Path:
    """``<folder>/privacy_ledger.json``: the DP-SGD steps a site took and the ε they spent (its resume point)."""
    return Path(folder) / "privacy_ledger.json"


def metrics_file(folder: str | os.PathLike) -> Path:
    """``<folder>/metrics.jsonl``: a run's log, or a site's own log wherever the site keeps it."""
    return Path(folder) / "metrics.jsonl"


def default_compression_dir(checkpoint: str | os.PathLike) -> Path:
    """``<run>/compression`` for run checkpoints, else ``<dir>/<stem>-compression``."""
    run = RunDir.of_checkpoint(checkpoint)
    p = Path(checkpoint)
    return run.compression if run else p.parent / f"{p.stem}-compression"


def workspace_bench_models(workspace: str | os.PathLike) -> Path:
    """``<workspace>/bench_models.json``: every benchmark run's rows merged (the dashboard's Models page)."""
    return Path(workspace) / BENCH_MODELS


def write_json(path: Path, obj) -> None:
    """Write atomically (a reader never sees half a file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str))
    tmp.replace(path)


def read_json(path: Path):
    """The parsed file, or None when it is missing or unreadable."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """Rows of a metrics.jsonl (a half-written last line is ignored)."""
    path = Path(path)
    if not path.is_file():
        return []
    return _jsonl_rows(path.read_text())


def _jsonl_rows(text: str) -> list[dict]:
    rows = []
    for line in text.splitlines():
        if line.strip():
            try:
                rows.append(json.loads(line))
            except ValueError:
                continue
    return rows


class JsonlTail:
    """The rows appended to a JSONL file since the last :meth:`read`, complete lines only (a line still being
    written waits for the next read); reads only the new bytes. Starts after the rows already there."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        try:
            data = self.path.read_bytes()
        except OSError:
            data = b""
        self.offset = data.rfind(b"\n") + 1

    def read(self) -> list[dict]:
        try:
            with self.path.open("rb") as fh:
                fh.seek(self.offset)
                data = fh.read()
        except OSError:
            return []
        end = data.rfind(b"\n") + 1
        self.offset += end
        return _jsonl_rows(data[:end].decode(errors="replace"))


def append_jsonl(path: Path, row: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with Path(path).open("a") as fh:
        fh.write(json.dumps(row, default=str) + "\n")


def fmt_metric(m: dict, key: str, ci: bool = True, flag: str = "*", missing: str | None = "-") -> str | None:
    """A results.json metric as ``0.812 [0.78, 0.84]`` (with its 95 % interval), ``flag`` appended when it rests
    on too few images (``unreliable``), ``missing`` if absent."""
    v = m.get(key)
    if not isinstance(v, (int, float)):
        return missing
    text = f"{v:.3f}"
    interval = (m.get("ci") or {}).get(key)
    if ci and isinstance(interval, (list, tuple)) and len(interval) == 2 and all(
            isinstance(x, (int, float)) for x in interval):
        text += f" [{interval[0]:.2f}, {interval[1]:.2f}]"
    if key in (m.get("unreliable") or {}):
        text += flag
    return text


def flat_scalars(metrics: dict) -> dict:
    """The scalar entries of a metrics dict (drops nested tables and booleans)."""
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


class MetricsLog:
    """Append-only JSONL of scalar metrics, one line per (round, site, split), mirrored to TensorBoard."""

    def __init__(self, path: Path, tensorboard_dir: Path | None = None):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tb = None
        if tensorboard_dir is not None:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(tensorboard_dir))
            except Exception:  # tensorboard missing: JSONL stays the source of truth
                self.tb = None

    @classmethod
    def of(cls, run: RunDir) -> MetricsLog:
        return cls(run.metrics, run.tensorboard)

    def log(self, round_: int, site: str, split: str, metrics: dict, **extra) -> None:
        row = {"round": round_, "site": site, "split": split, **extra, **flat_scalars(metrics)}
        append_jsonl(self.path, row)
        self.scalars(row)

    def scalars(self, row: dict) -> None:
        """A metrics row as TensorBoard scalars (``site/split/key``)."""
        if self.tb is None:
            return
        for k, v in flat_scalars(row).items():
            if k != "round" and math.isfinite(v):
                self.tb.add_scalar(f"{row.get('site')}/{row.get('split')}/{k}", v, row.get("round", 0))
        self.tb.flush()

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


__all__ = ["RunDir", "MetricsLog", "JsonlTail", "list_run_dirs", "DEFAULT_WORKSPACE", "read_metrics", "read_json",
           "write_json", "fmt_metric",
           "flat_scalars", "default_compression_dir", "workspace_bench_models", "append_jsonl"]
