"""How ``fedbrain dashboard`` starts Streamlit: loopback only, headless, no telemetry, bounded uploads."""

from __future__ import annotations

import sys
from pathlib import Path

from fedbrain.dashboard import MAX_UPLOAD_MB

APP = Path(__file__).with_name("app.py")
HOST = "127.0.0.1"
DEFAULT_PORT = 8501
# Host headers the websocket accepts: loopback names only, so a page on another origin cannot reach the
# dashboard through a DNS name that rebinds to 127.0.0.1.
ALLOWED_HOSTS = ("127.0.0.1", "localhost")


def streamlit_command(port: int = DEFAULT_PORT, max_upload_mb: int = MAX_UPLOAD_MB) -> list[str]:
    """The ``streamlit run`` command line."""
    return [
        sys.executable, "-m", "streamlit", "run", str(APP),
        "--server.address", HOST,
        "--server.port", str(port),
        *[arg for host in ALLOWED_HOSTS for arg in ("--server.allowedHosts", host)],
        "--server.enableCORS", "true",
        "--server.enableXsrfProtection", "true",
        "--server.headless", "true",
        "--browser.gatherUsageStats", "false",
        "--server.maxUploadSize", str(max_upload_mb),
        "--server.fileWatcherType", "none",
        "--server.runOnSave", "false",
        "--global.developmentMode", "false",
        "--client.toolbarMode", "viewer",
        "--theme.base", "light",
    ]
