"""``fedbrain results render``: regenerate docs/results.md's tables from the committed files in docs/results/."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from fedbrain.cli.options import UsageError


def cmd_results_render(args: argparse.Namespace) -> int:
    from fedbrain.experiments.report import ReportError, render_document, render_file

    doc = Path(args.doc)
    try:
        if args.check:
            if not doc.is_file():
                raise ReportError(f"{doc}: no such document")
            stale = render_document(doc.read_text(), doc.parent / "results") != doc.read_text()
            if stale:
                print(f"{doc}: tables differ from their files: run `fedbrain results render`", file=sys.stderr)
                return 1
            print(f"{doc}: up to date")
            return 0
        changed = render_file(doc)
    except ReportError as exc:
        raise UsageError(str(exc)) from exc
    print(f"{doc}: {'tables re-rendered' if changed else 'already up to date'}")
    return 0


def register(groups) -> None:
    p = groups.top.add_parser("results", help="the documented results, generated from their committed files")
    sub = p.add_subparsers(dest="results_command", required=True)
    r = sub.add_parser("render", help="rewrite every marked table of docs/results.md from docs/results/*")
    r.add_argument("--doc", default="docs/results.md", help="the document to render (default %(default)s; its "
                   "tables' sources are the results/ folder beside it)")
    r.add_argument("--check", action="store_true", help="change nothing; exit 1 if a table differs from its file")
    r.set_defaults(func=cmd_results_render)
