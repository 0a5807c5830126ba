"""``fedbrain dashboard``: start the Streamlit dashboard over a workspace (read-only, 127.0.0.1)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from fedbrain.cli.options import add_workspace_arg


def cmd_dashboard(args: argparse.Namespace) -> int:
    from fedbrain.dashboard.launch import HOST, streamlit_command

    ws = Path(args.workspace).expanduser().resolve()
    cmd = streamlit_command(args.port)
    env = {**os.environ, "FEDBRAIN_WORKSPACE": str(ws), "STREAMLIT_BROWSER_GATHER_USAGE_STATS": "false"}
    print(f"fedbrain dashboard: http://{HOST}:{args.port}  (workspace {ws}; Ctrl+C stops it)", flush=True)
    if args.print_command:
        print(" ".join(cmd))
        return 0
    os.execve(sys.executable, cmd, env)  # replaces this process: a signal to it stops Streamlit itself
    return 0  # pragma: no cover


def register(groups) -> None:
    from fedbrain.dashboard.launch import DEFAULT_PORT

    p = groups.top.add_parser("dashboard", help="Streamlit dashboard over a workspace's runs (127.0.0.1)")
    add_workspace_arg(p)
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help="port on 127.0.0.1 (default %(default)s)")
    p.add_argument("--print-command", action="store_true", help="print the streamlit command and exit")
    p.set_defaults(func=cmd_dashboard)
