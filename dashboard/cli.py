"""``fedbrain dashboard``: start the Streamlit dashboard over a workspace (read-only)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from fedbrain.dashboard import MAX_UPLOAD_MB

APP = Path(__file__).with_name("app.py")
HOST = "127.0.0.1"
DEFAULT_PORT = 8501


def streamlit_command(port: int, max_upload_mb: int) -> list[str]:
    """The ``streamlit run`` command line: loopback only, headless, no telemetry, bounded uploads."""
    return [
        sys.executable, "-m", "streamlit", "run", str(APP),
        "--server.address", HOST,
        "--server.port", str(port),
        "--server.headless", "true",
        "--browser.gatherUsageStats", "false",
        "--server.maxUploadSize", str(max_upload_mb),
        "--server.fileWatcherType", "none",
        "--server.runOnSave", "false",
        "--global.developmentMode", "false",
        "--client.toolbarMode", "viewer",
        "--theme.base", "light",
    ]


def cmd_dashboard(args: argparse.Namespace) -> int:
    ws = Path(args.workspace).expanduser().resolve()
    cmd = streamlit_command(args.port, MAX_UPLOAD_MB)
    env = {**os.environ, "FEDBRAIN_WORKSPACE": str(ws), "STREAMLIT_BROWSER_GATHER_USAGE_STATS": "false"}
    print(f"fedbrain dashboard: http://{HOST}:{args.port}  (workspace {ws}; Ctrl+C stops it)", flush=True)
    if args.print_command:
        print(" ".join(cmd))
        return 0
    os.execve(sys.executable, cmd, env)  # replaces this process: a signal to it stops Streamlit itself
    return 0  # pragma: no cover


def register(subparsers) -> None:
    from fedbrain.cli import DEFAULT_WORKSPACE

    p = subparsers.add_parser("dashboard", help="Streamlit dashboard over a workspace's runs (127.0.0.1)")
    p.add_argument("--workspace", default=str(DEFAULT_WORKSPACE), help="runs to show (default %(default)s)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help="port on 127.0.0.1 (default %(default)s)")
    p.add_argument("--print-command", action="store_true", help="print the streamlit command and exit")
    p.set_defaults(func=cmd_dashboard)
