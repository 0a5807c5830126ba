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


def streamlit_command(port: int = DEFAULT_PORT, max_upload_mb: int = MAX_UPLOAD_MB, host: str = HOST) -> list[str]:
    """The ``streamlit run`` command line. ``host`` other than loopback also joins the accepted Host headers
    (the proxy in front of it must then authenticate every request)."""
    allowed = ALLOWED_HOSTS + ((host,) if host not in ALLOWED_HOSTS and host not in ("0.0.0.0", "::") else ())
    return [
        sys.executable, "-m", "streamlit", "run", str(APP),
        "--server.address", host,
        "--server.port", str(port),
        *[arg for name in allowed for arg in ("--server.allowedHosts", name)],
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
