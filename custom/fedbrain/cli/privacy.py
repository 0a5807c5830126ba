"""``fedbrain audit RUN``: what left each site, the ε each spent, and a membership-inference attack; with
``--attack inversion``, the images the server can rebuild from one round's update."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from fedbrain.cli.options import POSITIVE_INT, UsageError, add_cache_arg, cache_dir


def cmd_audit(args: argparse.Namespace) -> int:
    from fedbrain.privacy_audit import audit_run, audit_table
    from fedbrain.runs import RunDir

    path = Path(args.run).resolve()
    if path.is_file() and not args.checkpoint:  # a model file inside a run: attack it with that run's sites
        args.checkpoint = str(path)
        run = RunDir.containing(path) or RunDir(path)
    else:
        run = RunDir(path)
    if not run.config.is_file():
        raise UsageError(f"{args.run} is not a run folder (no config.json) nor a model inside one")
    if not run.has_splits():
        raise UsageError(f"{args.run} recorded no site splits: the attack needs each site's training and held-out "
                         "images (a federated or pooled run over a federation)")
    if args.attack == "inversion":
        return _inversion(args, run)
    try:
        result = audit_run(run, max_images=args.max_images, seed=args.seed, cache_dir=cache_dir(args),
                           checkpoint=Path(args.checkpoint) if args.checkpoint else None,
                           reference=Path(args.reference) if args.reference else None)
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
    return _report(args, result, f"privacy audit of {run.name} ({result['model']}, {result['model_name']}): "
                   "loss-based membership inference, members = each site's training images, non-members = its "
                   "validation + test images", audit_table(result), run.membership_audit)


def _report(args: argparse.Namespace, result: dict, title: str, table: str, written: Path) -> int:
    """An audit's result: JSON with ``--json``, else its title, table and file."""
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        print(f"{title}\n{table}\n\nwritten to {written}")
    return 0


def _inversion(args: argparse.Namespace, run) -> int:
    from fedbrain.inversion import InversionConfig, audit_run, audit_table

    cfg = InversionConfig(seed=args.seed, **({"iterations": args.iterations, "feature_iterations": args.iterations}
                                             if args.iterations else {}))
    try:
        result = audit_run(run, images=args.images, setting=args.setting, cfg=cfg, cache_dir=cache_dir(args),
                           checkpoint=Path(args.checkpoint) if args.checkpoint else None)
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
    return _report(args, result, f"gradient inversion of {run.name} ({result['model']}, {result['model_name']}): "
                   "images rebuilt from one round's update; SSIM / PSNR beside a flat image at the scan's mean and "
                   "another slice of the site", audit_table(result), run.inversion_audit)


def register(groups) -> None:
    p = groups.top.add_parser("audit", help="privacy audit of a run: what left each site, ε spent, and a "
                              "membership-inference attack on its global model")
    p.add_argument("run", metavar="RUN_OR_MODEL", help="a run folder (fedbrain simulate, train or submit), or a "
                   "model file inside one")
    p.add_argument("--attack", choices=("membership", "inversion"), default="membership",
                   help="membership inference on the global model (default), or gradient inversion of one round")
    p.add_argument("--images", type=int, choices=(1, 2, 5), default=1,
                   help="inversion: the images in the attacked site's batch (default %(default)s)")
    p.add_argument("--setting", choices=("default", "one-image-untrained", "crafted", "imprint"), default="default",
                   help="inversion: the run's model seen in the clear and under secure aggregation (default), one "
                   "image on an untrained model, one image on a model a malicious server crafted, or the run's model "
                   "behind an imprint layer a malicious server added (the positive control: it leaks)")
    p.add_argument("--iterations", type=POSITIVE_INT,
                   help="inversion: optimiser steps per restart and of feature inversion")
    p.add_argument("--checkpoint", help="the model to attack (default: the run's best.pt)")
    p.add_argument("--reference", metavar="MODEL", help="membership: a model trained without these sites' training "
                   "images (e.g. another run's best.pt): adds the calibrated attack (loss difference)")
    p.add_argument("--max-images", type=POSITIVE_INT, default=500,
                   help="members and non-members per site, at most (default %(default)s; equally many of each)")
    p.add_argument("--seed", type=int, default=0)
    add_cache_arg(p)
    p.add_argument("--json", action="store_true", help="print the whole result as JSON")
    p.set_defaults(func=cmd_audit)
