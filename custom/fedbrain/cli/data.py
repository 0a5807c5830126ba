"""``fedbrain data summary`` and ``fedbrain data fetch`` (``data split`` is a deployment command)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from fedbrain.cli.options import add_federation_args, load_federation


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


def register(groups) -> None:
    from fedbrain.data import fetch

    data = groups.group("data")
    p = data.add_parser("summary", help="per-site images, duplicates dropped, conflicts, class counts per split")
    add_federation_args(p)
    p.add_argument("--json", help="also write the summary as JSON")
    p.set_defaults(func=cmd_data_summary)
    p = data.add_parser("fetch", help="download a public dataset (needs internet)")
    fetch.add_fetch_arguments(p)
    p.set_defaults(func=cmd_data_fetch)
