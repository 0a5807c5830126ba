"""Test-only process helpers: start provisioned NVFlare kits headless and stop everything they spawned."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path


def start_kit(kit: str | Path, log_file: str | Path, env: dict | None = None) -> subprocess.Popen:
    """Start a server or client kit headless in its own process group (no prompt, no restart daemon):
    ``startup/sub_start.sh --once`` with this Python environment first on PATH."""
    kit = Path(kit).resolve()
    run_env = {**os.environ, **(env or {})}
    run_env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), run_env.get("PATH", "")])
    run_env.setdefault("PYTHONUNBUFFERED", "1")
    log = open(log_file, "ab")  # the child keeps its own copy of the descriptor
    try:
        return subprocess.Popen(["bash", str(kit / "startup" / "sub_start.sh"), "--once"], cwd=str(kit),
                                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=run_env,
                                start_new_session=True)
    finally:
        log.close()


def processes_mentioning(path: str | Path) -> list[int]:
    """PIDs of live processes whose command line mentions ``path``: a kit's NVFlare parent and the job
    processes it spawns (NVFlare starts those in their own sessions, outside the kit's process group)."""
    import psutil

    needle = str(Path(path).resolve())
    out = []
    for proc in psutil.process_iter(["pid", "cmdline", "status"]):
        try:
            if proc.info["pid"] == os.getpid() or proc.info["status"] == psutil.STATUS_ZOMBIE:
                continue
            if any(part == needle or needle + os.sep in part for part in proc.info["cmdline"] or []):
                out.append(proc.info["pid"])
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return out


def stop_processes(procs: list[subprocess.Popen], roots: list[str | Path] = (),
                   grace: float = 10.0) -> list[int]:
    """Stop started kits and everything they spawned: SIGTERM to each live kit's process group and to
    every descendant / process running from ``roots``, SIGKILL after ``grace`` s.

    Returns the PIDs still alive (empty when everything is gone)."""
    import psutil

    targets: dict[int, psutil.Process] = {}  # psutil.Process guards against PID reuse

    def add(pid: int) -> None:
        try:
            targets.setdefault(pid, psutil.Process(pid))
        except psutil.NoSuchProcess:
            pass

    for p in procs:
        add(p.pid)
        try:
            for child in psutil.Process(p.pid).children(recursive=True):
                targets.setdefault(child.pid, child)
        except psutil.NoSuchProcess:
            pass
    for root in roots:
        for pid in processes_mentioning(root):
            add(pid)

    def alive() -> list[int]:
        for p in procs:
            p.poll()  # reap our own children
        left = []
        for pid, proc in targets.items():
            try:
                if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
                    left.append(pid)
            except psutil.NoSuchProcess:
                pass
        return sorted(left)

    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 10.0)):
        left = alive()
        if not left:
            return []
        for p in procs:
            if p.poll() is None:  # the leader is alive, so its process group is still ours
                try:
                    os.killpg(p.pid, sig)
                except (ProcessLookupError, PermissionError):
                    pass
        for pid in left:
            try:
                targets[pid].send_signal(sig)
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                pass
        deadline = time.monotonic() + wait
        while alive() and time.monotonic() < deadline:
            time.sleep(0.2)
    return alive()
