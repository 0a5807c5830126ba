"""``fedbrain audit RUN``: what left each site, the ε each spent, and a membership-inference attack."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from fedbrain.cli.options import POSITIVE_INT, UsageError, add_cache_arg, cache_dir


def cmd_audit(args: argparse.Namespace) -> int:
    from fedbrain.privacy_audit import audit_run, audit_table
    from fedbrain.runs import RunDir

    run = RunDir(Path(args.run).resolve())
    if not run.config.is_file():
        raise UsageError(f"{args.run} is not a run folder (no config.json)")
    if not run.has_splits():
        raise UsageError(f"{args.run} recorded no site splits: the attack needs each site's training and held-out "
                         "images (a federated or pooled run over a federation)")
    result = audit_run(run, max_images=args.max_images, seed=args.seed, cache_dir=cache_dir(args),
                       checkpoint=Path(args.checkpoint) if args.checkpoint else None)
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        print(f"privacy audit of {run.name} ({result['model']}, {result['model_name']}): loss-based membership "
              "inference, members = each site's training images, non-members = its validation + test images")
        print(audit_table(result))
        print(f"\nwritten to {run.membership_audit}")
    return 0


def register(groups) -> None:
    p = groups.top.add_parser("audit", help="privacy audit of a run: what left each site, ε spent, and a "
                              "membership-inference attack on its global model")
    p.add_argument("run", help="a run folder (fedbrain simulate, train or submit)")
    p.add_argument("--checkpoint", help="the model to attack (default: the run's best.pt)")
    p.add_argument("--max-images", type=POSITIVE_INT, default=500,
                   help="members and non-members per site, at most (default %(default)s; equally many of each)")
    p.add_argument("--seed", type=int, default=0)
    add_cache_arg(p)
    p.add_argument("--json", action="store_true", help="print the whole result as JSON")
    p.set_defaults(func=cmd_audit)
