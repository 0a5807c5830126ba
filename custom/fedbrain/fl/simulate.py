"""Run a federation in the NVFlare simulator and turn its outputs into a fedbrain run folder."""

from __future__ import annotations

import contextlib
import datetime as _dt
import io
import json
import logging
import os
import re
import time
from collections import defaultdict
from pathlib import Path

from fedbrain.checkpoint import load_weights, read_checkpoint
from fedbrain.data.dataset import site_loaders
from fedbrain.data.federation import Federation
from fedbrain.evaluation import UNION, evaluate_everywhere, site_separability
from fedbrain.fl.metrics import SERVER_STATE
from fedbrain.fl.recipes import build_recipe
from fedbrain.fl.runlog import (
    RunLog,
    cross_site_matrix,
    federated_card,
    global_val_rows,
    merge_run_log,
    save_best,
    save_global_models,
    train_seconds,
    write_results,
)
from fedbrain.models import create_model, weights_source
from fedbrain.runs import JsonlTail, RunDir, read_json, read_metrics
from fedbrain.settings import JobSettings
from fedbrain.status import FAILED, FINISHED, STOPPED, StatusWriter, from_controller, headline_of, progress_text
from fedbrain.training import place, resolve_device

# What a failed site or the failed server leaves in its simulator log.
SITE_FAILURE = re.compile(r"TaskScriptRunner - ERROR - Traceback|Could not start")
SERVER_FAILURE = re.compile(r"Exception in model controller run|Aborting current RUN|Could not start")


def _find(root: Path, name: str) -> list[Path]:
    return sorted(root.rglob(name))


def site_errors(nv_root: Path, names: list[str]) -> dict[str, str]:
    """The first failure in each site's (or the server's) simulator log; the simulator exits 0 even then."""
    errors: dict[str, str] = {}
    logs = _find(nv_root, "log.txt")
    for name in names:
        for log in logs:
            if log.parent.name != name:
                continue
            lines = log.read_text(errors="replace").splitlines()
            for i, line in enumerate(lines):
                if (SERVER_FAILURE if name == "server" else SITE_FAILURE).search(line):
                    block = [ln for ln in lines[i:i + 30] if ln.strip()]
                    end = next((j for j, ln in enumerate(block) if re.match(r"^\w+(\.\w+)*(Error|Exception):", ln)),
                               len(block) - 1)
                    errors[name] = "\n".join(block[:2] + ["  ..."] + block[max(2, end - 3):end + 1])
                    break
    return errors


class LiveRun:
    """While the simulator runs: the run's ``metrics.jsonl`` and TensorBoard grow round by round from the sites'
    own logs, the server's pooled validation and its round log (:class:`fedbrain.fl.runlog.RunLog`),
    ``status.json`` says round x of N with an ETA and each site's last contact, and the terminal gets one progress
    line per poll."""

    def __init__(self, run: RunDir, sites: list[str], status, start_round: int, rounds: int,
                 interval: float = 2.0, out=None):
        import sys
        import threading

        self.run, self.sites, self.status = run, sites, status
        self.start_round, self.rounds = start_round, rounds
        self.out = out or sys.stdout  # the terminal, even while the simulator's own output is captured
        self.interval = interval
        self.paths = {s: run.site_metrics(s) for s in sites}
        # only what is appended from now on (a resumed run's earlier rounds are in the run log already)
        self.tails = {s: JsonlTail(p) for s, p in self.paths.items()}
        self.server_tail = JsonlTail(run.server_log)
        self.val: dict[int, dict[str, dict]] = defaultdict(dict)
        self.max_round = dict.fromkeys(sites, -1)
        self.log = RunLog(run)
        self.lock = threading.Lock()
        self.stop_event = threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.printed_done = -1

    def poll(self) -> None:
        with self.lock:
            self._poll()

    def _poll(self) -> None:
        new_train: list[dict] = []
        for site, tail in self.tails.items():
            for r in tail.read():
                self.log.append(r)
                rnd = r.get("round", 0)
                self.max_round[site] = max(self.max_round[site], rnd)
                if r.get("split") == "val" and r.get("model") == "global":
                    self.val[rnd][site] = r
                elif r.get("split") == "train":
                    new_train.append(r)
        self.log.add_server_rows(self.server_tail.read())
        progress = read_json(self.run.rounds_progress) or {}
        self.log.add_progress(progress)  # a round's global row: the server's pooled validation, once it has it
        self._report(new_train, progress)

    def _latest_val(self) -> dict | None:
        """Each site's validation headline and the pooled one of the last round the server validated."""
        rows = {r["round"]: r for r in global_val_rows(read_json(self.run.rounds_progress))}
        for rnd in sorted(rows, reverse=True):
            latest = {s: r.get("macro_f1", r.get("tumour_auroc")) for s, r in self.val.get(rnd, {}).items()}
            return {**latest, "global": rows[rnd].get("score"), "round": rnd}
        return None

    def _report(self, new_train: list[dict], progress: dict) -> None:
        server = from_controller(progress)
        done, last = server.get("done", 0), server.get("round")
        contacts = server.get("sites", {})
        for site, path in self.paths.items():  # the simulator's sites log here: their last write is a contact
            c = contacts.setdefault(site, {})
            c.setdefault("last_round", self.max_round[site] if self.max_round[site] >= 0 else None)
            if "last_contact" not in c and path.is_file():
                c["last_contact"] = _dt.datetime.fromtimestamp(path.stat().st_mtime, _dt.timezone.utc).isoformat(
                    timespec="seconds")
        doc = self.status.progress(done, self.rounds, round=last, unit="round", sites=contacts,
                                   latest_val=self._latest_val())
        if not new_train and done == self.printed_done:
            return
        self.printed_done = done
        last_loss = {r["site"]: r.get("loss", float("nan")) for r in new_train}
        losses = ", ".join(f"{site} {loss:.3f}" for site, loss in sorted(last_loss.items()))
        images = sum(r.get("samples", 0) for r in new_train)
        text = f"  {progress_text(doc)}"
        if new_train:
            text += f"; trained {images} images since the last line, last loss {losses}"
        print(text, file=self.out, flush=True)

    def _loop(self) -> None:
        while not self.stop_event.wait(self.interval):
            try:
                self.poll()
            except Exception as exc:  # a monitor problem must never stop the run
                print(f"  (progress monitor: {type(exc).__name__}: {exc})", file=self.out, flush=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop_event.set()
        self.thread.join(timeout=10)
        self.poll()
        self.log.close()


def _quiet_log_config(run: RunDir) -> str:
    """NVFlare's default logging with the console at ERROR: full logs stay in each site's log.txt."""
    import copy

    from nvflare.fuel.utils.log_utils import default_log_dict

    cfg = copy.deepcopy(default_log_dict)
    cfg["handlers"]["consoleHandler"]["level"] = "ERROR"
    run.nvflare_log_config.write_text(json.dumps(cfg, indent=2))
    return str(run.nvflare_log_config)


def privacy_record(rows: list[dict], up_to_round: int) -> dict:
    """The DP guarantee of the global model of ``up_to_round``: each site's mechanism, δ and the ε it had spent by
    then (from the sites' logs); {} without DP."""
    from fedbrain.privacy_audit import privacy_spent

    spent = privacy_spent([r for r in rows if int(r.get("round", -1)) <= up_to_round])
    if not spent:
        return {}
    return {"mechanism": sorted({s["mechanism"] for s in spent.values()}),
            "delta": max(s["delta"] or 0 for s in spent.values()),
            "epsilon_per_site": {site: round(s["final_epsilon"], 4) for site, s in spent.items()},
            "budget_per_site": {site: s["budget"] for site, s in spent.items()},
            # what each site spent over all its jobs (its own ledger), and per patient by group privacy
            **{f"{key}_per_site": {site: s[key] for site, s in spent.items() if key in s}
               for key in ("site_epsilon", "patient_epsilon", "patient_delta", "slices_per_patient")
               if any(key in s for s in spent.values())}}


def round_table(rows: list[dict], sites: list[str]) -> str:
    """Global model per round: each site's validation headline and the server's pooled one."""
    val = [r for r in rows if r.get("split") == "val" and r.get("model") == "global"]
    rounds = sorted({r["round"] for r in val})
    cols = sites + ["global"]
    hdr = f"{'round':>5}  " + "".join(f"{c[:16]:>17}" for c in cols)
    lines = ["global model on each site's validation split and pooled (macro-F1, or tumour AUROC for binary sites)",
             hdr, "-" * len(hdr)]
    for rnd in rounds:
        cells = []
        for c in cols:
            r = next((x for x in val if x["round"] == rnd and x["site"] == c), None)
            v = None if r is None else r.get("macro_f1", r.get("tumour_auroc"))
            cells.append(f"{v:>17.4f}" if isinstance(v, (int, float)) else f"{'-':>17}")
        lines.append(f"{rnd:>5}  " + "".join(cells))
    return "\n".join(lines)


def finished_rounds(run: RunDir) -> list[int]:
    """The rounds whose global model the server persisted (``checkpoints/rounds/round-NNNN.pt``)."""
    return sorted(int(p.stem.split("-")[1]) for p in run.rounds.glob("round-*.pt")) if run.rounds.is_dir() else []


def is_unfinished(run: RunDir) -> bool:
    """A federated run that stopped before writing its results (killed, crashed machine)."""
    return run.config.is_file() and not run.results.is_file() and run.read_config().get("kind") == "federated"


def _write_initial_model(source: Path, run: RunDir) -> dict:
    """Copy a round file's (or checkpoint's) weights, SCAFFOLD controls and server optimiser state into
    ``initial_model.pt``."""
    import torch

    obj = load_weights(source)
    if obj.get("format"):  # a fedbrain checkpoint
        _card, state = read_checkpoint(source)
        payload = {"model": state}
    else:
        payload = {"model": obj["model"], **{k: obj[k] for k in ("scaffold_control", SERVER_STATE) if k in obj}}
    torch.save(payload, run.initial_model)
    return obj


def threads_per_site(sites: int) -> int:
    """Torch threads of each simulated site: the cores this process may use, shared out (never oversubscribed)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return max(1, cores // max(1, sites))


def continue_from(settings: JobSettings, source: Path, run: RunDir) -> None:
    """Start ``settings`` from another run's last global model (or a checkpoint), numbering rounds after it."""
    source = Path(source)
    if source.is_dir():
        src = RunDir(source)
        rounds = finished_rounds(src)
        if rounds:
            _write_initial_model(src.round_model(rounds[-1]), run)
            settings.start_round = rounds[-1] + 1
            settings.initial_checkpoint = str(run.initial_model)
            return
        source = src.last
    card, _ = read_checkpoint(source)
    if card.model != settings.model:
        raise ValueError(f"--resume checkpoint holds {card.model}, not {settings.model}")
    _write_initial_model(source, run)
    previous = card.training
    settings.start_round = int(previous.get("start_round", 0)) + int(previous.get("rounds", 0))
    settings.initial_checkpoint = str(run.initial_model)


def resume_in_place(run: RunDir) -> JobSettings:
    """The settings that finish an interrupted run in its own folder: from its last persisted round to its
    planned last one. Site logs lose the rows of the round that was cut short."""
    config = run.read_config()
    settings = JobSettings.from_dict(config["job"])
    planned_end = settings.start_round + settings.rounds
    if settings.plan_start_round is None:  # the server's lr schedule and validated rounds keep the whole plan
        settings.plan_start_round = settings.start_round
    done = finished_rounds(run)
    if done:
        _write_initial_model(run.round_model(done[-1]), run)
        settings.initial_checkpoint = str(run.initial_model)
        settings.start_round = done[-1] + 1
    settings.rounds = planned_end - settings.start_round
    settings.cross_site_eval = settings.cross_site_eval and settings.rounds > 0
    run.stop_request.unlink(missing_ok=True)
    cut = settings.start_round
    if run.metrics.is_file():  # the run log grew live: keep the rounds that will not run again
        keep = [r for r in read_metrics(run.metrics) if r.get("round", 0) < cut and r.get("split") != "test"]
        run.metrics.write_text("".join(json.dumps(r) + "\n" for r in keep))
    for site in config.get("sites", []):
        path = run.site_metrics(site)
        if path.is_file():
            keep = [r for r in read_metrics(path) if r.get("round", 0) < cut]
            path.write_text("".join(json.dumps(r) + "\n" for r in keep))
    log = run.server_log
    if log.is_file():
        keep = [r for r in read_metrics(log) if (r.get("round") or 0) < cut]
        log.write_text("".join(json.dumps(r) + "\n" for r in keep))
    return settings


def pretrained_start(settings: JobSettings, run: RunDir) -> str:
    """Where the registry model starts from ImageNet weights, make them NVFlare's initial global model.

    Returns the weights' source ('imagenet', 'file:...' or 'random'); 'random' leaves the settings alone
    (NVFlare then initialises the model itself)."""
    import torch

    if settings.pretrained is False:
        return "random"
    model = create_model(settings.model, pretrained=settings.pretrained, **settings.model_kwargs)
    source = weights_source(model)
    if source != "random":
        torch.save({"model": model.state_dict()}, run.initial_model)
        settings.initial_checkpoint = str(run.initial_model)
    return source


def run_simulation(fed: Federation, settings: JobSettings, run: RunDir, cache_dir: Path | None = None,
                   quiet: bool = True, evaluate: bool = True) -> dict:
    """Run the job in SimEnv; returns a summary with failed sites, timings and final metrics (``evaluate=False``:
    the simulator's own files only, no test evaluation or ``results.json``, for a benchmark of the wire).

    ``status.json`` follows the run: starting, running (round x of N), then finished, failed (with each failed
    site's error) or stopped (``fedbrain runs stop``: the models of the rounds that ran are evaluated)."""
    run = RunDir(Path(run).resolve())
    status = StatusWriter(run, kind="federated", algorithm=settings.algorithm, model=settings.model,
                          sites={s: {} for s in fed.sites}, done=0, total=settings.rounds, unit="round")
    try:
        summary = _simulate(fed, settings, run, status, cache_dir, quiet, evaluate)
    except BaseException as exc:
        interrupted = isinstance(exc, KeyboardInterrupt)
        status.finish(STOPPED if interrupted else FAILED,
                      error="interrupted (Ctrl+C)" if interrupted else f"{type(exc).__name__}: {exc}")
        raise
    failed = summary.get("failed_sites") or {}
    error = summary.get("error")
    if failed:
        error = f"{len(failed)} site(s) failed: {', '.join(failed)}" + (f"; {error}" if error else "")
    state = FAILED if (failed or error) else STOPPED if summary.get("stopped_early") else FINISHED
    status.finish(state, error=error, site_errors=failed or None, best_round=summary.get("best_round"),
                  headline=headline_of((summary.get("test") or {}).get(UNION)))
    return summary


def allow_job_components(recipe, workspace: Path) -> None:
    """The simulator builds only allow-listed classes, as a hospital's kit does: a fedbrain job carries no code
    (not bring-your-own-code), so NVFlare's default list plus this job's own classes go into the simulation
    workspace's ``local/resources.json.default`` (which SimEnv then leaves as it is)."""
    import json
    import tempfile

    from nvflare.app_common.default_component_policy import DEFAULT_CLASS_ALLOW_LIST

    from fedbrain.fl.deploy import ALLOWED_PACKAGES, job_component_classes

    with tempfile.TemporaryDirectory() as tmp:
        recipe.export(job_dir=tmp)
        classes = set().union(*job_component_classes(tmp).values())
    local = workspace / "local"
    local.mkdir(parents=True, exist_ok=True)
    allow = [*DEFAULT_CLASS_ALLOW_LIST, *ALLOWED_PACKAGES]
    allow += sorted(c for c in classes if c not in allow and not c.startswith(ALLOWED_PACKAGES))
    (local / "resources.json.default").write_text(json.dumps({"format_version": 2, "class_allow_list": allow},
                                                             indent=1))


def _simulate(fed: Federation, settings: JobSettings, run: RunDir, status, cache_dir: Path | None,
              quiet: bool, evaluate: bool = True) -> dict:
    from nvflare.recipe import SimEnv

    fed.write(run.root)
    if not settings.initial_checkpoint:
        pretrained_start(settings, run)
    if settings.distil_from and Path(settings.distil_from).resolve() != run.teacher.resolve():
        import shutil

        run.teacher.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(settings.distil_from, run.teacher)  # the run keeps the teacher it learned from
        settings.distil_from = str(run.teacher)
    sites = list(fed.sites)
    from fedbrain.secagg import secure_aggregation_on

    settings.secure_aggregation = secure_aggregation_on(settings, len(sites))  # each site makes its own key
    if settings.threads_per_site is None:
        settings.threads_per_site = threads_per_site(len(sites))
    run.write_config(kind="federated", algorithm=settings.algorithm, model=settings.model,
                     job=settings.to_dict(), federation=fed.spec.to_dict(), sites=sites)
    recipe = build_recipe(settings, sites, run.split_files(sites), run_dir=str(run),
                          cache_dir=str(cache_dir) if cache_dir else None)
    # the simulator ignores a site's own local/privacy.json (a deployed kit's, from fedbrain provision): the same
    # filter goes into the job, reading each simulated hospital's policy file
    from fedbrain.fl.policy_filter import SitePolicyFilter
    from fedbrain.fl.recipes import SITE_TASKS

    recipe.add_client_output_filter(SitePolicyFilter(str(run.site_policy("{site}"))), tasks=SITE_TASKS)
    allow_job_components(recipe, Path(run.nvflare) / recipe._job.name)
    env = SimEnv(clients=sites, num_threads=len(sites), workspace_root=str(run.nvflare),
                 log_config=_quiet_log_config(run) if quiet else None)
    t0 = time.perf_counter()
    buf = io.StringIO()
    redirect = contextlib.redirect_stdout(buf) if quiet else contextlib.nullcontext()
    level = logging.getLogger().level
    sim_error = None
    try:
        with LiveRun(run, sites, status, settings.start_round, settings.rounds), redirect:
            if settings.rounds > 0:  # a resumed run may only lack its final evaluation
                recipe.execute(env)
    except RuntimeError as exc:  # the simulator reports a failed run this way (server aborted)
        sim_error = str(exc)
    finally:
        logging.getLogger().setLevel(level)
    wall = time.perf_counter() - t0
    run.simulator_stdout.write_text(buf.getvalue())
    errors = site_errors(run.nvflare, sites + ["server"])
    if sim_error and not errors:
        errors = {"server": sim_error}
    rows = merge_run_log(run, sites)
    summary = {"wall_seconds": wall, "failed_sites": errors, "sites": sites}
    progress = read_json(run.rounds_progress) or {}
    if progress.get("stopped_early"):
        summary["stopped_early"] = True
        summary["stopped_after_round"] = progress.get("last_round")
    if not evaluate:
        return summary
    status.update(state="running", eta_s=None, phase="evaluating the best global model on every test split")
    return _evaluate_best(fed, settings, run, rows, summary, cache_dir)


def _evaluate_best(fed: Federation, settings: JobSettings, run: RunDir, rows: list[dict], summary: dict,
                   cache_dir: Path | None) -> dict:
    """The end of a simulated job: the server's models as checkpoints, the best one evaluated on every site's test
    split and their union (the simulator's machine holds them), ``results.json``."""
    done = finished_rounds(run)
    if not done:
        summary["error"] = "the simulator produced no global model"
        return summary
    card = federated_card(settings, {n: s.scheme for n, s in fed.sites.items()})
    model, card, best_round = save_global_models(run, card, run.round_model(done[-1]),
                                                 run.rounds_best if run.rounds_best.is_file() else None, done[-1])
    summary["best_round"] = best_round
    loaders = site_loaders(fed.sites, card.preprocessing, 64, cache_dir, union=UNION)
    place(model, resolve_device(settings.train.device))
    results = evaluate_everywhere(model, loaders, calibrator=card.calibrator)
    summary["site_probe"] = site_separability(model, settings.model, loaders)
    privacy = privacy_record(rows, best_round)
    if privacy:
        summary["privacy"] = privacy
    save_best(run, model, card, best_round, results, **({"privacy": privacy} if privacy else {}))
    cse = cross_site_matrix(run.nvflare)
    if cse:
        run.cross_site.write_text(json.dumps(cse, indent=2))
    summary.update({"test": results, "train_seconds_per_site": train_seconds(rows),
                    "rounds_table": round_table(rows, list(fed.sites))})
    write_results(run, summary, results, done[-1])
    return summary
