"""``fedbrain results render``: docs/results.md's tables from the committed files in docs/results/;
``fedbrain results regenerate``: those files from the commands that make them (stamped, resumable)."""

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


def cmd_results_regenerate(args: argparse.Namespace) -> int:
    from fedbrain.experiments.regenerate import RegenerateError, Regeneration, describe, plan, regenerate
    from fedbrain.experiments.report import ReportError, render_file

    doc = Path(args.doc)
    results_dir, workspace = doc.parent / "results", Path(args.workspace)
    try:
        steps = plan(results_dir, args.names)
        print(describe(steps, Regeneration(results_dir, workspace, args.data_root, resume=args.resume)))
        if args.dry_run:
            return 0
        written = regenerate(results_dir, workspace, args.names, resume=args.resume, data_root=args.data_root)
        render_file(doc, results_dir)
    except (RegenerateError, ReportError) as exc:
        raise UsageError(str(exc)) from exc
    print(f"wrote {len(written)} file(s): {', '.join(p.name for p in written) or 'none'}; {doc} re-rendered")
    return 0


def register(groups) -> None:
    p = groups.top.add_parser("results", help="the documented results, generated from their committed files")
    sub = p.add_subparsers(dest="results_command", required=True)
    r = sub.add_parser("render", help="rewrite every marked table of docs/results.md from docs/results/*")
    r.add_argument("--doc", default="docs/results.md", help="the document to render (default %(default)s; its "
                   "tables' sources are the results/ folder beside it)")
    r.add_argument("--check", action="store_true", help="change nothing; exit 1 if a table differs from its file")
    r.set_defaults(func=cmd_results_render)

    r = sub.add_parser("regenerate", help="run the command of every missing or stale file of docs/results/ in turn, "
                       "stamp each file with its provenance and re-render docs/results.md")
    r.add_argument("names", nargs="*", metavar="NAME", help="only these entries (and the runs they read); "
                   "--dry-run lists them")
    r.add_argument("--resume", action="store_true", help="continue an interrupted regeneration: its finished steps "
                   "are kept and an interrupted run is finished in place (the command's own --resume)")
    r.add_argument("--dry-run", action="store_true", help="print the plan (what would run and why) and stop")
    r.add_argument("--data-root", default="../shared/data", help="the benchmark data folder (default %(default)s)")
    r.add_argument("--workspace", default="workspace/regenerate", help="where the runs are made (default "
                   "%(default)s; one folder per entry)")
    r.add_argument("--doc", default="docs/results.md", help="the document to re-render (its files are the "
                   "results/ folder beside it; default %(default)s)")
    r.set_defaults(func=cmd_results_regenerate)
