"""A run's live status (``<run>/status.json``): what it is doing now, written as it goes, read by anyone.

The process running the job owns the file (:class:`StatusWriter`); ``fedbrain runs`` and the dashboard
read it through :func:`read_status`, which also notices a run whose process died without saying so and
infers a state for runs that predate the file.
"""

from __future__ import annotations

import datetime as _dt
import os
import socket
import time

from fedbrain.runs import RunDir, read_json, write_json

STARTING, RUNNING, FINISHED, FAILED, STOPPED = "starting", "running", "finished", "failed", "stopped"
LIVE_STATES = (STARTING, RUNNING)
STATES = (STARTING, RUNNING, FINISHED, FAILED, STOPPED)
UNKNOWN = "unknown"  # a folder without status.json and without results (older fedbrain, or not a job)
# plain symbols every terminal and default font has
BADGES = {STARTING: "…", RUNNING: "●", FINISHED: "✓", FAILED: "✗", STOPPED: "■", UNKNOWN: "?"}


def now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: it exists
        return True
    try:  # a zombie (exited, not yet reaped) is not running
        import psutil

        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except Exception:
        return True


class StatusWriter:
    """Keeps ``status.json`` of one run up to date (atomic writes; every update merges into the last)."""

    def __init__(self, run: RunDir, **fields):
        self.run = RunDir(run.root if isinstance(run, RunDir) else run)
        self._t0 = time.time()
        self.doc = {"state": STARTING, "started": now_iso(), "pid": os.getpid(), "host": socket.gethostname(),
                    "error": None, **fields}
        self._write()

    def _write(self) -> None:
        self.doc["updated"] = now_iso()
        self.doc["elapsed_s"] = round(time.time() - self._t0, 1)
        write_json(self.run.status, self.doc)

    def update(self, **fields) -> dict:
        self.doc.update(fields)
        self._write()
        return self.doc

    def progress(self, done: int, total: int, **fields) -> dict:
        """``done`` of ``total`` rounds (or epochs) finished: state running, with an ETA from the pace so far."""
        elapsed = time.time() - self._t0
        if done > 0:  # the pace is measured from the first finished round on (start-up excluded)
            self.doc.setdefault("_first_progress", [done, elapsed])
        first = self.doc.get("_first_progress") or [done, elapsed]
        eta = None
        if done > first[0] and total > done:
            eta = (elapsed - first[1]) / (done - first[0]) * (total - done)
        elif total and done >= total:
            eta = 0.0
        return self.update(**{"state": RUNNING, "done": done, "total": total,
                              "eta_s": None if eta is None else round(eta, 1), **fields})

    def finish(self, state: str, error: str | None = None, **fields) -> dict:
        if state not in (FINISHED, FAILED, STOPPED):
            raise ValueError(f"not a final state: {state!r}")
        self.doc.pop("_first_progress", None)
        self.doc.pop("phase", None)
        return self.update(state=state, error=error, finished=now_iso(), eta_s=None, **fields)


def from_controller(progress: dict) -> dict:
    """The ``status.json`` fields that the server controller's progress (``progress.json`` or the admin API's
    ``show_stats``, see :meth:`fedbrain.fl.controller.FedbrainController.progress`) gives: rounds done, the last
    finished round, each site's last contact."""
    out = {}
    if isinstance(progress.get("rounds_done"), int):
        out["done"] = progress["rounds_done"]
    if isinstance(progress.get("last_round"), int):
        out["round"] = progress["last_round"]
    sites = {s: dict(c) for s, c in (progress.get("sites") or {}).items() if isinstance(c, dict)}
    if sites:
        out["sites"] = sites
    return out


def read_status(run: RunDir | os.PathLike | str) -> dict:
    """The run's status, corrected for a dead process; for runs without ``status.json`` a state inferred from
    the files it left (``results.json``: finished). Never raises."""
    run = run if isinstance(run, RunDir) else RunDir(run)
    doc = read_json(run.status)
    if not isinstance(doc, dict) or doc.get("state") not in STATES:
        state = FINISHED if run.results.is_file() or run.compare_json.is_file() else UNKNOWN
        return {"state": state, "inferred": True}
    doc = {k: v for k, v in doc.items() if not k.startswith("_")}
    pid = doc.get("pid")
    if doc["state"] in LIVE_STATES and isinstance(pid, int) and doc.get("host") == socket.gethostname() \
            and not _pid_alive(pid):
        doc.update(state=FAILED, error=doc.get("error") or f"the process (pid {pid}) ended without finishing "
                   "the run (killed, or the machine restarted); `fedbrain simulate --resume RUN` continues it")
    if run.stop_request.is_file() and doc["state"] in LIVE_STATES:
        doc["stop_requested"] = True
    return doc


def progress_text(status: dict) -> str:
    """``running, 13 of 650 rounds done (last: round 12), ETA 4 min 10 s``: the same words in the CLI and the
    dashboard. Rounds are numbered from 0, as NVFlare does, in every file, table and chart; ``done`` counts."""
    state = status.get("state", UNKNOWN)
    done, total = status.get("done"), status.get("total")
    unit = status.get("unit", "round")
    parts = [state]
    if isinstance(done, int) and isinstance(total, int) and total:
        last = status.get("round")
        parts.append(f"{done} of {total} {unit}s done" + (f" (last: {unit} {last})" if isinstance(last, int) else ""))
    eta = status.get("eta_s")
    if state in LIVE_STATES and isinstance(eta, (int, float)):
        parts.append(f"ETA {format_seconds(eta)}")
    if status.get("stop_requested"):
        parts.append("stop requested")
    if state in LIVE_STATES and status.get("phase"):
        parts.append(str(status["phase"]))
    return ", ".join(parts)


def format_seconds(s: float) -> str:
    s = int(round(s))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {s % 3600 // 60:02d} min"


HEADLINE_KEYS = ("macro_f1", "tumour_auroc", "no_tumor_recall", "n")


def headline_of(union: dict | None) -> dict | None:
    """The headline numbers of a finished run's union metrics, as ``status.json`` keeps them."""
    out = {k: v for k, v in (union or {}).items() if k in HEADLINE_KEYS}
    return out or None


def request_stop(run: RunDir, reason: str = "fedbrain runs stop") -> None:
    """Ask a running job to stop after its current round (the server checks the file every round)."""
    write_json(run.stop_request, {"requested": now_iso(), "by": reason})


__all__ = ["StatusWriter", "read_status", "headline_of", "from_controller", "now_iso", "progress_text",
           "request_stop", "format_seconds", "STATES", "LIVE_STATES", "BADGES", "STARTING", "RUNNING", "FINISHED",
           "FAILED", "STOPPED", "UNKNOWN"]
