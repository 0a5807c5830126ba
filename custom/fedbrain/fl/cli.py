"""Federation sub-commands: ``simulate`` (the main job)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from fedbrain.cli import (
    DEFAULT_WORKSPACE,
    UsageError,
    add_federation_args,
    add_finetune_arg,
    load_federation,
    parse_finetune_or_exit,
)


def add_job_args(p: argparse.ArgumentParser, rounds: int = 20) -> None:
    from fedbrain.fl.job import ALGORITHMS
    from fedbrain.models import list_models

    g = p.add_argument_group("federated job")
    g.add_argument("--algorithm", choices=ALGORITHMS, default="fedavg")
    g.add_argument("--model", default="fedbrain_cnn", choices=list_models())
    g.add_argument("--image-size", type=int, default=None)
    g.add_argument("--pretrained", choices=["auto", "yes", "no"], default="auto",
                   help="start the federation from ImageNet weights (auto: the model's default)")
    add_finetune_arg(g)
    g.add_argument("--rounds", type=int, default=rounds)
    g.add_argument("--local-epochs", type=int, default=1)
    g.add_argument("--batch-size", type=int, default=32)
    g.add_argument("--lr", type=float, default=None, help="default 2e-3 (AdamW); 0.05 for SCAFFOLD (SGD)")
    g.add_argument("--fedprox-mu", type=float, default=0.01)
    g.add_argument("--min-clients", type=int, default=None, help="sites that must answer each round (default all)")
    g.add_argument("--site-weighting", choices=["steps", "equal"], default="steps",
                   help="FedAvg/FedProx average weighted by each site's local steps (default) or equal per site")
    g.add_argument("--dp-clip", type=float, default=0.0, help="differential privacy: L2 clip of each update")
    g.add_argument("--dp-noise", type=float, default=0.0, help="differential privacy: noise multiplier")
    g.add_argument("--no-cross-site-eval", action="store_true")
    g.add_argument("--resume", help="a run folder (or checkpoint) whose last global model starts this run")
    g.add_argument("--threads-per-site", type=int, default=None)
    g.add_argument("--workspace", default=str(DEFAULT_WORKSPACE))


def job_settings(args: argparse.Namespace):
    from fedbrain.cli import pretrained_flag
    from fedbrain.fl.job import JobSettings

    parse_finetune_or_exit(args.finetune)
    if args.algorithm == "scaffold" and args.site_weighting != "steps":
        raise UsageError("--site-weighting applies to fedavg and fedprox, not scaffold")
    lr = args.lr if args.lr is not None else (0.05 if args.algorithm == "scaffold" else 2e-3)
    init = None
    if args.resume:
        p = Path(args.resume)
        init = str(p / "checkpoints" / "last.pt") if p.is_dir() else str(p)
    return JobSettings(algorithm=args.algorithm, model=args.model, image_size=args.image_size, rounds=args.rounds,
                       local_epochs=args.local_epochs, batch_size=args.batch_size, lr=lr,
                       fedprox_mu=args.fedprox_mu, seed=args.seed, min_clients=args.min_clients,
                       threads_per_site=args.threads_per_site, dp_clip=args.dp_clip, dp_noise=args.dp_noise,
                       cross_site_eval=not args.no_cross_site_eval, initial_checkpoint=init,
                       pretrained=pretrained_flag(args), finetune=args.finetune,
                       site_weighting=args.site_weighting)


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


def _bench_command(args: argparse.Namespace) -> str:
    """The command line that reruns this benchmark (data and budget flags only)."""
    import shlex

    parts = ["fedbrain", "bench", "models"]
    for flag in ("data_root", "site_config", "sites", "max_images_per_site", "max_train_per_site"):
        if getattr(args, flag, None):
            parts += [f"--{flag.replace('_', '-')}", str(getattr(args, flag))]
    parts += ["--models", *args.models, "--modes", *args.modes, "--image-size", str(args.image_size),
              "--rounds", str(args.rounds), "--local-epochs", str(args.local_epochs), "--finetune", args.finetune,
              "--batch-size", str(args.batch_size), "--lr", str(args.lr), "--seed", str(args.seed)]
    return shlex.join(parts)


def cmd_bench_models(args: argparse.Namespace) -> int:
    from fedbrain.experiment import new_run_dir
    from fedbrain.fl import bench_models as bm
    from fedbrain.models import list_models

    outs = (Path(args.workspace) / "bench_models.json",) + ((Path(args.out),) if args.out else ())
    if args.show:
        rows = bm.read_table(args.show)
        print(bm.format_table(rows, markdown=args.markdown))
        print(bm.format_goal(bm.goal(rows)))
        return 0
    if args.retime:
        rows = bm.retime(Path(args.retime), outs, latency_repeats=args.latency_repeats,
                         cache_dir=Path(args.cache_dir) if args.cache_dir else None)
        print(bm.format_table(rows, markdown=args.markdown))
        print(bm.format_goal(bm.goal(rows)))
        return 0
    unknown = [m for m in args.models if m not in list_models()]
    if unknown:
        raise KeyError(f"unknown model(s) {unknown}; choose from {list_models()}")
    parse_finetune_or_exit(args.finetune)
    budget = bm.Budget(image_size=args.image_size or None, rounds=args.rounds, local_epochs=args.local_epochs,
                       max_train_per_site=args.max_train_per_site, finetune=args.finetune,
                       batch_size=args.batch_size, lr=args.lr, seed=args.seed)
    fed = load_federation(args)
    run_dir = new_run_dir(args.workspace, "bench-models")
    print(f"run: {run_dir}\nbudget: {budget.label()} (centralised: {budget.epochs} epochs), fine-tune "
          f"{budget.finetune} for pretrained models; models: {', '.join(args.models)}", flush=True)
    t0 = time.perf_counter()
    rows = bm.run_bench(fed, args.models, budget, run_dir, outs=outs, modes=tuple(args.modes),
                        cache_dir=Path(args.cache_dir) if args.cache_dir else None, int8=not args.no_int8,
                        latency_repeats=args.latency_repeats, command=_bench_command(args))
    print("\n" + bm.format_table(rows, markdown=args.markdown))
    print(bm.format_goal(bm.goal(rows)))
    print(f"\ntotal {time.perf_counter() - t0:.0f} s on {bm.hardware()}; rows: {run_dir / 'bench_models.json'}; "
          f"merged into {' and '.join(map(str, outs))} (the dashboard's Models page reads the first)")
    failed = [r for r in rows if r.get("error")]
    return 1 if failed and len(failed) == len(rows) else 0


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

    from fedbrain.fl.bench_models import DEFAULT_MODELS, MODES
    from fedbrain.models import FINETUNE_HELP

    p = bench_sub.add_parser("models", help="every registry model, federated and centralised: accuracy, "
                             "macro-F1, size, CPU latency at one budget")
    add_federation_args(p)
    g = p.add_argument_group("budget (the same for every model; written beside every number)")
    g.add_argument("--models", nargs="+", default=list(DEFAULT_MODELS))
    g.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    g.add_argument("--image-size", type=int, default=128, help="input size for every model (0 = each model's own "
                   "default: 224 for the ImageNet models); default 128")
    g.add_argument("--rounds", type=int, default=5, help="federated rounds; centralised trains rounds x local "
                   "epochs epochs (default 5)")
    g.add_argument("--local-epochs", type=int, default=1)
    g.add_argument("--max-train-per-site", type=int, default=None,
                   help="cap each site's TRAIN split (val/test stay whole, so tables stay comparable)")
    g.add_argument("--finetune", default="all", help=FINETUNE_HELP + "; applies to models that start from "
                   "ImageNet weights (random-init models always train all layers)")
    g.add_argument("--batch-size", type=int, default=32)
    g.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--no-int8", action="store_true", help="skip int8 quantisation")
    p.add_argument("--latency-repeats", type=int, default=50, help="timed batch-1 calls per variant and thread count")
    p.add_argument("--workspace", default=str(DEFAULT_WORKSPACE))
    p.add_argument("--out", help="another table to merge the rows into, besides <workspace>/bench_models.json")
    p.add_argument("--markdown", action="store_true", help="print the table as Markdown")
    p.add_argument("--show", metavar="JSON", help="only print an existing table (and the goal check)")
    p.add_argument("--retime", metavar="RUN", help="only measure sizes and latency again for a finished "
                   "bench-models run folder (accuracy columns are kept), e.g. on a quiet or deployment machine")
    p.set_defaults(func=cmd_bench_models)


__all__ = ["register", "add_job_args", "job_settings"]
