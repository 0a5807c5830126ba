"""A federated run's folder, written one way for the simulator and for a deployment (POC or production).

* ``metrics.jsonl`` grows while the job runs: each round's ``global`` row is the server's pooled validation (the
  score it picks the best model by: the sites' summed validation counts, :func:`fedbrain.fl.metrics.pooled_validation`),
  read from the controller's progress (``progress.json`` in the simulator, the admin API's ``show_stats`` in a
  deployment); the server's aggregation rows follow from its round log; the sites' own rows join where the
  machine running the job can read them (the simulator).
* ``results.json``: the best model's test metrics. A deployment has only what leaves a site: each site's test
  counts from cross-site evaluation, summed here (:func:`pooled_test_results`).
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

from fedbrain.checkpoint import ModelCard, global_state, load_weights, save_checkpoint, training_card
from fedbrain.contract import augmentation_policy
from fedbrain.evaluation import UNION
from fedbrain.fl.metrics import POOLED_VAL, pooled_row, pooled_validation, with_round_fits
from fedbrain.models import create_model
from fedbrain.runs import (
    ROUND_FILE,
    ROUNDS_BEST,
    ROUNDS_PROGRESS,
    MetricsLog,
    RunDir,
    append_jsonl,
    flat_scalars,
    read_json,
    read_metrics,
)

# what results.json keeps of each test evaluation besides its scalars
RESULT_TABLES = ("per_class", "confusion_matrix", "ci", "unreliable", "reliability", "calibration", "uncalibrated")


def global_val_rows(progress: dict | None) -> list[dict]:
    """The ``global`` rows of the run log from the controller's progress: per round, the server's pooled validation."""
    rows = []
    for rnd, pooled in sorted(((int(r), p) for r, p in ((progress or {}).get(POOLED_VAL) or {}).items())):
        if isinstance(pooled, dict) and pooled:
            rows.append({"round": rnd, "site": "global", "split": "val", "model": "global", "pooled": True, **pooled})
    return rows


def aggregation_row(r: dict) -> dict | None:
    """A server round-log line as the run log's ``aggregation`` row (who drove the global model)."""
    if not r.get("aggregated") or r.get("site") == "server":
        return None
    return {"round": r["round"], "site": r["site"], "split": "aggregation", "model": "update",
            **{k: r[k] for k in ("weight", "weight_share", "update_norm", "steps", "samples")
               if isinstance(r.get(k), (int, float))}}


class RunLog:
    """Appends to a run's ``metrics.jsonl`` (and TensorBoard) as the job goes: each round's global row once."""

    def __init__(self, run: RunDir):
        self.run = run
        self.emitted = {r["round"] for r in read_metrics(run.metrics) if r.get("site") == "global"}
        self.log = MetricsLog.of(run)

    def append(self, row: dict) -> None:
        append_jsonl(self.run.metrics, row)
        self.log.scalars(row)

    def add_progress(self, progress: dict | None) -> list[dict]:
        """The global rows of the rounds the server validated since the last call (returned, and appended)."""
        new = [r for r in global_val_rows(progress) if r["round"] not in self.emitted]
        for row in new:
            self.append(row)
            self.emitted.add(row["round"])
        return new

    def add_server_rows(self, rows: list[dict]) -> None:
        for row in filter(None, map(aggregation_row, rows)):
            self.append(row)

    def close(self) -> None:
        self.log.close()


def server_progress(folder: Path | None) -> dict:
    """The controller's last ``progress.json`` under ``folder`` (a run's checkpoints, a downloaded job result)."""
    if folder is None or not Path(folder).is_dir():
        return {}
    found = sorted(Path(folder).rglob(ROUNDS_PROGRESS))
    progress = read_json(found[0]) if found else None
    return progress if isinstance(progress, dict) else {}


def merge_run_log(run: RunDir, sites: list[str], server_rows: list[dict] | None = None,
                  progress: dict | None = None) -> list[dict]:
    """The run log in canonical order, rewritten from each site's own log (where this machine has it), the server's
    pooled validation per round (its ``progress``; rounds an earlier part of a resumed run validated are kept from
    the log) and its aggregation rows (``server_rows``: its round log; default: the run's own)."""
    rows = []
    for site in sites:
        rows += read_metrics(run.site_metrics(site))
    rows.sort(key=lambda r: (r.get("round", 0), r.get("site", ""), r.get("split", "")))
    pooled = {r["round"]: r for r in read_metrics(run.metrics) if r.get("site") == "global" and r.get("pooled")}
    pooled.update({r["round"]: r for r in global_val_rows(server_progress(run.rounds) if progress is None
                                                          else progress)})
    out = rows + [pooled[r] for r in sorted(pooled)]
    server_rows = read_metrics(run.server_log) if server_rows is None else server_rows
    out += [row for row in map(aggregation_row, server_rows) if row]
    run.root.mkdir(parents=True, exist_ok=True)
    tmp = run.metrics.with_name(run.metrics.name + ".tmp")
    tmp.write_text("".join(json.dumps(r, default=str) + "\n" for r in out))
    tmp.replace(run.metrics)
    return out


def pooled_test_results(cross_site: dict, model: str) -> dict[str, dict]:
    """``results.json``'s ``test`` from cross-site evaluation of the server's ``model``: each site's scalars as it
    sent them, and the union's metrics from the sites' test counts summed (no image or score left a site)."""
    per_site = (cross_site.get("matrix") or {}).get(model) or {}
    out: dict[str, dict] = {}
    for site, metrics in sorted(per_site.items()):
        if isinstance(metrics, dict):
            out[site] = {k[len("test_"):]: v for k, v in metrics.items()
                         if k.startswith("test_") and not k.startswith(("test_cm_", "test_hist_"))}
    pooled = pooled_row(pooled_validation([m for m in per_site.values() if isinstance(m, dict)], prefix="test"),
                        prefix="test")
    if pooled:
        out[UNION] = pooled
    return out


def server_model_name(cross_site: dict) -> str | None:
    """The server's best model among those cross-site evaluation scored (else its last one)."""
    names = [m for m in cross_site.get("models") or [] if m.startswith("SRV_")]
    best = [m for m in names if "best" in m]
    return (best or names or [None])[0]


def cross_site_matrix(root: Path) -> dict | None:
    """NVFlare's ``cross_val_results.json`` under ``root`` as {models, sites, matrix: model -> site -> metrics}."""
    files = sorted(Path(root).rglob("cross_val_results.json")) if Path(root).is_dir() else []
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


def train_seconds(rows: list[dict]) -> dict[str, float]:
    out: dict[str, float] = defaultdict(float)
    for r in rows:
        if r.get("split") == "train":
            out[r["site"]] += r.get("seconds", 0.0)
    return dict(out)


# ---------------------------------------------------------------- the global models and results.json


def federated_card(settings, label_schemes: dict[str, str], **training) -> ModelCard:
    """The card of a federated job's global model (simulated or deployed; ``training``: what else to record)."""
    return training_card(settings.model, settings.model_kwargs, settings.image_size, label_schemes,
                         {**settings.to_dict(), "mode": "federated",
                          "augmentation": augmentation_policy(settings.train.augmentation).to_dict(), **training})


def server_models(folder: Path | None) -> tuple[Path | None, Path | None]:
    """(the last global model, the best by the pooled validation score) the server left under ``folder``."""
    if folder is None or not Path(folder).is_dir():
        return None, None
    rounds = sorted(Path(folder).rglob(ROUND_FILE.format(0).replace("0000", "*")))
    last = rounds[-1:] or sorted(Path(folder).rglob("FL_global_model.pt"))
    best = [p for p in Path(folder).rglob(ROUNDS_BEST) if p.parent.name == "rounds"]
    return (last[0] if last else None), (best[0] if best else None)


def save_global_models(run: RunDir, card: ModelCard, last: Path, best: Path | None, last_round: int):
    """Write ``checkpoints/last.pt`` and load the best model (the last where the server kept none).

    Returns (the model with the best weights, its card with the calibration and input profile the server fitted
    from the sites' sums in its round, that round)."""
    model = create_model(card.model, pretrained=False, **card.model_kwargs)
    model.load_state_dict(global_state(last))
    save_checkpoint(run.last, model, card.replace(training={**card.training, "last_round": last_round}))
    if best is None:
        return model, card, last_round
    model.load_state_dict(global_state(best))
    best_file = load_weights(best)
    return model, with_round_fits(card, best_file.get("metrics") or {}), int(best_file.get("round", last_round))


def save_best(run: RunDir, model, card: ModelCard, best_round: int, test: dict, **training) -> None:
    save_checkpoint(run.best, model, card.replace(metrics={"test": test}, training={
        **card.training, "best_round": best_round, "selected_by": "pooled validation score of the sites' counts",
        **training}))


def write_results(run: RunDir, summary: dict, test: dict[str, dict], last_round: int) -> None:
    """``results.json`` (the summary and the best model's test metrics) and the run log's test rows."""
    log = MetricsLog.of(run)  # (the per-round rows reached TensorBoard while the run was live)
    for name, m in test.items():
        log.log(last_round, name, "test", m, checkpoint="best", model="global")
    log.close()
    out = {k: v for k, v in summary.items() if k != "rounds_table"}
    out["test"] = {k: flat_scalars(v) | {kk: v[kk] for kk in RESULT_TABLES if kk in v} for k, v in test.items()}
    run.write_results(out)


def finish_deployed_run(run: RunDir, settings, result_dir: Path | None, label_schemes: dict[str, str],
                        summary: dict, **training) -> dict:
    """The end of a deployed job (``fedbrain submit``, a POC job), from the server's downloaded workspace: the run
    log (global rows from the server's pooled validation, aggregation rows, the sites' rows where this machine has
    their logs), ``checkpoints/last.pt`` and ``best.pt``, ``cross_site.json`` and ``results.json`` from the sites'
    summed test counts. Returns the summary as written; the checkpoints are left out when no model came back."""
    sites = summary.get("sites") or []
    server_logs = sorted(Path(result_dir).rglob(run.server_log.name)) if result_dir and result_dir.is_dir() else []
    progress = server_progress(run.rounds) or server_progress(result_dir)
    rows = merge_run_log(run, sites, server_rows=read_metrics(server_logs[0]) if server_logs
                         else read_metrics(run.server_log), progress=progress)
    last, best = server_models(run.rounds)  # a POC job's server writes into the run folder
    if last is None:
        last, best = server_models(result_dir)
    test: dict[str, dict] = {}
    if last is not None:
        last_round = int(load_weights(last).get("round", progress.get("last_round") or 0))
        card = federated_card(settings, label_schemes, **training)
        model, card, best_round = save_global_models(run, card, last, best, last_round)
        cse = cross_site_matrix(result_dir) if result_dir else None
        if cse:
            run.cross_site.write_text(json.dumps(cse, indent=2))
            name = server_model_name(cse)
            test = pooled_test_results(cse, name) if name else {}
            summary = {**summary, "test_source": f"cross-site evaluation of {name}: each site's scalars, the union "
                                                 "from the sites' summed test counts"}
        save_best(run, model, card, best_round, test)
        summary = {**summary, "best_round": best_round}
    summary = {**summary, "train_seconds_per_site": train_seconds(rows), "rounds": sorted(
        {r["round"] for r in rows if r.get("site") == "global"})}
    write_results(run, summary, test, progress.get("last_round") or 0)
    return summary
