"""The ``fedbrain`` command line."""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import sys
import time
from pathlib import Path

DEFAULT_WORKSPACE = Path(os.environ.get("FEDBRAIN_WORKSPACE", "workspace"))


class UsageError(Exception):
    """A user-fixable problem: printed as one line, exit code 2."""


# ---------------------------------------------------------------- shared options


def add_federation_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data (default: the embedded Br35H set as simulated hospitals)")
    g.add_argument("--data-root", help="benchmark federation: folder holding figshare_cheng/, sartaj/, navoneel/")
    g.add_argument("--site-config", help="TOML file declaring the hospitals (see jobs/sites.example.toml)")
    g.add_argument("--num-sites", type=int, default=3, help="simulated hospitals for the embedded set (default 3)")
    g.add_argument("--sites", help="comma-separated subset of the declared hospitals to use")
    g.add_argument("--alpha", type=float, default=1.0,
                   help="Dirichlet label-skew of the simulated hospitals; smaller = more skew (default 1.0)")
    g.add_argument("--max-images-per-site", type=int, default=None, help="subsample each site (quick runs)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--cache-dir", default=None, help="decoded-image cache (default ~/.cache/fedbrain)")


def federation_spec(args: argparse.Namespace):
    from fedbrain.data.federation import benchmark_spec, embedded_spec, load_site_config

    extra = {"max_images_per_site": args.max_images_per_site}
    if args.site_config:
        spec = load_site_config(args.site_config, args.data_root)
        spec.seed = args.seed
        if args.max_images_per_site:
            spec.max_images_per_site = args.max_images_per_site
    elif args.data_root:
        spec = benchmark_spec(args.data_root, seed=args.seed, **extra)
    else:
        spec = embedded_spec(sites=args.num_sites, alpha=args.alpha, seed=args.seed, **extra)
    if getattr(args, "sites", None):
        wanted = [s.strip() for s in args.sites.split(",") if s.strip()]
        if spec.partition:
            raise UsageError("--sites selects declared hospitals; the embedded set takes --num-sites instead")
        unknown = set(wanted) - {s.name for s in spec.sites}
        if unknown:
            raise UsageError(f"unknown --sites {sorted(unknown)}; declared: {[s.name for s in spec.sites]}")
        spec.sites = [s for s in spec.sites if s.name in wanted]
    return spec


def load_federation(args: argparse.Namespace, progress: bool = True):
    from fedbrain.data.federation import build_federation

    cache = Path(args.cache_dir) if args.cache_dir else None
    return build_federation(federation_spec(args), cache_dir=cache, progress=progress)


def add_train_args(p: argparse.ArgumentParser, epochs: int = 10) -> None:
    from fedbrain.models import list_models

    g = p.add_argument_group("training")
    g.add_argument("--model", default="fedbrain_cnn", choices=list_models())
    g.add_argument("--image-size", type=int, default=None, help="input size (default: the model's)")
    g.add_argument("--epochs", type=int, default=epochs)
    g.add_argument("--batch-size", type=int, default=32)
    g.add_argument("--lr", type=float, default=2e-3)
    g.add_argument("--weight-decay", type=float, default=1e-4)
    g.add_argument("--pretrained", choices=["auto", "yes", "no"], default="auto",
                   help="ImageNet weights for baselines (auto: the model's default)")
    add_finetune_arg(g)
    g.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    g.add_argument("--workspace", default=str(DEFAULT_WORKSPACE), help="where runs are written")


def add_finetune_arg(g) -> None:
    from fedbrain.models import FINETUNE_HELP

    g.add_argument("--finetune", default="all", help=FINETUNE_HELP + " (default all)")


def train_config(args: argparse.Namespace):
    from fedbrain.training import TrainConfig

    return TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, weight_decay=args.weight_decay,
                       seed=args.seed, threads=args.threads)


def parse_finetune_or_exit(spec: str) -> None:
    from fedbrain.models import parse_finetune

    try:
        parse_finetune(spec)
    except ValueError as exc:
        raise UsageError(str(exc)) from exc


def pretrained_flag(args: argparse.Namespace) -> bool | None:
    return {"auto": None, "yes": True, "no": False}[args.pretrained]


# ---------------------------------------------------------------- commands


def cmd_data_summary(args: argparse.Namespace) -> int:
    from fedbrain.data.federation import summary_table

    fed = load_federation(args)
    print(summary_table(fed.summary))
    if args.json:
        Path(args.json).write_text(json.dumps(fed.summary, indent=2))
        print(f"\nwrote {args.json}")
    return 0


def cmd_data_fetch(args: argparse.Namespace) -> int:
    from fedbrain.data import fetch

    return fetch.run_fetch(args)


def cmd_train(args: argparse.Namespace) -> int:
    from fedbrain.experiment import new_run_dir, results_table, train_pooled, write_config

    if args.mode == "local" and not args.site:
        raise UsageError("--mode local needs --site NAME")
    parse_finetune_or_exit(args.finetune)
    fed = load_federation(args)
    sites = [args.site] if args.mode == "local" else None
    if args.site and args.site not in fed.sites:
        raise UsageError(f"unknown --site {args.site!r}; this federation has {list(fed.sites)}")
    run_dir = new_run_dir(args.workspace, f"{args.mode}-{args.model}")
    fed.write(run_dir)
    cfg = train_config(args)
    write_config(run_dir, kind=args.mode, model=args.model, site=args.site, train=cfg.to_dict(),
                 federation=fed.spec.to_dict(), image_size=args.image_size, finetune=args.finetune,
                 argv=sys.argv[1:])
    print(f"run: {run_dir}")
    t0 = time.perf_counter()
    res = train_pooled(fed, args.model, cfg, run_dir, sites=sites, image_size=args.image_size,
                       pretrained=pretrained_flag(args), cache_dir=Path(args.cache_dir) if args.cache_dir else None,
                       finetune=args.finetune)
    print(f"\ntest metrics of the best checkpoint ({time.perf_counter() - t0:.0f} s):")
    print(results_table(res["test"]))
    print(f"\ncheckpoints: {run_dir / 'checkpoints'}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from fedbrain.checkpoint import load_checkpoint
    from fedbrain.experiment import SiteLoaders, evaluate_everywhere, pooled_site, results_table
    from fedbrain.training import TrainConfig

    model, meta = load_checkpoint(args.checkpoint)
    fed = load_federation(args)
    cfg = TrainConfig(batch_size=64)
    cache = Path(args.cache_dir) if args.cache_dir else None
    loaders = {n: SiteLoaders(s, meta["preprocessing"], cfg, cache_dir=cache) for n, s in fed.sites.items()}
    loaders["union"] = SiteLoaders(pooled_site("union", list(fed.sites.values())), meta["preprocessing"], cfg,
                                   cache_dir=cache)
    res = evaluate_everywhere(model, loaders, args.split)
    print(f"model {meta['model']['name']} (supervised: {meta['supervised_granularity']}) on split {args.split}:")
    print(results_table(res))
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2))
    return 0


def cmd_bench_train(args: argparse.Namespace) -> int:
    import warnings

    import torch

    from fedbrain.models import (
        apply_finetune,
        count_macs,
        count_parameters,
        create_model,
        default_preprocessing,
        list_models,
    )
    from fedbrain.training import TrainConfig, train_epochs

    if args.threads:
        torch.set_num_threads(args.threads)
    names = args.models or list_models()
    parse_finetune_or_exit(args.finetune)
    size = args.image_size or "each model's default"
    print(f"training throughput, batch {args.batch_size}, {torch.get_num_threads()} threads, "
          f"{args.steps} timed steps after 1 warm-up (synthetic inputs, {size} px), "
          f"fine-tune {args.finetune}")
    print(f"{'model':<22}{'size':>6}{'params':>12}{'MMACs':>10}{'img/s':>9}{'vs fedbrain_cnn':>17}")
    base = None
    rows = []
    for name in names:
        pre = default_preprocessing(name, args.image_size)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = create_model(name, pretrained=False)
        trainable = apply_finetune(model, name, args.finetune)["trainable_params"]
        x = torch.randn(args.batch_size, pre.channels, pre.image_size, pre.image_size)
        y = torch.randint(0, 4, (args.batch_size,))
        batches = [(x, y)]
        cfg = TrainConfig(batch_size=args.batch_size, class_weighting=False)
        train_epochs(model, batches, cfg, epochs=1)  # warm-up
        stats = train_epochs(model, batches, cfg, epochs=args.steps)
        ips = stats["images_per_s"]
        base = ips if name == "fedbrain_cnn" else base
        ratio = f"{base / ips:.1f}x slower" if base and name != "fedbrain_cnn" else "-"
        rows.append({"model": name, "image_size": pre.image_size, "params": count_parameters(model),
                     "trainable_params": trainable, "finetune": args.finetune,
                     "macs": count_macs(model, pre), "images_per_s": ips})
        print(f"{name:<22}{pre.image_size:>6}{rows[-1]['params']:>12,}{rows[-1]['macs'] / 1e6:>10.1f}"
              f"{ips:>9.1f}{ratio:>17}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from fedbrain.models import list_models, model_info

    for n in list_models():
        info = model_info(n)
        p = info.preprocessing
        print(f"{n:<22}{p.channels}x{p.image_size}x{p.image_size}  {info.description}")
    return 0


# ---------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedbrain", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    data = sub.add_parser("data", help="inspect and fetch data").add_subparsers(dest="data_command", required=True)
    p = data.add_parser("summary", help="per-site images, duplicates dropped, conflicts, class counts per split")
    add_federation_args(p)
    p.add_argument("--json", help="also write the summary as JSON")
    p.set_defaults(func=cmd_data_summary)
    p = data.add_parser("fetch", help="download a public dataset (needs internet)")
    from fedbrain.data import fetch

    fetch.add_fetch_arguments(p)
    p.set_defaults(func=cmd_data_fetch)

    p = sub.add_parser("train", help="centralised (all sites pooled) or local-only training")
    p.add_argument("--mode", choices=["centralized", "local"], default="centralized")
    p.add_argument("--site", help="the site for --mode local")
    add_federation_args(p)
    add_train_args(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("evaluate", help="evaluate a checkpoint on every site's split and their union")
    p.add_argument("checkpoint")
    p.add_argument("--split", choices=["train", "val", "test"], default="test")
    p.add_argument("--json", help="write the metrics as JSON")
    add_federation_args(p)
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("models", help="list the model registry")
    p.set_defaults(func=cmd_models)

    bench = sub.add_parser("bench", help="benchmarks").add_subparsers(dest="bench_command", required=True)
    p = bench.add_parser("train", help="training images/s of each registry model in one run")
    p.add_argument("--models", nargs="*", help="subset of models (default: all)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--image-size", type=int, default=None)
    p.add_argument("--threads", type=int, default=None)
    add_finetune_arg(p)
    p.add_argument("--json")
    p.set_defaults(func=cmd_bench_train)

    for module in _EXTENSIONS:
        try:
            importlib.import_module(module).register(sub)
        except ImportError as exc:  # a broken optional part must not take the whole CLI down
            print(f"fedbrain: warning: commands of {module} unavailable: {exc}", file=sys.stderr)
    return parser


# Modules that add sub-commands: each has ``register(subparsers)``.
_EXTENSIONS = ["fedbrain.fl.cli", "fedbrain.compression.cli", "fedbrain.dashboard.cli"]
_EXTENSIONS = [m for m in _EXTENSIONS if importlib.util.find_spec(m) is not None]


def main(argv: list[str] | None = None) -> int:
    from fedbrain.checkpoint import CheckpointError
    from fedbrain.data.readers import DataLayoutError

    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (UsageError, DataLayoutError, CheckpointError, KeyError, FileNotFoundError) as exc:
        msg = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        print(f"fedbrain: error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fedbrain: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
