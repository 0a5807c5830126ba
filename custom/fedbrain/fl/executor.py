"""The site's Client API executor: NVFlare's in-process ClientAPIExecutor that runs fedbrain as installed at the
hospital, with a short result poll.

A fedbrain job carries configuration only: its ``task_script_path`` names the module ``fedbrain.fl.site``, which
this executor resolves at the site to the installed (version-pinned) file, never to code in the job's
``custom/`` folder. The job also names the fedbrain version it was built with; a site whose installed version
differs refuses the job. The site script is told the site's workspace and the job's ``custom/`` folder
(``--site-workspace``, ``--job-custom``, appended after the job's own arguments, so they win).

NVFlare 2.9's in-process backend polls for the trainer's result, and the trainer for its next task, every
0.5 s (a module constant with no setting). fedbrain's rounds are short (one local step under the default
levers), so those sleeps were most of a round: about 1.3 s per round on the embedded demo. This executor
sets the poll to ``POLL_INTERVAL_S`` in the site's process before the backend starts.
"""

from __future__ import annotations

import importlib.util

from nvflare.apis.event_type import EventType
from nvflare.apis.fl_context import FLContext
from nvflare.app_common.executors.client_api_executor import ClientAPIExecutor

POLL_INTERVAL_S = 0.01
SITE_MODULE = "fedbrain.fl.site"  # the installed site script every fedbrain job runs


class JobRefused(RuntimeError):
    """A job this site will not run as it asks (another fedbrain version, code instead of a module name)."""


def shorten_result_poll(interval: float = POLL_INTERVAL_S) -> bool:
    """Set NVFlare's in-process result poll; False where this NVFlare has no such constant."""
    try:
        from nvflare.app_common.executors.client_api import in_process_backend
    except ImportError:
        return False
    if not hasattr(in_process_backend, "_RESULT_POLL_INTERVAL"):
        return False
    in_process_backend._RESULT_POLL_INTERVAL = interval
    return True


def installed_site_script(module: str, job_version: str) -> str:
    """The installed file of ``module`` (a fedbrain module name, not a path), after checking that the job was
    built for the installed fedbrain version."""
    import fedbrain

    if job_version != fedbrain.__version__:
        raise JobRefused(f"the job was built for fedbrain {job_version or '(unstated)'} and this site runs fedbrain "
                         f"{fedbrain.__version__}: refused (the site runs its installed, pinned fedbrain only)")
    if module != SITE_MODULE:
        raise JobRefused(f"the job asks to run {module!r}; this site runs only its installed {SITE_MODULE}")
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.origin:
        raise JobRefused(f"{module} is not installed at this site")
    return spec.origin


def _no_space(path: str) -> str:
    if any(c.isspace() for c in path):
        raise JobRefused(f"{path!r}: NVFlare cannot pass paths containing whitespace to the site script")
    return path


class FedbrainClientAPIExecutor(ClientAPIExecutor):
    """ClientAPIExecutor that runs the installed site module (see the module docstring)."""

    def __init__(self, *args, fedbrain_version: str = "", **kwargs):
        shorten_result_poll()
        super().__init__(*args, **kwargs)
        self._fedbrain_version = fedbrain_version

    def handle_event(self, event_type: str, fl_ctx: FLContext):
        if event_type == EventType.START_RUN:
            try:
                self._task_script_path = installed_site_script(self._task_script_path or "", self._fedbrain_version)
                workspace = fl_ctx.get_engine().get_workspace()
                custom = workspace.get_app_custom_dir(fl_ctx.get_job_id())
                self._task_script_args = " ".join(filter(None, (
                    self._task_script_args, "--site-workspace", _no_space(str(workspace.get_root_dir())),
                    "--job-custom", _no_space(str(custom)))))
            except JobRefused as exc:
                self.system_panic(f"{fl_ctx.get_identity_name()}: {exc}", fl_ctx)
                return
        super().handle_event(event_type, fl_ctx)


__all__ = ["FedbrainClientAPIExecutor", "SITE_MODULE", "JobRefused", "installed_site_script", "shorten_result_poll"]
