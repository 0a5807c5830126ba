"""``fedbrain runs``: list a workspace's runs with their state; ``show``, ``follow`` and ``stop`` one of them."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from fedbrain.cli.options import NON_NEGATIVE, NON_NEGATIVE_INT, POSITIVE, UsageError, add_workspace_arg


def resolve_run(name: str, workspace: str):
    """A run folder given as a path or as a name inside the workspace."""
    from fedbrain.runs import RunDir

    for candidate in (Path(name), Path(workspace) / name):
        if candidate.is_dir() and (RunDir(candidate).config.is_file() or RunDir(candidate).status.is_file()):
            return RunDir(candidate.resolve())
    raise UsageError(f"no run {name!r} (neither a run folder nor a run in --workspace {workspace}); "
                     "`fedbrain runs` lists them")


def headline(run) -> str:
    """The union's macro-F1 (or tumour AUROC for tumour / no-tumour federations) of a finished run."""
    from fedbrain.evaluation import UNION
    from fedbrain.runs import fmt_metric

    union = ((run.read_results().get("test") or {}).get(UNION)) or {}
    for key, label in (("macro_f1", "macro-F1"), ("tumour_auroc", "tumour AUROC")):
        if isinstance(union.get(key), (int, float)):
            return f"{label} {fmt_metric(union, key, ci=False)}"
    return "-"


def _progress_cell(status: dict) -> str:
    done, total = status.get("done"), status.get("total")
    return f"{done}/{total}" if isinstance(done, int) and isinstance(total, int) else "-"


def cmd_runs(args: argparse.Namespace) -> int:
    from fedbrain.runs import list_run_dirs
    from fedbrain.status import BADGES, read_status

    runs = list_run_dirs(args.workspace)
    if not runs:
        print(f"no runs in {args.workspace} (`fedbrain simulate` makes one)")
        return 0
    rows = []
    for run in runs[:args.limit] if args.limit else runs:
        cfg, st = run.read_config(), read_status(run)
        rows.append((run.name, f"{BADGES.get(st['state'], '')} {st['state']}", str(cfg.get("kind", "-")),
                     str(cfg.get("model", "-")), str(cfg.get("algorithm", "-")), _progress_cell(st), headline(run)))
    head = ("run", "state", "kind", "model", "algorithm", "done", "headline (union)")
    widths = [max(len(head[i]), *(len(r[i]) for r in rows)) for i in range(len(head))]
    print("  ".join(h.ljust(w) for h, w in zip(head, widths, strict=True)))
    print("  ".join("-" * w for w in widths))
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)))
    if args.limit and len(runs) > args.limit:
        print(f"({len(runs) - args.limit} older run(s) not shown; --limit 0 shows all)")
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    import json

    from fedbrain.status import format_seconds, progress_text, read_status

    run = resolve_run(args.run, args.workspace)
    st, cfg = read_status(run), run.read_config()
    if args.json:
        print(json.dumps({"run": str(run), "status": st, "config": cfg, "results": run.read_results()}, indent=2,
                         default=str))
        return 0
    print(f"run        {run}")
    print(f"kind       {cfg.get('kind', '-')}  model {cfg.get('model', '-')}  algorithm {cfg.get('algorithm', '-')}"
          + (f"  ({cfg['deployment']})" if cfg.get("deployment") else ""))
    print(f"state      {progress_text(st)}" + ("  (inferred: this run has no status.json)" if st.get("inferred")
                                               else ""))
    for key, label in (("started", "started"), ("finished", "finished"), ("job_id", "job id"),
                       ("job_status", "job status"), ("phase", "now")):
        if st.get(key):
            print(f"{label:<10} {st[key]}")
    if isinstance(st.get("elapsed_s"), (int, float)):
        print(f"{'elapsed':<10} {format_seconds(st['elapsed_s'])}")
    sites = st.get("sites") or {}
    if sites:
        print("sites      last contact                 last round")
        for site, c in sorted(sites.items()):
            c = c if isinstance(c, dict) else {}
            rnd = c.get("last_round")
            print(f"  {site:<16} {c.get('last_contact') or '-':<28} {rnd if rnd is not None else '-'}")
    if st.get("error"):
        print(f"error      {st['error']}")
    for site, err in (st.get("site_errors") or {}).items():
        print(f"\nsite {site} failed:\n{err}")
    print(f"headline   {headline(run)}")
    return 0


def cmd_follow(args: argparse.Namespace) -> int:
    from fedbrain.status import FAILED, LIVE_STATES, UNKNOWN, progress_text, read_status

    run = resolve_run(args.run, args.workspace)
    tty = sys.stdout.isatty()
    last = None
    deadline = time.monotonic() + args.timeout if args.timeout else None
    while True:
        st = read_status(run)
        if st["state"] == UNKNOWN:
            raise UsageError(f"{run.name} has no status.json: it is not a job fedbrain is running")
        line = _bar(st) + "  " + progress_text(st)
        if tty:
            print("\r" + line.ljust(100)[:160], end="", flush=True)
        elif line != last:
            print(line, flush=True)
        last = line
        if st["state"] not in LIVE_STATES:
            break
        if deadline and time.monotonic() > deadline:
            print(("\n" if tty else "") + f"still {st['state']} after {args.timeout:.0f} s", flush=True)
            return 4
        time.sleep(args.interval)
    if tty:
        print()
    if st.get("error"):
        print(f"error: {st['error']}", file=sys.stderr)
    print(f"headline: {headline(run)}")
    return 1 if st["state"] == FAILED else 0


def _bar(st: dict, width: int = 30) -> str:
    done, total = st.get("done"), st.get("total")
    if not (isinstance(done, int) and isinstance(total, int) and total > 0):
        return "[" + " " * width + "]"
    filled = min(width, round(width * done / total))
    return "[" + "#" * filled + "-" * (width - filled) + f"] {100 * done / total:3.0f}%"


def cmd_stop(args: argparse.Namespace) -> int:
    from fedbrain.runs import read_json, write_json
    from fedbrain.status import LIVE_STATES, STOPPED, now_iso, read_status, request_stop

    run = resolve_run(args.run, args.workspace)
    st = read_status(run)
    if st["state"] not in LIVE_STATES:
        raise UsageError(f"{run.name} is not running (state: {st['state']})")
    request_stop(run)
    cfg = run.read_config()
    if cfg.get("deployment"):
        from fedbrain.fl import deploy

        job_id, kit = st.get("job_id"), st.get("admin_kit") or cfg.get("admin_kit")
        if not job_id or not kit:
            raise UsageError(f"{run.name}: the job id is not known yet (the job is still being submitted); "
                             "try again in a few seconds")
        deploy.abort_job(kit, job_id)
        print(f"asked the server to abort job {job_id}; `fedbrain submit` records the final state")
    elif args.force:
        pid = st.get("pid")
        _kill_tree(pid)
        doc = read_json(run.status) or {}
        doc.update(state=STOPPED, error="killed by `fedbrain runs stop --force`", finished=now_iso())
        write_json(run.status, doc)
        print(f"killed {run.name} (pid {pid} and its children); `fedbrain simulate --resume {run}` continues it "
              "from its last finished round")
        return 0
    else:
        print(f"stop requested: {run.name} ends after the round in flight, then evaluates the best global model "
              "so far (`fedbrain runs follow` shows it; --force kills it at once)")
    if args.wait:
        args.interval, args.timeout = 1.0, args.wait
        return cmd_follow(args)
    return 0


def _kill_tree(pid: int | None) -> None:
    import psutil

    if not isinstance(pid, int):
        raise UsageError("the run's status names no process to stop")
    try:
        root = psutil.Process(pid)
    except psutil.NoSuchProcess:
        return
    procs = [root, *root.children(recursive=True)]
    for p in procs:
        try:
            p.terminate()
        except psutil.NoSuchProcess:
            pass
    _gone, alive = psutil.wait_procs(procs, timeout=10)
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass


def _workspace_again(p) -> None:
    """``--workspace`` after the sub-command too, without overriding one given before it."""
    p.add_argument("--workspace", default=argparse.SUPPRESS, help="where runs are (default: as for `fedbrain runs`)")


def register(groups) -> None:
    p = groups.top.add_parser("runs", help="list runs with their state; show, follow or stop one")
    add_workspace_arg(p)
    p.add_argument("--limit", type=NON_NEGATIVE_INT, default=20,
                   help="newest runs listed (0: all; default %(default)s)")
    p.set_defaults(func=cmd_runs)
    sub = p.add_subparsers(dest="runs_command")

    s = sub.add_parser("show", help="one run's state, progress, sites' last contact, errors and headline")
    s.add_argument("run", help="a run folder, or its name in --workspace")
    s.add_argument("--json", action="store_true", help="status, config and results as JSON")
    _workspace_again(s)
    s.set_defaults(func=cmd_show)

    s = sub.add_parser("follow", help="a progress bar until the run finishes (exit 1 if it fails)")
    s.add_argument("run", help="a run folder, or its name in --workspace")
    s.add_argument("--interval", type=POSITIVE, default=2.0, help="seconds between updates (default %(default)s)")
    s.add_argument("--timeout", type=NON_NEGATIVE, default=0, help="give up after this many seconds (0: never)")
    _workspace_again(s)
    s.set_defaults(func=cmd_follow)

    s = sub.add_parser("stop", help="stop a running federation after its current round (--force: at once)")
    s.add_argument("run", help="a run folder, or its name in --workspace")
    s.add_argument("--force", action="store_true", help="kill the simulator process tree now")
    s.add_argument("--wait", type=NON_NEGATIVE, default=0, metavar="SECONDS",
                   help="then follow the run until it ends (at most SECONDS)")
    _workspace_again(s)
    s.set_defaults(func=cmd_stop)
