"""Server-side weighted averaging that rejects broken site updates (NaN/Inf, wrong keys or shapes)."""

from __future__ import annotations

import numpy as np
from nvflare.app_common.abstract.fl_model import FLMetaKey, FLModel
from nvflare.app_common.aggregators.model_aggregator import ModelAggregator
from nvflare.app_common.aggregators.weighted_aggregation_helper import WeightedAggregationHelper


def check_update(params: dict, reference: dict | None) -> str | None:
    """Why an update must be rejected, or None when it is usable."""
    if not params:
        return "empty update"
    if reference is not None:
        missing, extra = set(reference) - set(params), set(params) - set(reference)
        if missing or extra:
            return f"keys differ (missing {sorted(missing)[:3]}, unexpected {sorted(extra)[:3]})"
    for k, v in params.items():
        arr = np.asarray(v.detach().cpu() if hasattr(v, "detach") else v)
        if reference is not None and tuple(arr.shape) != tuple(reference[k]):
            return f"shape of {k} is {tuple(arr.shape)}, expected {tuple(reference[k])}"
        if arr.dtype.kind == "f" and not np.isfinite(arr).all():
            return f"non-finite values in {k}"
    return None


def describe_update(model: FLModel) -> dict:
    """What a site sent, structurally: parameter names/dtypes/shapes, metric and meta names and value types."""

    def kind(v) -> str:
        if hasattr(v, "dtype") and hasattr(v, "shape"):
            return f"array:{str(v.dtype).replace('torch.', '')}:{list(v.shape)}"
        return type(v).__name__

    return {
        "params": {k: kind(v) for k, v in (model.params or {}).items()},
        "metrics": {k: kind(v) for k, v in (model.metrics or {}).items()},
        "meta": {k: kind(v) for k, v in (model.meta or {}).items()},
        "params_type": str(model.params_type),
    }


class ValidatingAggregator(ModelAggregator):
    """FedAvg weighted by local steps (or every site alike); invalid updates are logged and left out.

    ``audit_file`` (optional, server-local) gets one JSON line per received update describing its
    structure (never its values), so an operator can verify that only weights, counts and scalar
    metrics arrive. ``site_weighting="equal"`` gives every accepted site the same weight, so a large
    hospital cannot drown out the classes only the small ones have.
    """

    WEIGHTINGS = ("steps", "equal")

    def __init__(self, audit_file: str | None = None, site_weighting: str = "steps"):
        super().__init__()
        if site_weighting not in self.WEIGHTINGS:
            raise ValueError(f"site_weighting must be one of {self.WEIGHTINGS}, not {site_weighting!r}")
        self.site_weighting = site_weighting
        self.audit_file = audit_file
        self.reference_shapes: dict | None = None
        self.rejected: list[dict] = []
        self.reset_stats()

    def reset_stats(self):
        self.params = WeightedAggregationHelper()
        self.metrics = WeightedAggregationHelper()
        self.accepted = 0
        self.params_type = None

    def accept_model(self, model: FLModel) -> None:
        site = (model.meta or {}).get("client_name", "unknown site")
        rnd = model.current_round
        reason = check_update(model.params, self.reference_shapes)
        if self.audit_file:
            import json

            with open(self.audit_file, "a") as fh:
                fh.write(json.dumps({"site": site, "round": rnd, "rejected": reason, **describe_update(model)}) + "\n")
        if reason is not None:
            self.rejected.append({"site": site, "round": rnd, "reason": reason})
            self.error(f"rejected update from {site} in round {rnd}: {reason}")
            return
        if self.reference_shapes is None:
            self.reference_shapes = {k: tuple(np.shape(v)) for k, v in model.params.items()}
        weight = 1.0
        if self.site_weighting == "steps":
            weight = float((model.meta or {}).get(FLMetaKey.NUM_STEPS_CURRENT_ROUND, 1.0))
        self.params.add(data=model.params, weight=weight, contributor_name=site, contribution_round=rnd)
        if model.metrics:
            finite = {k: v for k, v in model.metrics.items()
                      if isinstance(v, (int, float)) and np.isfinite(v)}
            self.metrics.add(data=finite, weight=weight, contributor_name=site, contribution_round=rnd)
        self.params_type = model.params_type
        self.accepted += 1

    def aggregate_model(self) -> FLModel:
        if self.accepted == 0:
            raise RuntimeError("no valid site update this round: every update was rejected")
        out = FLModel(params=self.params.get_result(), params_type=self.params_type,
                      metrics=self.metrics.get_result() if self.metrics.get_len() else None)
        self.info(f"aggregated {self.accepted} site update(s)")
        self.reset_stats()
        return out
