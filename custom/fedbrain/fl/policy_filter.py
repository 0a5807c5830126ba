"""The site's privacy policy as an NVFlare task-result filter: configured in the site's own ``local/privacy.json``
(written by ``fedbrain provision``), it sees every result of every job before it leaves the site, whatever the
job's code does.

Under a policy that requires record-level DP the filter decides from what is actually released, not from labels:

* a result that is not a DXO is refused;
* a model (weights or a weight difference) leaves only if its digest is in the site's release ledger, where the
  site's own DP mechanism recorded every update it produced (:class:`fedbrain.dp.SiteLedger`); a training result
  must also carry DP-SGD accounting within the budget;
* metrics and meta may hold scalars only: an array of more than ``MAX_ARRAY`` numbers, or more than
  ``MAX_NUMBERS`` numbers in all, is refused (weights sent as METRICS);
* the scalars computed from training images (training loss, training-image histograms) are removed.

A refusal raises: NVFlare then sends a filter error instead of the result. A policy without DP passes everything.
"""

from __future__ import annotations

import re
from pathlib import Path

from nvflare.apis.dxo import DataKind, MetaKey, from_shareable
from nvflare.apis.filter import Filter
from nvflare.apis.fl_constant import FLContextKey, ReturnCode
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable

from fedbrain.fl.policy import POLICY_FILE, PolicyError, SitePolicy, check_outgoing
from fedbrain.fl.privacy import weights_digest
from fedbrain.secagg import PUBLIC_KEYS, REFUSED

TRAINING_SCALARS = re.compile(r"^(train_loss$|profile_)")  # computed from training images, beyond the counts
UNCHECKED_TASKS = ("submit_model", "validate")  # results that are not a new training update
MAX_ARRAY = 16  # the most numbers one metric or meta value may hold under DP (a confusion matrix row, not a layer)
MAX_NUMBERS = 4096  # the most numbers a result's metrics and meta may hold in all (fedbrain's: a few hundred)
PRIVACY_JSON = {"scopes": [{"name": "fedbrain", "properties": {},
                            "task_result_filters": [{"path": "fedbrain.fl.policy_filter.SitePolicyFilter",
                                                     "args": {"policy_file": f"local/{POLICY_FILE}"}}]}],
                "default_scope": "fedbrain"}  # the site's local/privacy.json


def count_numbers(value, where: str = "") -> int:
    """How many numbers ``value`` holds (nested dicts and lists, arrays, tensors); raise PolicyError on an array
    longer than ``MAX_ARRAY``."""
    if value is None or isinstance(value, (str, bytes, bool, int, float)):
        return int(isinstance(value, (int, float)))
    if isinstance(value, dict):
        return sum(count_numbers(v, f"{where}.{k}") for k, v in value.items())
    size = getattr(value, "size", None)
    n = (value.numel() if hasattr(value, "numel") else int(size) if isinstance(size, int)
         else sum(count_numbers(v, where) for v in value) if isinstance(value, (list, tuple)) else 1)
    if n > MAX_ARRAY:
        raise PolicyError(f"a result carries an array of {n} numbers in {where.lstrip('.') or 'its data'}: under "
                          "this site's DP policy only scalars leave as metrics; it is not sent")
    return n


def check_scalars(*parts) -> None:
    """Refuse metrics / meta that could carry a model: long arrays, or too many numbers in all."""
    total = sum(count_numbers(p) for p in parts)
    if total > MAX_NUMBERS:
        raise PolicyError(f"a result carries {total} numbers as metrics (at most {MAX_NUMBERS} under this site's DP "
                          "policy): it is not sent")


class SitePolicyFilter(Filter):
    """See the module docstring. ``policy_file``: relative paths are taken from the site's workspace root;
    ``{site}`` in it is this site's name (one privacy.json for the simulator's sites, each with its own file)."""

    def __init__(self, policy_file: str = f"local/{POLICY_FILE}"):
        super().__init__()
        self.policy_file = policy_file

    def _policy(self, fl_ctx: FLContext | None, site: str) -> SitePolicy:
        path = Path(self.policy_file.replace("{site}", site or ""))
        if not path.is_absolute():
            engine = fl_ctx.get_engine() if fl_ctx is not None else None
            workspace = engine.get_workspace() if engine is not None and hasattr(engine, "get_workspace") else None
            path = Path(workspace.get_root_dir()) / path if workspace is not None else path
        return SitePolicy.read(path) if path.is_file() else SitePolicy()  # re-read: the admin's edits apply

    def process(self, shareable: Shareable, fl_ctx: FLContext) -> Shareable:
        site = (fl_ctx.get_identity_name() if fl_ctx is not None else "") or ""
        policy = self._policy(fl_ctx, site)
        if not policy.requires_dp or shareable.get_return_code(ReturnCode.OK) != ReturnCode.OK:
            return shareable
        try:
            dxo = from_shareable(shareable)
        except Exception as exc:  # noqa: BLE001 - whatever it is, it is not a result fedbrain's code made
            raise PolicyError(f"a result that is not a DXO ({type(exc).__name__}): this site's DP policy sends "
                              "only what it can check; it is not sent") from exc
        if dxo.data_kind == DataKind.METRICS:
            check_scalars(dxo.data, dxo.meta)
            dxo.data = {k: v for k, v in (dxo.data or {}).items() if not TRAINING_SCALARS.match(k)}
            return dxo.update_shareable(shareable)
        if dxo.data_kind not in (DataKind.WEIGHTS, DataKind.WEIGHT_DIFF):
            raise PolicyError(f"a {dxo.data_kind} result: this site's DP policy sends only models its DP mechanism "
                              "made and scalar metrics; it is not sent")
        check_scalars(dxo.meta)
        if not dxo.data and (PUBLIC_KEYS in dxo.meta or REFUSED in dxo.meta):
            return shareable  # secure aggregation's key exchange or a refusal: no weights at all
        task = fl_ctx.get_prop(FLContextKey.TASK_NAME) if fl_ctx is not None else None
        if task not in UNCHECKED_TASKS:
            check_outgoing(policy, dxo.meta)
        ledger = policy.ledger(site)
        if ledger is None or not ledger.released(weights_digest(dxo.data or {})):
            raise PolicyError(f"{site}: these weights are not an update this site's DP mechanism produced (not in "
                              f"its release ledger {ledger.releases if ledger else '(none)'}): they are not sent")
        metrics = dxo.meta.get(MetaKey.INITIAL_METRICS)
        if isinstance(metrics, dict):
            dxo.meta[MetaKey.INITIAL_METRICS] = {k: v for k, v in metrics.items() if not TRAINING_SCALARS.match(k)}
        return dxo.update_shareable(shareable)


__all__ = ["SitePolicyFilter", "PRIVACY_JSON", "TRAINING_SCALARS", "count_numbers", "check_scalars"]
