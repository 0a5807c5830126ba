"""Federation sub-commands: ``simulate`` (the main job)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from fedbrain.cli import DEFAULT_WORKSPACE, add_federation_args, load_federation


def add_job_args(p: argparse.ArgumentParser, rounds: int = 20) -> None:
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


def cmd_compare(args: argparse.Namespace) -> int:
    from fedbrain.experiment import new_run_dir
    from fedbrain.fl.compare import compare_table, run_compare

    fed = load_federation(args)
    settings = job_settings(args)
    settings.cross_site_eval = False
    settings.dp_clip = settings.dp_noise = 0.0  # DP only in its own 'fedavg+dp' row
    run_dir = new_run_dir(args.workspace, f"compare-{settings.model}")
    print(f"run: {run_dir}\nbudget: {settings.rounds * settings.local_epochs} epochs per mode "
          f"({settings.rounds} rounds x {settings.local_epochs} local epochs for federated modes)", flush=True)
    dp = (args.dp_clip, args.dp_noise) if args.dp_clip > 0 else None
    t0 = time.perf_counter()
    rows = run_compare(fed, settings, run_dir, args.algorithms, dp=dp,
                       cache_dir=Path(args.cache_dir) if args.cache_dir else None)
    print("\n" + compare_table(rows, list(fed.sites)))
    print(f"\ntotal {time.perf_counter() - t0:.0f} s; results: {run_dir / 'compare.csv'}")
    return 0


def cmd_bench_federation(args: argparse.Namespace) -> int:
    """Simulator wall time vs. the same local epochs trained without NVFlare (one process, site by site)."""

    from fedbrain.experiment import SiteLoaders, new_run_dir
    from fedbrain.fl.simulate import run_simulation
    from fedbrain.models import create_model, default_preprocessing
    from fedbrain.training import TrainConfig, evaluate, make_optimizer, train_epochs

    fed = load_federation(args)
    settings = job_settings(args)
    settings.cross_site_eval = False
    run_dir = new_run_dir(args.workspace, f"bench-federation-{settings.model}")
    summary = run_simulation(fed, settings, run_dir, cache_dir=Path(args.cache_dir) if args.cache_dir else None)
    if summary.get("failed_sites"):
        print(f"fedbrain: error: sites failed: {list(summary['failed_sites'])}", file=sys.stderr)
        return 3
    pre = default_preprocessing(settings.model, settings.image_size)
    cfg = TrainConfig(epochs=settings.local_epochs, batch_size=settings.batch_size, lr=settings.lr)
    t0 = time.perf_counter()
    for site in fed.sites.values():  # the same work the sites did: rounds x (eval val + local epochs)
        loaders = SiteLoaders(site, pre, cfg)
        model = create_model(settings.model, pretrained=False)
        opt = make_optimizer(model, cfg)
        for rnd in range(settings.rounds):
            if site.splits["val"]:
                evaluate(model, loaders.eval("val"))
            train_epochs(model, loaders.train(seed=rnd), cfg, optimizer=opt)
    local = time.perf_counter() - t0
    wall = summary["wall_seconds"]
    print(f"benchmark: {len(fed.sites)} sites, {settings.rounds} rounds x {settings.local_epochs} local epoch(s), "
          f"model {settings.model}")
    print(f"  NVFlare simulator wall time          {wall:8.1f} s  (sites in parallel processes)")
    print(f"  same epochs, plain PyTorch, in turn  {local:8.1f} s")
    print(f"  overhead ratio (simulator / plain)   {wall / local:8.2f}")
    (run_dir / "bench_federation.json").write_text(json.dumps(
        {"simulator_wall_s": wall, "plain_local_s": local, "ratio": wall / local,
         "rounds": settings.rounds, "local_epochs": settings.local_epochs, "sites": list(fed.sites)}, indent=2))
    return 0


def register(sub) -> None:
    p = sub.add_parser("simulate", help="the main job: a federated run in the NVFlare simulator")
    add_federation_args(p)
    add_job_args(p)
    p.set_defaults(func=cmd_simulate)

    p = sub.add_parser("compare", help="federated vs centralised vs local-only at the same budget")
    add_federation_args(p)
    add_job_args(p, rounds=20)
    p.add_argument("--algorithms", nargs="*", default=["fedavg", "fedprox", "scaffold"],
                   choices=["fedavg", "fedprox", "scaffold"])
    p.set_defaults(func=cmd_compare)

    bench = sub.choices["bench"]
    bench_sub = next(a for a in bench._actions if isinstance(a, argparse._SubParsersAction))
    p = bench_sub.add_parser("federation", help="NVFlare simulator wall time vs plain local training")
    add_federation_args(p)
    add_job_args(p, rounds=3)
    p.set_defaults(func=cmd_bench_federation)


__all__ = ["register", "add_job_args", "job_settings"]
