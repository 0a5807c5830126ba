"""Federation sub-commands: ``simulate`` (the main job)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from fedbrain.cli import DEFAULT_WORKSPACE, add_federation_args, load_federation


def add_job_args(p: argparse.ArgumentParser, rounds: int = 5) -> None:
    from fedbrain.fl.job import ALGORITHMS
    from fedbrain.models import list_models

    g = p.add_argument_group("federated job")
    g.add_argument("--algorithm", choices=ALGORITHMS, default="fedavg")
    g.add_argument("--model", default="fedbrain_cnn", choices=list_models())
    g.add_argument("--image-size", type=int, default=None)
    g.add_argument("--rounds", type=int, default=rounds)
    g.add_argument("--local-epochs", type=int, default=1)
    g.add_argument("--batch-size", type=int, default=32)
    g.add_argument("--lr", type=float, default=None, help="default 2e-3 (AdamW); 0.05 for SCAFFOLD (SGD)")
    g.add_argument("--fedprox-mu", type=float, default=0.01)
    g.add_argument("--min-clients", type=int, default=None, help="sites that must answer each round (default all)")
    g.add_argument("--dp-clip", type=float, default=0.0, help="differential privacy: L2 clip of each update")
    g.add_argument("--dp-noise", type=float, default=0.0, help="differential privacy: noise multiplier")
    g.add_argument("--no-cross-site-eval", action="store_true")
    g.add_argument("--resume", help="a run folder (or checkpoint) whose last global model starts this run")
    g.add_argument("--threads-per-site", type=int, default=None)
    g.add_argument("--workspace", default=str(DEFAULT_WORKSPACE))


def job_settings(args: argparse.Namespace):
    from fedbrain.fl.job import JobSettings

    lr = args.lr if args.lr is not None else (0.05 if args.algorithm == "scaffold" else 2e-3)
    init = None
    if args.resume:
        p = Path(args.resume)
        init = str(p / "checkpoints" / "last.pt") if p.is_dir() else str(p)
    return JobSettings(algorithm=args.algorithm, model=args.model, image_size=args.image_size, rounds=args.rounds,
                       local_epochs=args.local_epochs, batch_size=args.batch_size, lr=lr,
                       fedprox_mu=args.fedprox_mu, seed=args.seed, min_clients=args.min_clients,
                       threads_per_site=args.threads_per_site, dp_clip=args.dp_clip, dp_noise=args.dp_noise,
                       cross_site_eval=not args.no_cross_site_eval, initial_checkpoint=init)


def cmd_simulate(args: argparse.Namespace) -> int:
    from fedbrain.experiment import new_run_dir, results_table
    from fedbrain.fl.simulate import run_simulation

    fed = load_federation(args)
    settings = job_settings(args)
    run_dir = new_run_dir(args.workspace, f"{settings.algorithm}-{settings.model}")
    print(f"run: {run_dir}")
    print(f"{settings.algorithm} with {len(fed.sites)} sites ({', '.join(fed.sites)}), {settings.rounds} rounds x "
          f"{settings.local_epochs} local epoch(s), model {settings.model}", flush=True)
    summary = run_simulation(fed, settings, run_dir, cache_dir=Path(args.cache_dir) if args.cache_dir else None)
    if "rounds_table" in summary:
        print("\n" + summary["rounds_table"])
    if "test" in summary:
        print("\nbest global model on each site's test split and their union:")
        print(results_table(summary["test"]))
    train = sum(summary.get("train_seconds_per_site", {}).values())
    print(f"\nsimulator wall time {summary['wall_seconds']:.0f} s (site training {train:.0f} s summed over sites)")
    print(f"run folder: {run_dir}")
    if summary.get("failed_sites"):
        for site, err in summary["failed_sites"].items():
            print(f"\nsite {site} FAILED:\n{err}", file=sys.stderr)
        print(f"\nfedbrain: {len(summary['failed_sites'])} site(s) failed; see {run_dir / 'nvflare'}",
              file=sys.stderr)
        return 3
    if "error" in summary:
        print(f"fedbrain: error: {summary['error']}", file=sys.stderr)
        return 1
    return 0


def register(sub) -> None:
    p = sub.add_parser("simulate", help="the main job: a federated run in the NVFlare simulator")
    add_federation_args(p)
    add_job_args(p)
    p.set_defaults(func=cmd_simulate)


__all__ = ["register", "add_job_args", "job_settings", "json"]
