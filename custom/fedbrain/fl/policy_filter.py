"""The site's privacy policy as an NVFlare task-result filter: configured in the site's own ``local/privacy.json``
(written by ``fedbrain provision``), it sees every result of every job before it leaves the site, whatever the
job's code does.

Under a policy that requires record-level DP, a training result must carry DP-SGD accounting within the budget
(else it is refused: NVFlare sends a filter error instead of the result), and the scalars computed from training
images (training loss, training-image histograms) are removed from every result. A policy without DP passes
everything through unchanged.
"""

from __future__ import annotations

import re
from pathlib import Path

from nvflare.apis.dxo import DataKind, MetaKey, from_shareable
from nvflare.apis.filter import Filter
from nvflare.apis.fl_constant import FLContextKey, ReturnCode
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable

from fedbrain.fl.policy import POLICY_FILE, SitePolicy, check_outgoing
from fedbrain.secagg import PUBLIC_KEYS, REFUSED

TRAINING_SCALARS = re.compile(r"^(train_loss$|profile_)")  # computed from training images, beyond the counts
UNCHECKED_TASKS = ("submit_model", "validate")  # results that are not a new training update
PRIVACY_JSON = {"scopes": [{"name": "fedbrain", "properties": {},
                            "task_result_filters": [{"path": "fedbrain.fl.policy_filter.SitePolicyFilter",
                                                     "args": {"policy_file": f"local/{POLICY_FILE}"}}]}],
                "default_scope": "fedbrain"}  # the site's local/privacy.json


class SitePolicyFilter(Filter):
    """See the module docstring. ``policy_file``: relative paths are taken from the site's workspace root;
    ``{site}`` in it is this site's name (one privacy.json for the simulator's sites, each with its own file)."""

    def __init__(self, policy_file: str = f"local/{POLICY_FILE}"):
        super().__init__()
        self.policy_file = policy_file

    def _policy(self, fl_ctx: FLContext | None) -> SitePolicy:
        site = fl_ctx.get_identity_name() if fl_ctx is not None else ""
        path = Path(self.policy_file.replace("{site}", site or ""))
        if not path.is_absolute():
            engine = fl_ctx.get_engine() if fl_ctx is not None else None
            workspace = engine.get_workspace() if engine is not None and hasattr(engine, "get_workspace") else None
            path = Path(workspace.get_root_dir()) / path if workspace is not None else path
        return SitePolicy.read(path) if path.is_file() else SitePolicy()  # re-read: the admin's edits apply

    def process(self, shareable: Shareable, fl_ctx: FLContext) -> Shareable:
        policy = self._policy(fl_ctx)
        if not policy.requires_dp or shareable.get_return_code(ReturnCode.OK) != ReturnCode.OK:
            return shareable
        try:
            dxo = from_shareable(shareable)
        except ValueError:  # not a DXO: nothing of fedbrain's
            return shareable
        task = fl_ctx.get_prop(FLContextKey.TASK_NAME) if fl_ctx is not None else None
        if dxo.data_kind == DataKind.METRICS:
            dxo.data = {k: v for k, v in (dxo.data or {}).items() if not TRAINING_SCALARS.match(k)}
            return dxo.update_shareable(shareable)
        key_exchange = not dxo.data and (PUBLIC_KEYS in dxo.meta or REFUSED in dxo.meta)  # no weights at all
        if task not in UNCHECKED_TASKS and not key_exchange:
            check_outgoing(policy, dxo.meta)  # raises: NVFlare then sends a filter error, not the result
        metrics = dxo.meta.get(MetaKey.INITIAL_METRICS)
        if isinstance(metrics, dict):
            dxo.meta[MetaKey.INITIAL_METRICS] = {k: v for k, v in metrics.items() if not TRAINING_SCALARS.match(k)}
        return dxo.update_shareable(shareable)


__all__ = ["SitePolicyFilter", "PRIVACY_JSON", "TRAINING_SCALARS"]
