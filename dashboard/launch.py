"""How ``fedbrain dashboard`` starts Streamlit: loopback only, headless, no telemetry, bounded uploads."""

from __future__ import annotations

import sys
from pathlib import Path

from fedbrain.dashboard import MAX_UPLOAD_MB

APP = Path(__file__).with_name("app.py")
HOST = "127.0.0.1"
DEFAULT_PORT = 8501
# Host headers the websocket accepts on a loopback bind: loopback names only, so a page on another origin cannot
# reach the dashboard through a DNS name that rebinds to 127.0.0.1.
ALLOWED_HOSTS = ("127.0.0.1", "localhost")
WILDCARDS = ("0.0.0.0", "::", "")


def is_loopback(host: str) -> bool:
    import ipaddress

    try:
        return host == "localhost" or ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def allowed_hosts(host: str) -> tuple[str, ...]:
    """The Host headers accepted for a bind address. A Host header is the client's claim, not its address: loopback
    names are accepted only on a loopback bind, where the kernel lets only this machine's peers connect; on any
    other address only that address's own name, so a remote client sending ``Host: localhost`` is refused. A
    wildcard bind (every interface, loopback included) cannot tell them apart and is refused."""
    if host in WILDCARDS:
        raise ValueError(f"--host {host or '(empty)'} listens on every interface, where a remote client could claim "
                         "to be local: name the one address to serve on (e.g. the proxy-facing interface's)")
    return ALLOWED_HOSTS if is_loopback(host) else (host,)


def streamlit_command(port: int = DEFAULT_PORT, max_upload_mb: int = MAX_UPLOAD_MB, host: str = HOST) -> list[str]:
    """The ``streamlit run`` command line, accepting the Host headers of :func:`allowed_hosts` (beyond loopback
    the proxy in front of it must authenticate every request)."""
    allowed = allowed_hosts(host)
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
