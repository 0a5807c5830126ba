"""How ``fedbrain dashboard`` starts Streamlit: loopback only, headless, no telemetry, bounded uploads."""

from __future__ import annotations

import sys
from pathlib import Path

from fedbrain.dashboard import MAX_UPLOAD_MB

APP = Path(__file__).with_name("app.py")
HOST = "127.0.0.1"
DEFAULT_PORT = 8501


def streamlit_command(port: int = DEFAULT_PORT, max_upload_mb: int = MAX_UPLOAD_MB) -> list[str]:
    """The ``streamlit run`` command line."""
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
