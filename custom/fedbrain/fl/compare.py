"""Federated vs centralised vs local-only, at the same budget (equal total local epochs per picture)."""

from __future__ import annotations

import csv
import json
import time
from dataclasses import replace
from pathlib import Path

from fedbrain.data.federation import Federation
from fedbrain.experiment import UNION, train_pooled, write_config
from fedbrain.fl.job import JobSettings
from fedbrain.fl.simulate import run_simulation
from fedbrain.training import TrainConfig

FIELDS = ["mode", "site", "n", "macro_f1", "accuracy", "tumour_accuracy", "tumour_auroc", "budget_epochs",
          "seconds", "dp_epsilon"]


def _rows(mode: str, results: dict, budget: int, seconds: float, dp_epsilon: float | None = None) -> list[dict]:
    return [{"mode": mode, "site": site, "n": m.get("n"), "macro_f1": m.get("macro_f1"),
             "accuracy": m.get("accuracy"), "tumour_accuracy": m.get("tumour_accuracy"),
             "tumour_auroc": m.get("tumour_auroc"), "budget_epochs": budget, "seconds": round(seconds, 1),
             "dp_epsilon": dp_epsilon}
            for site, m in results.items()]


def run_compare(fed: Federation, settings: JobSettings, run_dir: Path, algorithms: list[str],
                dp: tuple[float, float] | None = None, cache_dir: Path | None = None,
                progress: bool = True) -> list[dict]:
    """Every mode trains ``settings.rounds * settings.local_epochs`` epochs over its data."""
    run_dir = Path(run_dir)
    fed.write(run_dir)
    budget = settings.rounds * settings.local_epochs
    write_config(run_dir, kind="compare", model=settings.model, budget_epochs=budget, algorithms=algorithms,
                 dp=dp, job=settings.to_dict(), federation=fed.spec.to_dict(), sites=list(fed.sites))
    rows: list[dict] = []

    def save() -> None:
        (run_dir / "compare.json").write_text(json.dumps(rows, indent=2))
        with (run_dir / "compare.csv").open("w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=FIELDS)
            w.writeheader()
            w.writerows(rows)

    plan = [(alg, replace(settings, algorithm=alg, lr=0.05 if alg == "scaffold" else settings.lr))
            for alg in algorithms]
    if dp:
        plan.append(("fedavg+dp", replace(settings, algorithm="fedavg", dp_clip=dp[0], dp_noise=dp[1])))
    for mode, s in plan:
        if progress:
            print(f"\n== {mode}: {s.rounds} rounds x {s.local_epochs} local epoch(s)", flush=True)
        try:
            summary = run_simulation(fed, s, run_dir / mode, cache_dir=cache_dir)
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
        eps = None
        if dp and mode == "fedavg+dp":
            from fedbrain.fl.privacy import epsilon_after

            eps = epsilon_after(s.rounds, dp[1], 1e-5)
        rows += _rows(mode, summary["test"], budget, summary["wall_seconds"], eps)
        save()
    cfg = TrainConfig(epochs=budget, batch_size=settings.batch_size, lr=settings.lr,
                      weight_decay=settings.weight_decay, seed=settings.seed)
    solo = [("centralized", None)] + [(f"local:{name}", [name]) for name in fed.sites]
    for mode, sites in solo:
        if progress:
            print(f"\n== {mode}: {budget} epochs", flush=True)
        t0 = time.perf_counter()
        res = train_pooled(fed, settings.model, cfg, run_dir / mode.replace(":", "-"), sites=sites,
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
