"""Run a federation in the NVFlare simulator and turn its outputs into a fedbrain run folder."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import re
import time
from collections import defaultdict
from pathlib import Path

from fedbrain.checkpoint import ModelCard, global_state, load_weights, read_checkpoint, save_checkpoint
from fedbrain.contract import Augmentation, supervised_granularity
from fedbrain.data.dataset import site_loaders
from fedbrain.data.federation import Federation
from fedbrain.evaluation import UNION, evaluate_everywhere, site_separability
from fedbrain.fl.recipes import build_recipe
from fedbrain.models import create_model, default_preprocessing, weights_source
from fedbrain.runs import MetricsLog, RunDir, append_jsonl, flat_scalars, read_metrics
from fedbrain.settings import JobSettings

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


class ProgressPrinter:
    """Prints each site's round as its own log grows (the simulator itself runs in subprocesses)."""

    def __init__(self, run: RunDir, sites: list[str], rounds: int, interval: float = 2.0):
        import sys
        import threading

        self.out = sys.stdout  # the terminal, even while the simulator's own output is captured
        self.paths = {s: run.site_metrics(s) for s in sites}
        self.seen = dict.fromkeys(sites, 0)
        self.rounds, self.interval = rounds, interval
        self.stop_event = threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True)

    def _poll(self) -> None:
        trained: dict[str, list[dict]] = {}
        for site, path in self.paths.items():
            rows = read_metrics(path)
            for r in rows[self.seen[site]:]:
                if r.get("split") == "val":
                    v = r.get("macro_f1", r.get("tumour_auroc"))
                    score = f"{v:.3f}" if isinstance(v, (int, float)) else "-"
                    print(f"  round {r['round'] + 1}/{self.rounds}  {site:<16} global model val {score}",
                          file=self.out, flush=True)
                elif r.get("split") == "train":
                    trained.setdefault(site, []).append(r)
            self.seen[site] = len(rows)
        if trained:  # one line per poll: short rounds would otherwise print thousands of lines
            done = [r["round"] + 1 for rs in trained.values() for r in rs]
            span = f"round {max(done)}" if min(done) == max(done) else f"rounds {min(done)}-{max(done)}"
            images = sum(r.get("samples", 0) for rs in trained.values() for r in rs)
            seconds = sum(r.get("seconds", 0) for rs in trained.values() for r in rs)
            losses = ", ".join(f"{site} {rs[-1].get('loss', float('nan')):.3f}" for site, rs in trained.items())
            print(f"  {span}/{self.rounds}  trained {images} images in {seconds:.0f} s; last loss {losses}",
                  file=self.out, flush=True)

    def _loop(self) -> None:
        while not self.stop_event.wait(self.interval):
            self._poll()

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop_event.set()
        self.thread.join(timeout=5)
        self._poll()


def _quiet_log_config(run: RunDir) -> str:
    """NVFlare's default logging with the console at ERROR: full logs stay in each site's log.txt."""
    import copy

    from nvflare.fuel.utils.log_utils import default_log_dict

    cfg = copy.deepcopy(default_log_dict)
    cfg["handlers"]["consoleHandler"]["level"] = "ERROR"
    run.nvflare_log_config.write_text(json.dumps(cfg, indent=2))
    return str(run.nvflare_log_config)


def merge_site_metrics(run: RunDir, sites: list[str]) -> list[dict]:
    """Collect each site's own log into metrics.jsonl and add the weighted 'global' row per round."""
    rows = []
    for site in sites:
        rows += read_metrics(run.site_metrics(site))
    rows.sort(key=lambda r: (r.get("round", 0), r.get("site", ""), r.get("split", "")))
    by_round: dict[int, list[dict]] = defaultdict(list)
    for r in rows:
        if r.get("split") == "val" and r.get("model") == "global":
            by_round[r["round"]].append(r)
    out = list(rows)
    for rnd, rs in sorted(by_round.items()):
        total = sum(r.get("n", 0) for r in rs)
        if not total:
            continue
        agg = {"round": rnd, "site": "global", "split": "val", "model": "global", "n": total, "sites": len(rs)}
        for key in ("macro_f1", "accuracy", "tumour_accuracy", "tumour_auroc", "macro_auroc"):
            have = [r for r in rs if isinstance(r.get(key), (int, float))]
            weight = sum(r.get("n", 0) for r in have)
            if have and weight:
                agg[key] = sum(r[key] * r["n"] for r in have) / weight
        out.append(agg)
    for r in read_metrics(run.server_log):  # who drove the global model: each site's weight share and update norm
        if r.get("aggregated") and r.get("site") != "server":
            out.append({"round": r["round"], "site": r["site"], "split": "aggregation", "model": "update",
                        **{k: r[k] for k in ("weight", "weight_share", "update_norm", "steps", "samples")
                           if isinstance(r.get(k), (int, float))}})
    for r in out:
        append_jsonl(run.metrics, r)
    return out


def cross_site_matrix(nv_root: Path) -> dict | None:
    files = _find(nv_root, "cross_val_results.json")
    if not files:
        return None
    raw = json.loads(files[0].read_text())
    if not raw:  # NVFlare leaves an empty file when no cross-site evaluation ran
        return None
    matrix: dict[str, dict[str, dict]] = defaultdict(dict)
    for evaluator, per_model in raw.items():
        for model_name, metrics in per_model.items():
            matrix[model_name][evaluator] = metrics
    return {"models": sorted(matrix), "sites": sorted(raw), "matrix": matrix, "source": str(files[0])}


def round_table(rows: list[dict], sites: list[str]) -> str:
    """Global model per round: each site's validation headline and the weighted global one."""
    val = [r for r in rows if r.get("split") == "val" and r.get("model") == "global"]
    rounds = sorted({r["round"] for r in val})
    cols = sites + ["global"]
    hdr = f"{'round':>5}  " + "".join(f"{c[:16]:>17}" for c in cols)
    lines = ["global model on each site's validation split (macro-F1, or tumour AUROC for binary sites)",
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
    """Copy a round file's (or checkpoint's) weights, and SCAFFOLD controls, into ``initial_model.pt``."""
    import torch

    from fedbrain.checkpoint import load_weights

    obj = load_weights(source)
    if obj.get("format"):  # a fedbrain checkpoint
        _card, state = read_checkpoint(source)
        payload = {"model": state}
    else:
        payload = {"model": obj["model"], **({"scaffold_control": obj["scaffold_control"]}
                                             if "scaffold_control" in obj else {})}
    torch.save(payload, run.initial_model)
    return obj


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
    done = finished_rounds(run)
    if done:
        _write_initial_model(run.round_model(done[-1]), run)
        settings.initial_checkpoint = str(run.initial_model)
        settings.start_round = done[-1] + 1
    settings.rounds = planned_end - settings.start_round
    settings.cross_site_eval = settings.cross_site_eval and settings.rounds > 0
    cut = settings.start_round
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
                   quiet: bool = True) -> dict:
    """Run the job in SimEnv; returns a summary with failed sites, timings and final metrics."""
    from nvflare.recipe import SimEnv

    run = RunDir(Path(run).resolve())
    fed.write(run.root)
    if not settings.initial_checkpoint:
        pretrained_start(settings, run)
    sites = list(fed.sites)
    if settings.threads_per_site is None:
        settings.threads_per_site = max(1, (os.cpu_count() or 1) // len(sites))
    run.write_config(kind="federated", algorithm=settings.algorithm, model=settings.model,
                     job=settings.to_dict(), federation=fed.spec.to_dict(), sites=sites)
    recipe = build_recipe(settings, sites, run.split_files(sites), run_dir=str(run),
                          cache_dir=str(cache_dir) if cache_dir else None)
    env = SimEnv(clients=sites, num_threads=len(sites), workspace_root=str(run.nvflare),
                 log_config=_quiet_log_config(run) if quiet else None)
    t0 = time.perf_counter()
    buf = io.StringIO()
    redirect = contextlib.redirect_stdout(buf) if quiet else contextlib.nullcontext()
    level = logging.getLogger().level
    sim_error = None
    try:
        with ProgressPrinter(run, sites, settings.start_round + settings.rounds), redirect:
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
    rows = merge_site_metrics(run, sites)
    summary = {"wall_seconds": wall, "failed_sites": errors, "sites": sites}

    # the global model: the simulator's persistor files -> self-describing checkpoints
    pre = default_preprocessing(settings.model, settings.image_size)
    card = ModelCard(model=settings.model, model_kwargs=settings.model_kwargs, preprocessing=pre,
                     supervised_granularity=supervised_granularity([s.scheme for s in fed.sites.values()]),
                     label_schemes={n: s.scheme for n, s in fed.sites.items()},
                     training={**settings.to_dict(), "mode": "federated", "augmentation": Augmentation().to_dict()})
    done = finished_rounds(run)
    if not done:
        summary["error"] = "the simulator produced no global model"
        return summary
    best = run.rounds_best
    model = create_model(settings.model, pretrained=False, **settings.model_kwargs)
    model.load_state_dict(global_state(run.round_model(done[-1])))
    save_checkpoint(run.last, model, card.replace(training={**card.training, "last_round": done[-1]}))
    best_round = done[-1]
    if best.is_file():
        model.load_state_dict(global_state(best))
        best_round = int(load_weights(best).get("round", done[-1]))
    summary["best_round"] = best_round
    loaders = site_loaders(fed.sites, pre, 64, cache_dir, union=UNION)
    results = evaluate_everywhere(model, loaders)
    summary["site_probe"] = site_separability(model, settings.model, loaders)
    save_checkpoint(run.best, model, card.replace(metrics={"test": results}, training={
        **card.training, "best_round": best_round, "selected_by": "pooled validation score of the sites' counts"}))
    log = MetricsLog.of(run)
    for r in rows:  # the per-round site and global rows, as TensorBoard scalars too
        log.scalars(r)
    for name, m in results.items():
        log.log(settings.start_round + settings.rounds - 1, name, "test", m, checkpoint="best", model="global")
    log.close()
    cse = cross_site_matrix(run.nvflare)
    if cse:
        run.cross_site.write_text(json.dumps(cse, indent=2))
    train_seconds = defaultdict(float)
    for r in rows:
        if r.get("split") == "train":
            train_seconds[r["site"]] += r.get("seconds", 0.0)
    summary.update({"test": results, "train_seconds_per_site": dict(train_seconds),
                    "rounds_table": round_table(rows, sites)})
    out = {k: v for k, v in summary.items() if k != "rounds_table"}
    out["test"] = {k: flat_scalars(v) | {kk: v[kk] for kk in ("per_class", "confusion_matrix", "ci", "unreliable")
                                        if kk in v}
                   for k, v in results.items()}
    run.write_results(out)
    return summary
