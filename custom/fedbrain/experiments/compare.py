"""Federated vs centralised vs each hospital alone, at the same budget (epochs over the data), over seeds.

Rows: one per (mode, seed, evaluated site), every metric with its 95 % bootstrap interval and small-n flag.
Modes: the federated algorithms; optionally an IID control (the same site sizes, training images shuffled
across sites: what is left of the gap is the federated loop, not the label skew), the DP row, and an
ablation ladder that switches the label-skew levers off one at a time; then centralised (all sites pooled)
and every site alone. The summary gives mean ± sd over seeds of the union metrics and each federated
mode's gap to centralised.
"""

from __future__ import annotations

import csv
import math
import random
import statistics
import time
from dataclasses import dataclass, replace
from pathlib import Path

from fedbrain.calibration import Calibrator
from fedbrain.data.federation import Federation, SiteData
from fedbrain.evaluation import UNCALIBRATED_KEYS as RAW_METRICS
from fedbrain.evaluation import UNION
from fedbrain.experiments.pooled import train_pooled
from fedbrain.experiments.stats import REFERENCE, describe_gap, paired_gaps
from fedbrain.fl.metrics import CLASS_COUNTS, site_batch_size
from fedbrain.fl.privacy import epsilon_after
from fedbrain.fl.simulate import run_simulation
from fedbrain.runs import RunDir, write_json
from fedbrain.settings import ALGORITHMS, JobSettings, legacy_overrides
from fedbrain.status import FAILED, FINISHED, STOPPED, StatusWriter
from fedbrain.training import TrainConfig

METRICS = ("macro_f1", "tumour_auroc", "no_tumor_recall", "accuracy")
FIELDS = (["mode", "kind", "seed", "site", "evaluated_on", "n", "n_no_tumor"]
          + [f"{m}{s}" for m in METRICS for s in ("", "_lo", "_hi")]
          + ["tumour_accuracy", "ece", "tumour_ece", "calibration"] + [f"{k}_raw" for k in RAW_METRICS]
          + ["unreliable", "site_probe", "budget_epochs",
             "rounds", "seconds", "dp_epsilon", "error"])
ALGORITHM_MODES = set(ALGORITHMS)
UNSEEN_TEST, UNSEEN_ALL = "test split (unseen hospital)", "every image (unseen hospital)"

# The label-skew levers, each switched back to the old behaviour on its own (leave-one-out from the default),
# and all of them together ("legacy"): what each lever buys, at the same budget.
ABLATION: tuple[tuple[str, dict], ...] = (
    ("- GroupNorm (BatchNorm model)", {"model": "fedbrain_cnn"}),
    ("- proportional batches", {"batch_split": "site"}),
    ("- federation class balance", {"class_balance": "site"}),
    ("- FedAdam (FedAvg of local AdamW steps)", {"server_optimizer": "sgd", "server_lr": 1.0,
                                                 "train": {"optimizer": "adamw", "lr": TrainConfig.lr}}),
    ("- one step per round (1 local epoch)", {"train": {"steps": 0, "epochs": 1, "lr": 0.01}}),
)


@dataclass
class Mode:
    """One row group: a federated job, or pooled training over some sites."""

    name: str
    kind: str  # federated | centralized | local
    settings: JobSettings | None = None
    train: TrainConfig | None = None
    sites: list[str] | None = None
    iid: bool = False
    dp: tuple[float, float] | None = None
    held_out: str | None = None  # leave-one-hospital-out: this site takes no part and is scored as unseen


def epochs_per_round(settings: JobSettings, fed: Federation) -> float:
    """Passes over the federation's training data one round makes (local epochs, or local steps on each site's
    batch: its own, or its share of a federation-wide batch)."""
    if settings.dp_epsilon > 0:  # DP-SGD: every site samples each image with the job's rate, every step
        return (settings.train.steps or settings.train.epochs / settings.dp_sample_rate) * settings.dp_sample_rate
    if not settings.train.steps:
        return float(settings.train.epochs)
    sizes = [len(s.splits["train"]) for s in fed.sites.values()]
    n = max(1, sum(sizes))
    b = settings.train.batch_size
    per_step = sum(site_batch_size(b, k, {CLASS_COUNTS: [n]}) for k in sizes) if settings.batch_split == \
        "proportional" else b * len(sizes)
    return settings.train.steps * per_step / n


def budget_epochs(settings: JobSettings, fed: Federation) -> int:
    """The epochs a pooled run gets for the same budget as the federated job."""
    return max(1, round(settings.rounds * epochs_per_round(settings, fed)))


def rounds_for_budget(settings: JobSettings, fed: Federation, epochs: float) -> int:
    """The rounds that give ``epochs`` passes over the federation's training data."""
    return max(1, math.ceil(epochs / epochs_per_round(settings, fed) - 1e-9))


def with_overrides(settings: JobSettings, overrides: dict, fed: Federation | None = None) -> JobSettings:
    """``settings`` with JobSettings fields and (under ``train``) TrainConfig fields replaced; with ``fed``, the
    rounds are adjusted so that the job keeps the same budget in epochs over the data."""
    train = overrides.get("train", {})
    fields = {k: v for k, v in overrides.items() if k != "train"}
    out = replace(settings, train=replace(settings.train, **train), **fields)
    if fed is not None:
        out.rounds = rounds_for_budget(out, fed, settings.rounds * epochs_per_round(settings, fed))
    return out


def iid_federation(fed: Federation, seed: int = 0) -> Federation:
    """The IID control: every site keeps its size and its val/test splits, the training images are shuffled
    across sites (so every site sees every class and every source)."""
    pool = [r for s in fed.sites.values() for r in s.splits["train"]]
    random.Random(seed).shuffle(pool)
    sites, k = {}, 0
    for name, s in fed.sites.items():
        n = len(s.splits["train"])
        sites[name] = SiteData(name, "mixed", {**s.splits, "train": pool[k:k + n]}, s.summary)
        k += n
    return replace(fed, sites=sites)


def plan_modes(fed: Federation, settings: JobSettings, algorithms: list[str], dp: tuple[float, float] | None = None,
               iid_control: bool = False, ablation: bool = False, legacy: bool = False,
               central: TrainConfig | None = None, baselines: bool = True, leave_one_out: bool = False,
               dp_curve: list[float] | None = None) -> list[Mode]:
    """The rows of a comparison; every federated mode has the same budget as the pooled ones (``baselines``:
    with the centralised and local-only rows; ``leave_one_out``: one federation per hospital without it, the
    same epochs over its smaller data, scored on the hospital it never saw)."""
    modes = [Mode(alg, "federated", settings.with_algorithm(alg)) for alg in algorithms]
    if iid_control:
        modes.append(Mode(f"{settings.algorithm} IID control", "federated", settings, iid=True))
    if legacy:
        legacy_settings = with_overrides(settings, legacy_overrides(), fed)
        modes.append(Mode(f"{settings.algorithm} legacy", "federated", legacy_settings))
    if ablation:
        modes += [Mode(f"{settings.algorithm} {label}", "federated", with_overrides(settings, o, fed))
                  for label, o in ABLATION if o.get("model") != "fedbrain_cnn" or settings.model == "fedbrain_cnn_gn"]
    if leave_one_out:
        if len(fed.sites) < 2:
            raise ValueError("leave-one-out needs at least two hospitals")
        modes += [Mode(f"{settings.algorithm} without {name}", "federated", settings, held_out=name)
                  for name in fed.sites]
    if dp:
        modes.append(Mode("fedavg+dp", "federated", settings.with_algorithm("fedavg", dp_clip=dp[0],
                                                                             dp_noise=dp[1]), dp=dp))
    for eps in dp_curve or []:  # record-level DP at every site; inf: the same schedule without noise or clipping
        s = with_overrides(settings.with_algorithm("fedavg"), {"dp_epsilon": eps}, fed)
        modes.append(Mode(f"fedavg dp-sgd ε={eps:g}", "federated", s))
    if not baselines:
        return modes
    epochs = budget_epochs(settings, fed)
    pooled = central or TrainConfig(epochs=epochs)
    pooled = replace(pooled, epochs=epochs)
    modes.append(Mode("centralized", "centralized", train=pooled))
    modes += [Mode(f"local:{name}", "local", train=pooled, sites=[name]) for name in fed.sites]
    return modes


def without_site(fed: Federation, site: str) -> Federation:
    """The federation minus one hospital (its splits, made with every hospital's near-duplicates in view, stay
    as they were: no image of the others has a twin in it)."""
    return replace(fed, sites={n: s for n, s in fed.sites.items() if n != site})


def score_unseen(checkpoint: Path, site: SiteData, cache_dir: Path | None = None) -> dict[str, dict]:
    """A federation's best model on a hospital that took no part: its test split, and every image it has."""
    from fedbrain.checkpoint import load_checkpoint
    from fedbrain.data.dataset import site_loaders
    from fedbrain.evaluation import evaluate_everywhere

    model, card = load_checkpoint(checkpoint)
    every = SiteData(site.name, site.scheme, {"train": [], "val": [],
                                              "test": [r for rs in site.splits.values() for r in rs]}, {})
    loaders = site_loaders({UNSEEN_TEST: site, UNSEEN_ALL: every}, card.preprocessing, 64, cache_dir, union=None)
    return evaluate_everywhere(model, loaders, calibrator=card.calibrator)


def _calibration_cell(params: dict | None) -> str | None:
    """A results row's calibration, in words (None where the model was not evaluated)."""
    return None if params is None else Calibrator.from_record(params).describe()


def _rows(mode: Mode, seed: int, results: dict, budget: int, rounds: int | None, seconds: float,
          eps: float | None, probe: dict | None = None, evaluated_on: str = "test split") -> list[dict]:
    rows = []
    probe_acc = (probe or {}).get("site_probe_balanced_accuracy")
    for site, m in results.items():
        row = {"mode": mode.name, "kind": mode.kind, "seed": seed, "site": site, "evaluated_on": evaluated_on,
               "n": m.get("n"), "ece": m.get("ece"), "tumour_ece": m.get("tumour_ece"),
               "calibration": _calibration_cell(m.get("calibration")),
               "n_no_tumor": m.get("n_no_tumor"), "tumour_accuracy": m.get("tumour_accuracy"),
               "unreliable": ";".join(sorted(m.get("unreliable") or {})), "budget_epochs": budget,
               "rounds": rounds, "seconds": round(seconds, 1), "dp_epsilon": eps, "site_probe": probe_acc,
               **{f"{k}_raw": v for k, v in (m.get("uncalibrated") or {}).items() if k in RAW_METRICS}}
        for k in METRICS:
            row[k] = m.get(k)
            lo_hi = (m.get("ci") or {}).get(k) or [None, None]
            row[f"{k}_lo"], row[f"{k}_hi"] = lo_hi
        rows.append(row)
    return rows


def run_compare(fed: Federation, settings: JobSettings, run: RunDir, modes: list[Mode], seeds: tuple[int, ...] = (0,),
                cache_dir: Path | None = None, progress: bool = True) -> list[dict]:
    """Every mode for every seed (the training seed; the splits stay those of ``fed``)."""
    fed.write(run.root)
    budget = budget_epochs(settings, fed)
    run.write_config(kind="compare", model=settings.model, budget_epochs=budget, seeds=list(seeds),
                     job=settings.to_dict(), modes={m.name: (m.settings.to_dict() if m.settings else
                                                             {"train": m.train.to_dict(), "sites": m.sites})
                                                    for m in modes},
                     federation=fed.spec.to_dict(), sites=list(fed.sites))
    rows: list[dict] = []
    status = StatusWriter(run, kind="compare", model=settings.model, done=0, total=len(seeds) * len(modes),
                          unit="mode")
    try:
        _run_modes(fed, settings, run, modes, seeds, budget, rows, status, cache_dir, progress)
    except BaseException as exc:
        status.finish(STOPPED if isinstance(exc, KeyboardInterrupt) else FAILED, error=f"{type(exc).__name__}: {exc}")
        raise
    failed = sorted({r["mode"] for r in rows if r.get("error")})
    status.finish(FAILED if failed else FINISHED, error=f"mode(s) failed: {', '.join(failed)}" if failed else None)
    return rows


def _run_modes(fed, settings, run, modes, seeds, budget, rows, status, cache_dir, progress) -> None:
    def save() -> None:
        write_json(run.compare_json, {"rows": rows, "summary": summarise(rows)})
        with run.compare_csv.open("w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=FIELDS, extrasaction="ignore")
            w.writeheader()
            w.writerows(rows)

    for seed in seeds:
        for mode in modes:
            folder = run.child(f"{mode.name.replace(' ', '_')}-seed{seed}" if len(seeds) > 1 else
                               mode.name.replace(" ", "_"))
            t0 = time.perf_counter()
            status.progress(status.doc["done"], status.doc["total"], mode=mode.name, seed=seed,
                            current=folder.name)
            if progress:
                print(f"\n== {mode.name} (seed {seed})", flush=True)
            if mode.kind == "federated":
                # as many validated models as centralised has epochs (training.validation_points)
                s = replace(mode.settings, train=replace(mode.settings.train, seed=seed), validations=budget)
                data = iid_federation(fed, seed) if mode.iid else fed
                if mode.held_out:  # the same epochs over the smaller federation's data
                    data = without_site(fed, mode.held_out)
                    s.rounds = rounds_for_budget(s, data, settings.rounds * epochs_per_round(settings, fed))
                try:
                    summary = run_simulation(data, s, folder, cache_dir=cache_dir)
                except Exception as exc:  # one broken mode must not cost the others
                    summary = {"error": f"{type(exc).__name__}: {exc}", "wall_seconds": 0.0}
                if summary.get("failed_sites") or "test" not in summary:
                    reason = str(summary.get("failed_sites") or summary.get("error"))[:300]
                    print(f"   {mode.name} FAILED: {reason}", flush=True)
                    rows.append({"mode": mode.name, "kind": mode.kind, "seed": seed, "site": "error",
                                 "budget_epochs": budget, "error": reason,
                                 "seconds": round(time.perf_counter() - t0, 1)})
                    save()
                    status.progress(status.doc["done"] + 1, status.doc["total"])
                    continue
                eps = epsilon_after(s.rounds, mode.dp[1], 1e-5) if mode.dp else None
                if s.dp_epsilon > 0:  # DP-SGD: the most any site spent (inf: no noise)
                    spent = (summary.get("privacy") or {}).get("epsilon_per_site") or {}
                    eps = max(spent.values()) if spent else s.dp_epsilon
                rows += _rows(mode, seed, summary["test"], budget, s.rounds, summary["wall_seconds"], eps,
                              summary.get("site_probe"))
                if mode.held_out:
                    for label, m in score_unseen(folder.best, fed.sites[mode.held_out], cache_dir).items():
                        rows += _rows(mode, seed, {mode.held_out: m}, budget, s.rounds, summary["wall_seconds"],
                                      None, evaluated_on=label)
            else:
                cfg = replace(mode.train, seed=seed)
                res = train_pooled(fed, settings.model, cfg, folder, sites=mode.sites, image_size=settings.image_size,
                                   pretrained=settings.pretrained, model_kwargs=settings.model_kwargs,
                                   cache_dir=cache_dir, progress=progress, finetune=settings.trained_layers,
                                   teacher=settings.distil_from or None, distill=settings.distillation())
                rows += _rows(mode, seed, res["test"], budget, None, time.perf_counter() - t0, None,
                              res.get("site_probe"))
            save()
            status.progress(status.doc["done"] + 1, status.doc["total"])


def summarise(rows: list[dict], site: str = UNION) -> list[dict]:
    """Per mode: mean and sd over seeds of the ``site`` metrics, and the gap to centralised (federated modes): of
    the means, and ``paired``: the per-seed paired differences with their t-interval (stats.paired_gaps)."""
    out = []
    modes = list(dict.fromkeys(r["mode"] for r in rows))
    central = {}
    for mode in modes:
        mine = [r for r in rows if r["mode"] == mode and r["site"] == site]
        if not mine:
            continue
        entry = {"mode": mode, "kind": mine[0]["kind"], "seeds": len(mine), "n": mine[0].get("n")}
        for k in (*METRICS, "site_probe"):
            vals = [r[k] for r in mine if isinstance(r.get(k), (int, float))]
            if vals:
                entry[f"{k}_mean"] = statistics.fmean(vals)
                entry[f"{k}_sd"] = statistics.stdev(vals) if len(vals) > 1 else 0.0
        out.append(entry)
        if mode == REFERENCE:
            central = entry
    paired = paired_gaps(rows, site) if central else {}
    for entry in out:
        if entry["kind"] == "federated" and central:
            for k in METRICS:
                if f"{k}_mean" in entry and f"{k}_mean" in central:
                    entry[f"{k}_gap"] = entry[f"{k}_mean"] - central[f"{k}_mean"]
            if entry["mode"] in paired:
                entry["paired"] = paired[entry["mode"]]
    return out


def paired_lines(summary: list[dict]) -> list[str]:
    """Each federated mode's paired difference to centralised, seed by seed (calibrated, then raw)."""
    lines = []
    for e in (e for e in summary if e.get("paired")):
        lines.append(f"paired vs {REFERENCE}, {e['mode']}:")
        lines += [f"  {k:<22}{describe_gap(d)}" for k, d in e["paired"].items()]
    return ([""] + lines + ["paired: mode minus centralised at the same seed; [..] 95 % t-interval over the seeds"]
            if lines else [])


def _pm(entry: dict, k: str) -> str:
    if f"{k}_mean" not in entry:
        return "-"
    return f"{entry[f'{k}_mean']:.3f} ± {entry[f'{k}_sd']:.3f}"


def compare_table(rows: list[dict], sites: list[str]) -> str:
    """Union metrics per mode (mean ± sd over seeds, gap to centralised), then each site's headline."""
    summary = summarise(rows)
    hdr = (f"{'mode':<34}{'seeds':>6}{'union macro-F1':>18}{'tumour AUROC':>18}{'no_tumor recall':>18}"
           f"{'gap F1':>9}{'site probe':>12}")
    lines = [hdr, "-" * len(hdr)]
    for e in summary:
        gap = f"{e['macro_f1_gap'] * 100:+.1f}pp" if "macro_f1_gap" in e else ""
        probe = f"{e['site_probe_mean']:.2f}" if "site_probe_mean" in e else "-"
        lines.append(f"{e['mode']:<34}{e['seeds']:>6}{_pm(e, 'macro_f1'):>18}{_pm(e, 'tumour_auroc'):>18}"
                     f"{_pm(e, 'no_tumor_recall'):>18}{gap:>9}{probe:>12}")
    lines.append("site probe: balanced accuracy of a linear probe telling the sites apart from the model's features "
                 "(test splits; chance 1/sites)")
    lines += paired_lines(summary)
    lines.append("")
    hdr = f"{'mode (seed ' + str(min((r['seed'] for r in rows), default=0)) + ')':<34}" + "".join(
        f"{c[:17]:>19}" for c in sites + [UNION])
    lines += [hdr, "-" * len(hdr)]
    first = min((r["seed"] for r in rows), default=0)
    for mode in dict.fromkeys(r["mode"] for r in rows):
        cells = []
        for c in sites + [UNION]:
            r = next((x for x in rows if x["mode"] == mode and x["site"] == c and x["seed"] == first), None)
            key = "macro_f1" if r is not None and r.get("macro_f1") is not None else "tumour_auroc"
            if r is None or r.get(key) is None:
                cells.append(f"{'-':>19}")
                continue
            star = "*" if key in (r.get("unreliable") or "").split(";") else ""
            mark = "" if key == "macro_f1" else "a"
            cells.append(f"{r[key]:>17.3f}{mark}{star:1}")
        lines.append(f"{mode:<34}" + "".join(cells))
    lines.append("per site: macro-F1 (4-class where tumour types are labelled); a = tumour-vs-healthy AUROC (binary "
                 "site); * = unreliable, fewer than 10 images of a class")
    loo = leave_one_out_table(rows)
    return "\n".join(lines + (["", loo] if loo else []))


def _with_raw(row: dict, key: str) -> str:
    """A row's calibrated value with the raw model's beside it: ``0.862 (0.658)``."""
    v, raw = row.get(key), row.get(f"{key}_raw")
    if not isinstance(v, (int, float)):
        return "-"
    return f"{v:.3f}" + (f" ({raw:.3f})" if isinstance(raw, (int, float)) else "")


def leave_one_out_table(rows: list[dict], markdown: bool = False) -> str:
    """Each hospital scored as an unseen one by the federation of the others, beside the full federation's score
    on the same test split (first seed)."""
    from fedbrain.runs import fmt_metric

    unseen = [r for r in rows if r.get("evaluated_on") in (UNSEEN_TEST, UNSEEN_ALL)]
    if not unseen:
        return ""
    first = min(r["seed"] for r in unseen)
    head = ["held-out hospital", "scored on", "n", "healthy", "macro-F1 [95% CI]", "tumour AUROC [95% CI]",
            "tumour accuracy (raw)", "tumour ECE (raw)", "full federation, same split"]
    body = []
    for r in (x for x in unseen if x["seed"] == first):
        m = {k: r.get(k) for k in METRICS} | {"ci": {k: [r.get(f"{k}_lo"), r.get(f"{k}_hi")] for k in METRICS
                                                       if r.get(f"{k}_lo") is not None},
                                               "unreliable": dict.fromkeys((r.get("unreliable") or "").split(";"), 1)}
        full = next((x for x in rows if x["seed"] == first and x["site"] == r["site"] and x.get("kind") == "federated"
                     and x.get("evaluated_on", "test split") == "test split"
                     and not str(x["mode"]).count(" without ") and x["mode"] in ALGORITHM_MODES), None)
        ref = "-"
        if full is not None and r["evaluated_on"] == UNSEEN_TEST:
            key = "macro_f1" if full.get("macro_f1") is not None else "tumour_auroc"
            if isinstance(full.get(key), (int, float)):
                ref = f"{key.replace('_', ' ')} {full[key]:.3f} ({full['mode']})"
        body.append([r["site"], r["evaluated_on"].split(" (")[0], str(r.get("n")), str(r.get("n_no_tumor")),
                     fmt_metric(m, "macro_f1"), fmt_metric(m, "tumour_auroc"), _with_raw(r, "tumour_accuracy"),
                     _with_raw(r, "tumour_ece"), ref])
    if markdown:
        return "\n".join(["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
                         + ["| " + " | ".join(b) + " |" for b in body])
    widths = [max(len(x[i]) for x in [head, *body]) + 2 for i in range(len(head))]
    fmt = lambda cells: "".join(c.ljust(w) for c, w in zip(cells, widths, strict=True))  # noqa: E731
    return "\n".join(["leave-one-hospital-out (the federation of the other hospitals, same epochs over its data):",
                      fmt(head), "-" * sum(widths), *map(fmt, body),
                      "* = unreliable, fewer than 10 images of a class"])
