"""The site's Client API executor: NVFlare's in-process ClientAPIExecutor with a short result poll.

NVFlare 2.9's in-process backend polls for the trainer's result, and the trainer for its next task, every
0.5 s (a module constant with no setting). fedbrain's rounds are short (one local step under the default
levers), so those sleeps were most of a round: about 1.3 s per round on the embedded demo. This executor
sets the poll to ``POLL_INTERVAL_S`` in the site's process before the backend starts.
"""

from __future__ import annotations

from nvflare.app_common.executors.client_api_executor import ClientAPIExecutor

POLL_INTERVAL_S = 0.01


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


class FedbrainClientAPIExecutor(ClientAPIExecutor):
    """ClientAPIExecutor with the short result poll (see the module docstring)."""

    def __init__(self, *args, **kwargs):
        shorten_result_poll()
        super().__init__(*args, **kwargs)
