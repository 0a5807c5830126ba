"""``fedbrain results regenerate``: every file in docs/results/ from the fedbrain command that makes it.

:data:`REGISTRY` is the one table: for each entry the commands (argv after ``fedbrain``) and which file of their
output becomes which file in docs/results/. Placeholders: ``{data_root}`` (the only machine path, given to
``regenerate``), ``{out}`` (the entry's own folder under the regeneration workspace, which its commands write
into), ``{run}`` (the run folder the entry's command made there) and ``{run:NAME}`` (the run folder entry NAME
made). An entry without files is a run that others read (a federation that is then evaluated).

Every file written is stamped with its provenance (the commit, the command, the time and the digest of the
package's code): a JSON file under a top-level ``provenance`` key, a CSV file in ``<name>.provenance.json``
beside it. A file whose digest differs from the current code's is stale and is made again.
"""

from __future__ import annotations

import datetime as _dt
import functools
import hashlib
import json
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from fedbrain.training import TrainConfig

PROVENANCE = "provenance"
DEFAULT_DATA_ROOT = "../shared/data"
PLAN_STATE = "regenerate.json"  # in an entry's folder: the steps it finished and the run folders they made
MISSING, STALE, NO_PROVENANCE, UP_TO_DATE, HAND_MADE = (
    "missing", "stale code digest", "no provenance", "up to date", "hand-made, no command")


class RegenerateError(ValueError):
    """A registry entry or plan that cannot run (one line)."""


@dataclass(frozen=True)
class Entry:
    """How one or more files of docs/results/ are made: commands run in turn, then files copied."""

    name: str
    commands: tuple[tuple[str, ...], ...] = ()  # empty: hand-made (or a table kept from an older tool)
    copy: tuple[tuple[str, str], ...] = ()  # (file written by the commands, file name in docs/results/)
    needs: tuple[str, ...] = ()  # entries whose run folders the commands read
    resume: bool = False  # the command takes --resume RUN (an interrupted run is finished in place)

    @property
    def files(self) -> tuple[str, ...]:
        return tuple(dest for _, dest in self.copy)


def _compare(*flags: str) -> tuple[str, ...]:
    return ("compare", "--data-root", "{data_root}", *flags, "--workspace", "{out}")


def _simulate(*sets: str) -> tuple[str, ...]:
    return ("simulate", "--data-root", "{data_root}", "--set", "cross_site_eval=false",
            *(a for s in sets for a in ("--set", s)), "--workspace", "{out}")


def _compare_files(stem: str) -> tuple[tuple[str, str], ...]:
    return (("{run}/compare.json", f"{stem}.json"), ("{run}/compare.csv", f"{stem}.csv"))


# the from-scratch CNN federation (jobs/cnn.toml): augmentation policies matter where the trunk trains
_SCRATCH = ("local.batch_size=32", f"server_lr={TrainConfig.lr:g}")  # 32-image one-step rounds, centralised's lr
_CNN = ("model=fedbrain_cnn_gn", *_SCRATCH)


def _policy_entries(policy: str) -> tuple[Entry, ...]:
    run = f"{{run:federation_{policy}}}"
    return (Entry(f"federation_{policy}", (_simulate(*_CNN, f"local.augmentation={policy}"),), resume=True),
            Entry(f"evaluate_{policy}", (("evaluate", run, "--json", f"{{out}}/evaluate_{policy}.json"),),
                  ((f"{{out}}/evaluate_{policy}.json", f"evaluate_{policy}.json"),), needs=(f"federation_{policy}",)),
            Entry(f"robustness_{policy}", (("evaluate", run, "--robustness"),),
                  ((f"{run}/evaluation/robustness-best.json", f"robustness_{policy}.json"),
                   (f"{run}/evaluation/robustness-best.csv", f"robustness_{policy}.csv")),
                  needs=(f"federation_{policy}",)))


_DP_ROW = "{run:privacy_curve_cnn_v2}/fedavg_dp-sgd_ε={eps}"
# every invocation merges its rows into {out}/bench_models.json|csv (the workspace's table)
_BENCH = ("bench", "models", "--data-root", "{data_root}", "--workspace", "{out}")
_LITE0 = ("model=efficientnet_lite0", "image_size=128")
_V2 = "model=fedbrain_cnn_v2"
# the best federated model (jobs/lite0-head.toml) at the DP curve's budget: DP-SGD needs more epochs than 16 (ε = 1,
# one more row of ~20 min here, is left out)
_LITE0_HEAD = (*_LITE0, "pretrained=true", "finetune=head", "local.augmentation=none", "dp_sample_rate=0.25",
               "budget_epochs=32", "server_lr=0.01")
_LITE0_ROW = "{run:privacy_curve_lite0}/fedavg_dp-sgd_ε={eps}"
# the calibrated attack's reference: the same model trained without figshare, pooled (no federation's round
# overhead); the audit leaves out every image it trained or validated on, and their near-duplicates
_LITE0_REFERENCE = "{run:reference_lite0}/checkpoints/best.pt"

REGISTRY: tuple[Entry, ...] = (
    Entry("benchmark_compare", (_compare("--algorithms", "fedavg", "--seeds", "0", "1", "2", "3", "4"),),
          _compare_files("benchmark_compare")),
    Entry("benchmark_ablation", (_compare("--algorithms", "--no-baselines", "--iid-control", "--legacy-row",
                                          "--ablation", "--seeds", "0", "1", "2"),),
          _compare_files("benchmark_ablation")),
    Entry("leave_one_out", (_compare("--algorithms", "--no-baselines", "--leave-one-out", "--seeds", "0"),),
          _compare_files("leave_one_out")),
    Entry("benchmark_data_summary", (("data", "summary", "--data-root", "{data_root}", "--json",
                                      "{out}/benchmark_data_summary.json"),),
          (("{out}/benchmark_data_summary.json", "benchmark_data_summary.json"),)),
    *(e for policy in ("standard", "intensity", "robust") for e in _policy_entries(policy)),
    Entry("external_br35h", (("evaluate", "{run:federation_intensity}", "--external", "embedded", "--json",
                              "{out}/external_br35h.json"),), (("{out}/external_br35h.json", "external_br35h.json"),),
          needs=("federation_intensity",)),
    Entry("compression_report", (("compress", "{run:benchmark_compare}/fedavg-seed0/checkpoints/best.pt",
                                  "--data-root", "{data_root}", "--out", "{out}/compression"),),
          (("{out}/compression/report.json", "compression_report.json"),
           ("{out}/compression/report.csv", "compression_report.csv")), needs=("benchmark_compare",)),
    Entry("privacy_curve_lite0", (_compare(*(a for s in _LITE0_HEAD for a in ("--set", s)), "--algorithms",
                                           "--no-baselines", "--dp-curve", "inf", "8", "3"),),
          _compare_files("privacy_curve_lite0")),
    Entry("reference_lite0", (("train", "--data-root", "{data_root}", "--model", "efficientnet_lite0", "--image-size",
                               "128", "--pretrained", "yes", "--finetune", "head", "--augmentation", "none",
                               "--epochs", "32", "--set", 'data.sites=["sartaj", "navoneel"]', "--workspace",
                               "{out}"),)),
    # membership_lite0_{inf,eps8,eps3}: ("audit", _LITE0_ROW.replace("{eps}", eps), "--reference", _LITE0_REFERENCE),
    # needs privacy_curve_lite0 and reference_lite0; to be registered with the files (not made in time)
    Entry("privacy_curve_cnn_v2", (_compare(*(a for s in (_V2, "local.augmentation=none", "dp_sample_rate=0.25",
                                                           "budget_epochs=16") for a in ("--set", s)),
                                            "--algorithms", "--no-baselines", "--dp-curve", "inf", "8"),),
          _compare_files("privacy_curve_cnn_v2")),
    *(Entry(f"membership_cnn_v2_{label}", (("audit", _DP_ROW.replace("{eps}", eps)),),
            ((_DP_ROW.replace("{eps}", eps) + "/evaluation/membership.json", f"membership_cnn_v2_{label}.json"),),
            needs=("privacy_curve_cnn_v2",)) for label, eps in (("inf", "inf"), ("eps8", "8"))),
    Entry("federation_lite0", (_simulate(*_LITE0, *_SCRATCH, "finetune=all"),), resume=True),
    Entry("federation_cnn_v2", (_simulate(_V2, *_SCRATCH),), resume=True),
    Entry("federation_cnn_v2_self_distilled", (_simulate(_V2, *_SCRATCH, "distil_from={run:federation_cnn_v2}"),),
          needs=("federation_cnn_v2",), resume=True),
    Entry("bench_models", (
        (*_BENCH, "--rounds", "5", "--models", "mobilenet_v3_small", "fedbrain_cnn", "efficientnet_lite0",
         "mobilenet_v3_large", "efficientnet_b0"),
        (*_BENCH, "--rounds", "3", "--max-train-per-site", "200", "--models", "fedbrain_cnn", "efficientnet_lite0",
         "resnet50", "vgg16"),
        (*_BENCH, "--rounds", "20", "--models", "fedbrain_cnn"),
        (*_BENCH, "--models", "--include-runs", "{run:federation_cnn_v2}", "{run:federation_cnn_v2_self_distilled}"),
        (*_BENCH, "--models", "fedbrain_cnn_v2", "--modes", "federated", "--rounds", "8", "--distil-from",
         "{run:federation_lite0}", "--include-runs", "{run:federation_lite0}")),  # last: {run:bench_models}
          (("{out}/bench_models.json", "bench_models.json"), ("{out}/bench_models.csv", "bench_models.csv")),
          needs=("federation_lite0", "federation_cnn_v2", "federation_cnn_v2_self_distilled")),
    Entry("compression_report_cnn_v2", (("compress", "{run:bench_models}/fedbrain_cnn_v2/federated/checkpoints/best.pt",
                                         "--data-root", "{data_root}", "--repeats", "2000",
                                         "--out", "{out}/compression"),),
          (("{out}/compression/report.json", "compression_report_cnn_v2.json"),
           ("{out}/compression/report.csv", "compression_report_cnn_v2.csv")), needs=("bench_models",)),
    # copied by hand from runs or tools that write no file of their own
    Entry("architecture_search", copy=(("", "architecture_search.csv"),)),
    Entry("local_calibration", copy=(("", "local_calibration.csv"),)),
    Entry("bench_infer", copy=(("", "bench_infer.csv"),)),
)


def entries() -> dict[str, Entry]:
    return {e.name: e for e in REGISTRY}


def hand_made(file_name: str) -> bool:
    """Is this docs/results file copied by hand (no command makes it)?"""
    return any(file_name in e.files and not e.commands for e in REGISTRY)


# ---------------------------------------------------------------- provenance


@functools.cache
def code_digest() -> str:
    """sha256 over the package's .py files (fedbrain, fedbrain.compression, fedbrain.dashboard), path by path."""
    import fedbrain.compression
    import fedbrain.dashboard

    h = hashlib.sha256()
    for pkg in (fedbrain, fedbrain.compression, fedbrain.dashboard):
        root = Path(pkg.__file__).parent
        for path in sorted(p for p in root.rglob("*.py") if "__pycache__" not in p.parts):
            h.update(f"{pkg.__name__}/{path.relative_to(root).as_posix()}\n".encode())
            h.update(path.read_bytes())
    return h.hexdigest()


def git_commit() -> str:
    """The commit of the checkout the package runs from (``-dirty`` with uncommitted changes); ``unknown``
    outside a git checkout."""
    import fedbrain

    here = Path(fedbrain.__file__).parent
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def sidecar(path: Path) -> Path:
    return path.with_name(f"{path.stem}.provenance.json")


def read_provenance(path: Path) -> dict | None:
    """A results file's stamp (its JSON key, or a CSV's sidecar); None for a file made before stamps."""
    try:
        doc = json.loads((path if path.suffix == ".json" else sidecar(path)).read_text())
    except (OSError, ValueError):
        return None
    stamp = doc.get(PROVENANCE) if isinstance(doc, dict) else None
    return stamp if isinstance(stamp, dict) else None


def stamp(path: Path, command: list[str], commit: str) -> dict:
    """Write the provenance of ``path`` (a JSON file in place; a CSV file in its sidecar)."""
    prov = {"commit": commit, "command": command, "code_digest": code_digest(),
            "written": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
    if path.suffix == ".json":
        doc = json.loads(path.read_text())
        if not isinstance(doc, dict):
            raise RegenerateError(f"{path}: a JSON results file must be an object to carry its provenance")
        doc[PROVENANCE] = prov
        path.write_text(json.dumps(doc, indent=2) + "\n")
    else:
        sidecar(path).write_text(json.dumps({PROVENANCE: prov}, indent=2) + "\n")
    return prov


def file_state(path: Path) -> str:
    """missing | no provenance | stale code digest | up to date | hand-made, no command."""
    if hand_made(path.name):
        return HAND_MADE
    if not path.is_file():
        return MISSING
    prov = read_provenance(path)
    if prov is None:
        return NO_PROVENANCE
    return UP_TO_DATE if prov.get("code_digest") == code_digest() else STALE


# ---------------------------------------------------------------- the plan


@dataclass
class Step:
    entry: Entry
    reason: str  # why it runs (or does not)
    run: bool


def plan(results_dir: Path, names: list[str] | None = None) -> list[Step]:
    """Every entry (or those named, with the runs they read) in registry order, with whether and why it runs."""
    known = entries()
    unknown = [n for n in names or [] if n not in known]
    if unknown:
        raise RegenerateError(f"unknown results {', '.join(unknown)} (known: {', '.join(known)})")
    wanted = [e for e in REGISTRY if not names or e.name in names]
    steps = {}
    for e in (e for e in wanted if e.files):
        bad = [s for s in (file_state(results_dir / f) for f in e.files) if s not in (UP_TO_DATE, HAND_MADE)]
        steps[e.name] = Step(e, HAND_MADE if not e.commands else bad[0] if bad else UP_TO_DATE,
                             bool(bad) and bool(e.commands))
    for e in reversed(REGISTRY):  # the runs read by an entry that runs (before it in the registry)
        readers = [n for n, s in steps.items() if s.run and e.name in s.entry.needs]
        if e.name not in steps and readers:
            steps[e.name] = Step(e, "read by " + ", ".join(readers), True)
    for e in wanted:
        steps.setdefault(e.name, Step(e, "a run others read; none of them is due", False))
    return [steps[e.name] for e in REGISTRY if e.name in steps]


def describe(steps: list[Step], job: Regeneration | None = None) -> str:
    """The plan, one line per entry: run or keep, why, and (with ``job``) what the workspace already holds."""
    width = max((len(s.entry.name) for s in steps), default=0) + 2
    due = {s.entry.name: s.run for s in steps}
    lines = []
    for s in steps:
        where = ""
        if s.run and job is not None:
            where = "; finished in the workspace: copy only" if job.finished(s.entry) else \
                "; interrupted in the workspace: --resume continues it" if job.started(s.entry) else ""
            kept = [n for n in s.entry.needs if not job.finished(entries()[n]) and not due.get(n)]
            where += f"; first makes the run of {', '.join(kept)} (not in the workspace)" if kept else ""
        lines.append(f"{'run ' if s.run else 'keep'} {s.entry.name:<{width}}{s.reason}{where}")
    todo = sum(s.run for s in steps)
    return "\n".join(lines + [f"{todo} of {len(steps)} to run"])


# ---------------------------------------------------------------- running


Runner = Callable[[list[str]], int]


def run_fedbrain(argv: list[str]) -> int:
    """Run ``fedbrain ARGV`` in a child process (its output goes to the terminal); its exit status."""
    return subprocess.call([sys.executable, "-m", "fedbrain.cli", *argv])


class Regeneration:
    """Runs a plan's steps in turn in ``workspace``/<entry>/, copies and stamps their files into ``results_dir``."""

    def __init__(self, results_dir: Path, workspace: Path, data_root: str = DEFAULT_DATA_ROOT,
                 runner: Runner | None = None, resume: bool = False) -> None:
        self.results_dir, self.workspace, self.data_root = results_dir, workspace, data_root
        self.runner, self.resume = runner or (lambda argv: run_fedbrain(argv)), resume
        self.commit = git_commit()
        self.made: set[str] = set()  # entries made (or copied) by this regeneration

    def folder(self, name: str) -> Path:
        return self.workspace / name

    def run_folder(self, name: str) -> Path:
        """The run folder entry ``name`` made (recorded in its state file)."""
        runs = self._state(name).get("runs") or []
        if not runs:
            raise RegenerateError(f"{name} has made no run folder yet in {self.folder(name)}")
        return Path(runs[-1])

    def finished(self, entry: Entry) -> bool:
        """Did every command of ``entry`` finish in the workspace, at the current code?"""
        state = self._state(entry.name)
        return state.get("code_digest") == code_digest() and state.get("done") == len(entry.commands)

    def started(self, entry: Entry) -> bool:
        """Has ``entry`` an interrupted regeneration at the current code in the workspace?"""
        return self._state(entry.name).get("code_digest") == code_digest() and not self.finished(entry)

    def _state(self, name: str) -> dict:
        path = self.folder(name) / PLAN_STATE
        return json.loads(path.read_text()) if path.is_file() else {}

    def _save_state(self, name: str, state: dict) -> None:
        (self.folder(name) / PLAN_STATE).write_text(json.dumps(state, indent=2))

    def fill(self, text: str, name: str) -> str:
        """``text`` with its placeholders resolved for entry ``name``."""
        text = text.replace("{data_root}", self.data_root).replace("{out}", str(self.folder(name)))
        if "{run}" in text:
            text = text.replace("{run}", str(self.run_folder(name)))
        for other in entries():
            if f"{{run:{other}}}" in text:
                text = text.replace(f"{{run:{other}}}", str(self.run_folder(other)))
        return text

    def run_entry(self, entry: Entry) -> list[Path]:
        """Run the entry's unfinished commands (resuming an interrupted run where the command can), then copy and
        stamp its files; the files written."""
        folder = self.folder(entry.name)
        if folder.exists() and not self.finished(entry) and not (self.resume and self.started(entry)):
            shutil.rmtree(folder)  # made by other code, or interrupted and not to be resumed: start over
        folder.mkdir(parents=True, exist_ok=True)
        state = self._state(entry.name) or {"code_digest": code_digest(), "done": 0, "runs": []}
        for i, argv in enumerate(entry.commands):
            if i < state["done"]:
                continue
            command = [self.fill(a, entry.name) for a in argv]
            unfinished = _unfinished_run(folder) if entry.resume else None
            before = _run_folders(folder)
            rc = self.runner(command + (["--resume", str(unfinished)] if unfinished else []))
            made = [p for p in _run_folders(folder) if p not in before] or ([unfinished] if unfinished else [])
            state["runs"] += [str(p) for p in made]
            if rc != 0:
                self._save_state(entry.name, state)
                raise RegenerateError(f"{entry.name}: `fedbrain {' '.join(command)}` exited with {rc}")
            state["done"] = i + 1
            self._save_state(entry.name, state)
        return self._copy(entry)

    def make(self, entry: Entry, log: Callable[[str], None] = print) -> list[Path]:
        """``run_entry`` after the runs it reads, each made first where the workspace lacks it; the files written."""
        written = []
        for name in entry.needs:
            if name not in self.made and not self.finished(entries()[name]):
                log(f"== {name} (read by {entry.name}; not finished in the workspace)")
                written += self.make(entries()[name], log)
        self.made.add(entry.name)
        return written + self.run_entry(entry)

    def _copy(self, entry: Entry) -> list[Path]:
        written = []
        shown = [["fedbrain", *argv] for argv in entry.commands]  # placeholders kept: no machine path
        for source, dest in entry.copy:
            src = Path(self.fill(source, entry.name))
            if not src.is_file():
                raise RegenerateError(f"{entry.name}: its command wrote no {src}")
            target = self.results_dir / dest
            shutil.copyfile(src, target)
            stamp(target, shown[0] if len(shown) == 1 else shown, self.commit)
            written.append(target)
        return written


def _run_folders(folder: Path) -> list[Path]:
    """The run folders a command made in ``folder`` (those with a config or a status file)."""
    from fedbrain.runs import RunDir

    return sorted(p for p in folder.iterdir() if p.is_dir() and (RunDir(p).config.is_file() or
                                                                   RunDir(p).status.is_file()))


def _unfinished_run(folder: Path) -> Path | None:
    """A run folder in ``folder`` that was interrupted (its status is not finished)."""
    from fedbrain.status import FINISHED, read_status

    return next((run for run in reversed(_run_folders(folder)) if read_status(run)["state"] != FINISHED), None)


def regenerate(results_dir: Path, workspace: Path, names: list[str] | None = None, resume: bool = False,
               data_root: str = DEFAULT_DATA_ROOT, runner: Runner | None = None,
               log: Callable[[str], None] = print) -> list[Path]:
    """Run every due step of the plan in turn and stamp what it writes (``fedbrain results regenerate`` then
    re-renders docs/results.md); the files written."""
    steps = plan(results_dir, names)
    job = Regeneration(results_dir, workspace, data_root, runner, resume)
    written: list[Path] = []
    for step in (s for s in steps if s.run and s.entry.name not in job.made):
        log(f"== {step.entry.name} ({step.reason})")
        written += job.make(step.entry, log)
    return written
