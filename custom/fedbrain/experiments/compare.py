"""Federated vs centralised vs local-only, at the same budget (equal total local epochs per picture)."""

from __future__ import annotations

import csv
import time
from dataclasses import replace
from pathlib import Path

from fedbrain.data.federation import Federation
from fedbrain.evaluation import UNION
from fedbrain.experiments.pooled import train_pooled
from fedbrain.fl.privacy import epsilon_after
from fedbrain.fl.simulate import run_simulation
from fedbrain.runs import RunDir, write_json
from fedbrain.settings import JobSettings

FIELDS = ["mode", "site", "n", "macro_f1", "accuracy", "tumour_accuracy", "tumour_auroc", "budget_epochs",
          "seconds", "dp_epsilon"]


def _rows(mode: str, results: dict, budget: int, seconds: float, dp_epsilon: float | None = None) -> list[dict]:
    return [{"mode": mode, "site": site, "n": m.get("n"), "macro_f1": m.get("macro_f1"),
             "accuracy": m.get("accuracy"), "tumour_accuracy": m.get("tumour_accuracy"),
             "tumour_auroc": m.get("tumour_auroc"), "budget_epochs": budget, "seconds": round(seconds, 1),
             "dp_epsilon": dp_epsilon}
            for site, m in results.items()]


def run_compare(fed: Federation, settings: JobSettings, run: RunDir, algorithms: list[str],
                dp: tuple[float, float] | None = None, cache_dir: Path | None = None,
                progress: bool = True) -> list[dict]:
    """Every mode trains ``settings.rounds * settings.local_epochs`` epochs over its data.

    Each federated mode runs under its own algorithm's defaults (``fedbrain.settings.ALGORITHM_DEFAULTS``)
    with the user's explicit training choices on top, so ``--lr`` applies to every algorithm alike.
    """
    fed.write(run.root)
    budget = settings.rounds * settings.local_epochs
    plan = [(alg, settings.with_algorithm(alg)) for alg in algorithms]
    if dp:
        plan.append(("fedavg+dp", settings.with_algorithm("fedavg", dp_clip=dp[0], dp_noise=dp[1])))
    run.write_config(kind="compare", model=settings.model, budget_epochs=budget, algorithms=algorithms,
                     dp=dp, job=settings.to_dict(), modes={m: s.train.to_dict() for m, s in plan},
                     federation=fed.spec.to_dict(), sites=list(fed.sites))
    rows: list[dict] = []

    def save() -> None:
        write_json(run.compare_json, rows)
        with run.compare_csv.open("w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=FIELDS)
            w.writeheader()
            w.writerows(rows)

    for mode, s in plan:
        if progress:
            print(f"\n== {mode}: {s.rounds} rounds x {s.local_epochs} local epoch(s)", flush=True)
        try:
            summary = run_simulation(fed, s, run.child(mode), cache_dir=cache_dir)
        except Exception as exc:  # one broken mode must not cost the others
            summary = {"error": f"{type(exc).__name__}: {exc}", "wall_seconds": 0.0}
        if summary.get("failed_sites") or "test" not in summary:
            reason = summary.get("failed_sites") or summary.get("error")
            print(f"   {mode} FAILED: {reason}", flush=True)
            rows.append({"mode": mode, "site": "error", "n": None, "budget_epochs": budget,
                         "seconds": round(summary.get("wall_seconds", 0.0), 1), "dp_epsilon": None,
                         "macro_f1": None, "accuracy": None, "tumour_accuracy": None, "tumour_auroc": None})
            save()
            continue
        eps = epsilon_after(s.rounds, dp[1], 1e-5) if dp and mode == "fedavg+dp" else None
        rows += _rows(mode, summary["test"], budget, summary["wall_seconds"], eps)
        save()
    cfg = replace(settings.train, epochs=budget)  # the same optimiser and lr as the federated sites
    solo = [("centralized", None)] + [(f"local:{name}", [name]) for name in fed.sites]
    for mode, sites in solo:
        if progress:
            print(f"\n== {mode}: {budget} epochs", flush=True)
        t0 = time.perf_counter()
        res = train_pooled(fed, settings.model, cfg, run.child(mode), sites=sites,
                           image_size=settings.image_size, pretrained=False, model_kwargs=settings.model_kwargs,
                           cache_dir=cache_dir, progress=progress)
        rows += _rows(mode, res["test"], budget, time.perf_counter() - t0)
        save()
    return rows


def compare_table(rows: list[dict], sites: list[str]) -> str:
    """Modes x (sites + union): macro-F1 where tumour types are labelled, else tumour AUROC (marked *)."""
    modes = list(dict.fromkeys(r["mode"] for r in rows))
    cols = sites + [UNION]
    hdr = f"{'mode':<22}" + "".join(f"{c[:15]:>16}" for c in cols)
    lines = [hdr, "-" * len(hdr)]
    for mode in modes:
        cells = []
        for c in cols:
            r = next((x for x in rows if x["mode"] == mode and x["site"] == c), None)
            if r is None:
                cells.append(f"{'-':>16}")
            elif r.get("macro_f1") is not None:
                cells.append(f"{r['macro_f1']:>16.4f}")
            elif r.get("tumour_auroc") is not None:
                cells.append(f"{r['tumour_auroc']:>15.4f}*")
            else:
                cells.append(f"{'-':>16}")
        lines.append(f"{mode:<22}" + "".join(cells))
    lines.append("macro-F1 on each test split (4-class where tumour types are labelled); "
                 "* = tumour-vs-no-tumour AUROC (binary-labelled site)")
    return "\n".join(lines)
