"""``fedbrain config show``: the effective job configuration, every key with its value and where it came from."""

from __future__ import annotations

import argparse
import json

from fedbrain.cli.options import add_federation_args, add_job_args, run_config


def cmd_config_show(args: argparse.Namespace) -> int:
    from fedbrain.config import DEFAULT, toml_value

    cfg = run_config(args)
    rows = cfg.rows()
    if not cfg.given("rounds"):
        rows.insert(4, ("rounds", "from budget_epochs at run time", DEFAULT))
    if args.toml:
        print(cfg.to_toml(), end="")
        return 0
    if args.json:
        print(json.dumps({k: {"value": v, "source": s} for k, v, s in rows}, indent=1, default=str))
        return 0
    width = max(len(k) for k, _, _ in rows)
    rows = [(k, toml_value(v) if not (k == "rounds" and isinstance(v, str)) else v, s) for k, v, s in rows]
    shown = [(k, v, s) for k, v, s in rows if args.all or s != "default" or "." not in k or k.startswith("local.")]
    for key, value, source in shown:
        print(f"{key:<{width}}  {value:<24}  {source}")
    if len(shown) < len(rows):
        print(f"({len(rows) - len(shown)} more [train] and [data] keys at their defaults: --all lists them)")
    return 0


def register(groups) -> None:
    p = groups.group("config").add_parser("show", help="the effective settings of a job: every key, its value and "
                                           "where it came from (default, file, flag or --set)")
    add_federation_args(p, job=True)
    add_job_args(p, resume=False)
    p.add_argument("--all", action="store_true", help="also the [train] and [data] keys left at their defaults")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--toml", action="store_true", help="print the configuration as a file to --config")
    p.set_defaults(func=cmd_config_show)
