"""``fedbrain train``, ``fedbrain evaluate``, ``fedbrain models`` and ``fedbrain bench train``."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from fedbrain.cli.options import (
    POSITIVE_INT,
    UsageError,
    add_federation_args,
    add_finetune_arg,
    add_model_args,
    add_optimizer_args,
    add_workspace_arg,
    cache_dir,
    check_finetune,
    data_given,
    int_at_least,
    load_federation,
    pretrained_flag,
    train_config,
)


def cmd_train(args: argparse.Namespace) -> int:
    from fedbrain.evaluation import results_table
    from fedbrain.experiments.pooled import train_pooled
    from fedbrain.runs import RunDir

    if args.mode == "local" and not args.site:
        raise UsageError("--mode local needs --site NAME")
    check_finetune(args.finetune)
    fed = load_federation(args)
    sites = [args.site] if args.mode == "local" else None
    if args.site and args.site not in fed.sites:
        raise UsageError(f"unknown --site {args.site!r}; this federation has {list(fed.sites)}")
    run = RunDir.create(args.workspace, f"{args.mode}-{args.model}")
    fed.write(run.root)
    cfg = train_config(args)
    run.write_config(kind=args.mode, model=args.model, site=args.site, train=cfg.to_dict(),
                     federation=fed.spec.to_dict(), image_size=args.image_size, finetune=args.finetune,
                     argv=sys.argv[1:])
    print(f"run: {run}")
    t0 = time.perf_counter()
    res = train_pooled(fed, args.model, cfg, run, sites=sites, image_size=args.image_size,
                       pretrained=pretrained_flag(args), cache_dir=cache_dir(args), finetune=args.finetune)
    print(f"\ntest metrics of the best checkpoint ({time.perf_counter() - t0:.0f} s):")
    print(results_table(res["test"]))
    print(f"\ncheckpoints: {run.checkpoints}")
    return 0


def _evaluation_data(args: argparse.Namespace, checkpoint: Path):
    """The run's recorded splits; the caller's federation only when asked, with a warning where it differs."""
    from fedbrain.compression.data import LocalData
    from fedbrain.evaluation import split_differences
    from fedbrain.runs import RunDir

    run = RunDir.of_checkpoint(checkpoint)
    recorded = LocalData.of_run(run).sites if run is not None else []
    if not data_given(args):
        if not recorded:
            raise UsageError(f"{checkpoint} is not in a run folder with splits/<site>.csv; name the data with "
                             "--data-root DIR, --site-config FILE or --embedded")
        return recorded, f"the run's recorded splits ({run.splits})"
    sites = list(load_federation(args, progress=False).sites.values())
    if recorded:
        for line in split_differences(recorded, sites, args.split):
            print(f"fedbrain: warning: the data you named differs from the splits this run recorded: {line}",
                  file=sys.stderr)
    return sites, "the federation named by the data options"


def cmd_evaluate(args: argparse.Namespace) -> int:
    from fedbrain.checkpoint import load_checkpoint
    from fedbrain.data.dataset import site_loaders
    from fedbrain.evaluation import evaluate_everywhere, results_table, site_separability
    from fedbrain.runs import RunDir

    target = Path(args.target)
    checkpoint = RunDir(target).best if target.is_dir() else target
    model, card = load_checkpoint(checkpoint)
    sites, source = _evaluation_data(args, checkpoint)
    loaders = site_loaders({s.name: s for s in sites}, card.preprocessing, 64, cache_dir(args))
    res = evaluate_everywhere(model, loaders, args.split)
    print(f"model {card.model} (supervised: {card.supervised_granularity}) on split {args.split} of {source}:")
    print(results_table(res))
    probe = site_separability(model, card.model, loaders, args.split)
    if probe:
        print(f"\nsite probe: a linear probe tells the sites apart from the model's features with balanced accuracy "
              f"{probe['site_probe_balanced_accuracy']:.3f} (chance {probe['chance']:.3f}; {probe['n']} images, "
              f"{probe['folds']}-fold)")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2))
    return 0


def cmd_bench_train(args: argparse.Namespace) -> int:
    import torch

    from fedbrain.experiments.throughput import train_throughput
    from fedbrain.models import list_models

    if args.threads:
        torch.set_num_threads(args.threads)
    names = args.models or list_models()
    unknown = [n for n in names if n not in list_models()]
    if unknown:
        raise UsageError(f"unknown model(s) {unknown}; choose from {list_models()}")
    check_finetune(args.finetune)
    size = args.image_size or "each model's default"
    print(f"training throughput, batch {args.batch_size}, {torch.get_num_threads()} threads, "
          f"{args.steps} timed steps after 1 warm-up (synthetic inputs, {size} px), "
          f"fine-tune {args.finetune}")
    print(f"{'model':<22}{'size':>6}{'params':>12}{'MMACs':>10}{'img/s':>9}{'vs fedbrain_cnn':>17}")
    base, rows = None, []
    for row in train_throughput(names, args.batch_size, args.steps, args.image_size, args.finetune,
                                args.device or "auto"):
        ips = row["images_per_s"]
        base = ips if row["model"] == "fedbrain_cnn" else base
        ratio = f"{base / ips:.1f}x slower" if base and row["model"] != "fedbrain_cnn" else "-"
        rows.append(row)
        print(f"{row['model']:<22}{row['image_size']:>6}{row['params']:>12,}{row['macs'] / 1e6:>10.1f}"
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


def register(groups) -> None:
    sub = groups.top
    p = sub.add_parser("train", help="centralised (all sites pooled) or local-only training")
    p.add_argument("--mode", choices=["centralized", "local"], default="centralized")
    p.add_argument("--site", help="the site for --mode local")
    add_federation_args(p)
    g = p.add_argument_group("training")
    add_model_args(g)
    add_optimizer_args(g)
    g.add_argument("--threads", type=POSITIVE_INT, default=None, help="torch CPU threads")
    add_workspace_arg(g)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("evaluate", help="a model on the test split of every site of its run, and their union")
    p.add_argument("target", metavar="RUN_OR_CHECKPOINT",
                   help="a run folder (its checkpoints/best.pt) or a checkpoint file")
    p.add_argument("--split", choices=["train", "val", "test"], default="test")
    p.add_argument("--json", help="write the metrics as JSON")
    p.add_argument("--embedded", action="store_true",
                   help="evaluate on the embedded Br35H federation instead of the run's recorded splits")
    add_federation_args(p)
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("models", help="list the model registry")
    p.set_defaults(func=cmd_models)

    p = groups.group("bench").add_parser("train", help="training images/s of each registry model in one run")
    p.add_argument("--models", nargs="*", help="subset of models (default: all)")
    p.add_argument("--batch-size", type=POSITIVE_INT, default=32)
    p.add_argument("--steps", type=POSITIVE_INT, default=3)
    p.add_argument("--image-size", type=int_at_least(32), default=None)
    p.add_argument("--threads", type=POSITIVE_INT, default=None)
    p.add_argument("--device", default=None, help="auto (CUDA when present), cpu or cuda")
    add_finetune_arg(p)
    p.add_argument("--json")
    p.set_defaults(func=cmd_bench_train)
