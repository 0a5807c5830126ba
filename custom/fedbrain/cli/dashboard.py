"""``fedbrain dashboard``: start the Streamlit dashboard over a workspace (read-only, 127.0.0.1)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from fedbrain.cli.options import PORT, UsageError, add_workspace_arg


def cmd_dashboard(args: argparse.Namespace) -> int:
    from fedbrain.dashboard.launch import HOST, streamlit_command

    ws = Path(args.workspace).expanduser().resolve()
    if not ws.is_dir():
        raise UsageError(f"--workspace {args.workspace!r} is not a folder (runs are written to ./workspace by "
                         "default; `fedbrain simulate` makes one)")
    try:
        cmd = streamlit_command(args.port, host=args.host)
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
    env = {**os.environ, "FEDBRAIN_WORKSPACE": str(ws), "STREAMLIT_BROWSER_GATHER_USAGE_STATS": "false"}
    if args.host != HOST:
        print(f"fedbrain dashboard: serving on {args.host}, beyond this machine, WITHOUT authentication: put an "
              "authenticating reverse proxy (TLS + login) in front of it (see docs/clinicians.md)", file=sys.stderr)
    print(f"fedbrain dashboard: http://{args.host}:{args.port}  (workspace {ws}; Ctrl+C stops it)", flush=True)
    if args.print_command:
        print(" ".join(cmd))
        return 0
    os.execve(sys.executable, cmd, env)  # replaces this process: a signal to it stops Streamlit itself
    return 0  # pragma: no cover


def register(groups) -> None:
    from fedbrain.dashboard.launch import DEFAULT_PORT, HOST

    p = groups.top.add_parser("dashboard", help="Streamlit dashboard over a workspace's runs (127.0.0.1)")
    add_workspace_arg(p)
    p.add_argument("--port", type=PORT, default=DEFAULT_PORT, help="port (default %(default)s)")
    p.add_argument("--host", default=HOST, help="address to listen on (default %(default)s: this machine only). "
                   "Anything else exposes the dashboard unauthenticated: only behind an authenticating proxy")
    p.add_argument("--print-command", action="store_true", help="print the streamlit command and exit")
    p.set_defaults(func=cmd_dashboard)
