"""Server-side aggregation that trusts nothing a site sends: validated weights, float64 sums, finite results.

Every update is checked against the server's own global model (names, shapes, finite values) and its
weight (a site's step or sample count) must be a finite positive number within bounds; a rejected update
is logged and left out, and the round goes on. Sums run in float64 and an aggregate that is not finite
leaves the global model unchanged. BatchNorm running statistics are pooled as moments (mean and E[x²]
weighted by samples), so the global statistics are those of the pooled data. SCAFFOLD's control-variate
differences go through the same checks. Each round's per-site weight share and update norm is written
to ``server_rounds.jsonl`` and each received update's structure (never its values) to the audit file.
"""

from __future__ import annotations

import json
import math

import numpy as np
from nvflare.app_common.abstract.fl_model import FLMetaKey, FLModel, ParamsType
from nvflare.app_common.aggregators.model_aggregator import ModelAggregator
from nvflare.app_common.app_constant import AlgorithmConstants

from fedbrain.calibration import PREFIX as CALIBRATION_SUMS
from fedbrain.fl.metrics import COUNT_PREFIX, NUM_SAMPLES, SECURE_META, pooled_validation, site_counts

WEIGHTINGS = ("steps", "samples", "equal")
MAX_WEIGHT = 1e9  # a step or sample count above this is not a real site's


def as_array(v) -> np.ndarray:
    return np.asarray(v.detach().cpu() if hasattr(v, "detach") else v)


def check_update(params: dict, reference: dict[str, tuple] | None) -> str | None:
    """Why an update must be rejected, or None when it is usable (``reference``: name -> shape)."""
    if not params:
        return "empty update"
    if reference is not None:
        missing, extra = set(reference) - set(params), set(params) - set(reference)
        if missing or extra:
            return f"keys differ (missing {sorted(missing)[:3]}, unexpected {sorted(extra)[:3]})"
    for k, v in params.items():
        try:
            arr = as_array(v)
        except Exception as exc:  # not an array at all
            return f"{k} is not an array ({type(exc).__name__})"
        if reference is not None and tuple(arr.shape) != tuple(reference[k]):
            return f"shape of {k} is {tuple(arr.shape)}, expected {tuple(reference[k])}"
        if arr.dtype.kind not in "fiub":
            return f"{k} has dtype {arr.dtype}, not a number"
        if arr.dtype.kind == "f" and not np.isfinite(arr).all():
            return f"non-finite values in {k}"
    return None


def check_weight(value) -> tuple[float | None, str | None]:
    """A site's reported count as an aggregation weight, or the reason it is unusable."""
    if value is None:
        return None, "no weight (step or sample count) reported"
    if isinstance(value, bool):
        return None, f"weight {value!r} is not a number"
    try:
        w = float(value)
    except (TypeError, ValueError, OverflowError):
        return None, f"weight {value!r} is not a number"
    if not math.isfinite(w):
        return None, f"weight {w} is not finite"
    if w <= 0:
        return None, f"weight {w} is not positive"
    if w > MAX_WEIGHT:
        return None, f"weight {w:g} exceeds {MAX_WEIGHT:g}"
    return w, None


def budget_spent(meta: dict) -> bool:
    """Whether a site says it sent no update because its DP-SGD budget is spent (0 steps)."""
    return meta.get("dp_budget_spent") is True and meta.get(FLMetaKey.NUM_STEPS_CURRENT_ROUND) == 0


def describe_update(model: FLModel) -> dict:
    """What a site sent, structurally: parameter names/dtypes/shapes, metric and meta names and value types."""

    def kind(v) -> str:
        if hasattr(v, "dtype") and hasattr(v, "shape"):
            return f"array:{str(v.dtype).replace('torch.', '')}:{list(v.shape)}"
        if isinstance(v, dict):
            return "dict:" + ",".join(sorted(kind(x) for x in v.values())[:1])
        return type(v).__name__

    return {
        "params": {k: kind(v) for k, v in (model.params or {}).items()},
        "metrics": {k: kind(v) for k, v in (model.metrics or {}).items()},
        "meta": {k: kind(v) for k, v in (model.meta or {}).items()},
        "params_type": str(model.params_type),
    }


def _is_bn_stat(name: str) -> bool:
    return name.endswith("running_mean") or name.endswith("running_var")


class ValidatingAggregator(ModelAggregator):
    """Weighted averaging of validated site updates (see the module docstring).

    ``weighting``: ``steps`` (NVFlare's NUM_STEPS_CURRENT_ROUND), ``samples`` (the training images a site
    used this round: with the same local work at every site, the federated objective is the pooled one)
    or ``equal``. The controller sets :attr:`reference` (the global model sent this round) before each round.
    """

    def __init__(self, audit_file: str | None = None, weighting: str = "steps", rounds_file: str | None = None,
                 scaffold: bool = False, secure_sites: list[str] | None = None):
        super().__init__()
        # secure aggregation (fedbrain.secagg): every one of these sites sends a masked, sample-weighted update;
        # this aggregator only ever holds masked sums, and the mean exists once all of them are in
        self.secure_sites = sorted(secure_sites) if secure_sites else None
        if weighting not in WEIGHTINGS:
            raise ValueError(f"weighting must be one of {WEIGHTINGS}, not {weighting!r}")
        self.weighting = weighting
        self.audit_file = audit_file
        self.rounds_file = rounds_file
        self.scaffold = scaffold
        self.reference: dict | None = None  # name -> array of the global model this round started from
        self.rejected: list[dict] = []
        self.round: int | None = None
        self.counts: dict[str, list[int]] = {}  # training-label counts per accepted site, until taken
        self.reset_stats()

    def set_reference(self, params: dict | None, round_: int | None = None) -> None:
        self.reference = {k: as_array(v) for k, v in (params or {}).items()} or None
        self.round = round_

    def reset_stats(self) -> None:
        self._sum: dict[str, np.ndarray] = {}
        self._masked: dict[str, np.ndarray] = {}  # secure aggregation: the running sum mod 2^64 (still masked)
        self._ctrl_sum: dict[str, np.ndarray] = {}
        self._bn_sq: dict[str, np.ndarray] = {}
        self._total = 0.0
        self._samples = 0.0
        self._sites: list[dict] = []
        self._spent: list[str] = []  # sites that could not train this round: their DP budget is spent
        self._val_rows: list[dict] = []
        self._metric_sum: dict[str, float] = {}
        self.params_type = None

    def take_site_counts(self) -> dict[str, list[int]]:
        """The training-label counts the sites accepted since the last call reported (then forgotten)."""
        out, self.counts = self.counts, {}
        return out

    # -------------------------------------------------------------- accepting

    def _reason(self, model: FLModel) -> tuple[float | None, str | None]:
        shapes = {k: tuple(v.shape) for k, v in self.reference.items()} if self.reference else None
        if shapes is not None and self.secure_sites is not None:
            from fedbrain.secagg import CANARY, CANARY_SIZE

            shapes[CANARY] = (CANARY_SIZE,)  # every masked update carries the canary
        reason = check_update(model.params, shapes)
        if reason:
            return None, reason
        if model.params_type not in (None, ParamsType.FULL):
            return None, f"params_type {model.params_type} (fedbrain sites send full weights)"
        meta = model.meta or {}
        if self.secure_sites is not None and not meta.get(SECURE_META):
            return None, "not masked: this job aggregates securely"
        if self.secure_sites is not None and any(as_array(v).dtype != np.int64 for v in model.params.values()):
            return None, "a masked update must hold 64-bit integers"
        steps, why = check_weight(meta.get(FLMetaKey.NUM_STEPS_CURRENT_ROUND))
        if why:
            return None, f"step count: {why}"
        samples, why = check_weight(meta.get(NUM_SAMPLES, steps))
        if why:
            return None, f"sample count: {why}"
        if self.scaffold:
            diff = meta.get(AlgorithmConstants.SCAFFOLD_CTRL_DIFF)
            if not isinstance(diff, dict):
                return None, "SCAFFOLD update without control-variate differences"
            reason = check_update(diff, {k: s for k, s in (shapes or {}).items() if k in diff} if shapes else None)
            if reason:
                return None, f"SCAFFOLD control difference: {reason}"
        return {"steps": steps, "samples": samples, "equal": 1.0}[self.weighting], None

    def accept_model(self, model: FLModel) -> None:
        meta = model.meta or {}
        site = meta.get("client_name", "unknown site")
        rnd = model.current_round if model.current_round is not None else self.round
        weight, reason = self._reason(model)
        spent = reason is not None and budget_spent(meta)
        if self.audit_file:
            with open(self.audit_file, "a") as fh:
                fh.write(json.dumps({"site": site, "round": rnd, "rejected": None if spent else reason,
                                     **({"no_update": "privacy budget spent"} if spent else {}),
                                     **describe_update(model)}) + "\n")
        if spent:  # a site whose DP budget is spent sends no update
            self.info(f"{site} sent no update in round {rnd}: its privacy budget is spent")
            self._spent.append(site)
            self._val_rows.append(dict(model.metrics or {}))
            return
        if reason is not None:
            self.rejected.append({"site": site, "round": rnd, "reason": reason})
            self.error(f"rejected update from {site} in round {rnd}: {reason}")
            return
        samples = float(meta.get(NUM_SAMPLES, meta.get(FLMetaKey.NUM_STEPS_CURRENT_ROUND)))
        with np.errstate(over="ignore", invalid="ignore"):  # an overflow shows as a non-finite aggregate
            self._accumulate(model, meta, weight, samples, site)

    def _accumulate(self, model: FLModel, meta: dict, weight: float, samples: float, site: str) -> None:
        if self.secure_sites is not None:
            self._accumulate_masked(model, samples, site)
            return
        norm2 = 0.0
        for k, v in model.params.items():
            arr = as_array(v).astype(np.float64)
            if _is_bn_stat(k):  # moments: weighted by samples whatever the weighting
                self._add(self._sum, k, arr * samples)
                if k.endswith("running_mean"):
                    self._add(self._bn_sq, k, arr * arr * samples)
                continue
            self._add(self._sum, k, arr * weight)
            if self.reference is not None and k in self.reference and arr.dtype.kind == "f":
                norm2 += float(((arr - self.reference[k]) ** 2).sum())
        if self.scaffold:
            for k, v in meta[AlgorithmConstants.SCAFFOLD_CTRL_DIFF].items():
                self._add(self._ctrl_sum, k, as_array(v).astype(np.float64) * weight)
        for k, v in (model.metrics or {}).items():
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and k.startswith(
                    ("val_", "train_")) and not k.startswith(("val_cm_", "val_hist_", CALIBRATION_SUMS, COUNT_PREFIX)):
                self._metric_sum[k] = self._metric_sum.get(k, 0.0) + v * weight
        counts = site_counts(model.metrics or {})
        if counts is not None:
            self.counts[site] = counts
        self._val_rows.append(dict(model.metrics or {}))
        self._total += weight
        self._samples += samples
        norm = math.sqrt(norm2) if math.isfinite(norm2) else None
        self._sites.append({"site": site, "weight": weight, "samples": samples, "update_norm": norm,
                            "steps": float(meta.get(FLMetaKey.NUM_STEPS_CURRENT_ROUND))})
        self.params_type = model.params_type

    def _accumulate_masked(self, model: FLModel, samples: float, site: str) -> None:
        """Secure aggregation: add a masked update to the masked sum; only the clear scalars are kept per site."""
        from fedbrain.secagg import add_masked

        add_masked(self._masked, {k: as_array(v) for k, v in model.params.items()})
        for k, v in (model.metrics or {}).items():
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and k.startswith(
                    "val_") and not k.startswith(("val_cm_", "val_hist_", CALIBRATION_SUMS)):
                self._metric_sum[k] = self._metric_sum.get(k, 0.0) + v * samples
        counts = site_counts(model.metrics or {})
        if counts is not None:
            self.counts[site] = counts
        self._val_rows.append(dict(model.metrics or {}))
        self._total += samples  # the sites weighted their updates by their training images before masking
        self._samples += samples
        self._sites.append({"site": site, "weight": samples, "samples": samples, "update_norm": None,
                            "steps": float((model.meta or {}).get(FLMetaKey.NUM_STEPS_CURRENT_ROUND)),
                            "masked": True})
        self.params_type = model.params_type

    def _unmasked_mean(self) -> FLModel:
        """Secure aggregation: once every site is in, the masks cancel; the mean update joins the global model."""
        from fedbrain.secagg import SecureAggregationError, check_unmasked

        present = sorted(s["site"] for s in self._sites)
        if present != self.secure_sites:  # abandoned: the next round has a new number, so new masks
            missing = sorted(set(self.secure_sites) - set(present))
            return self._unchanged(f"secure aggregation needs every site's masked update; missing {missing}")
        try:
            sums = check_unmasked(self._masked, len(present))
        except SecureAggregationError as exc:
            return self._unchanged(str(exc))
        ref = self.reference or {}
        params = {}
        for k, total in sums.items():
            mean = total / self._total
            v = ref[k].astype(np.float64) + mean if k in ref else mean
            dtype = ref[k].dtype if k in ref else np.float32
            params[k] = (np.rint(v) if np.dtype(dtype).kind in "iub" else v).astype(dtype)
        if any(not np.isfinite(v).all() for v in params.values()):
            return self._unchanged("the unmasked aggregate is not finite")
        return self._finish(params, ParamsType.FULL, {"nr_accepted": len(present), "secure_aggregation": True},
                            "masked site update(s)")

    def _finish(self, params: dict, params_type, meta: dict, what: str = "site update(s)") -> FLModel:
        """The round's aggregate with its pooled validation metrics; logged, and the stats reset."""
        metrics = {k: v / self._total for k, v in self._metric_sum.items()}
        metrics.update(pooled_validation(self._val_rows))
        self._log_round(accepted=True)
        self.info(f"aggregated {len(self._sites)} {what}")
        self.reset_stats()
        return FLModel(params=params, params_type=params_type, metrics=metrics, meta=meta)

    @staticmethod
    def _add(acc: dict, k: str, v: np.ndarray) -> None:
        acc[k] = acc[k] + v if k in acc else v.copy()

    # -------------------------------------------------------------- aggregating

    def _unchanged(self, why: str) -> FLModel:
        self.error(f"round {self.round}: {why}; the global model stays unchanged")
        params = dict(self.reference or {})
        self._log_round(accepted=False, why=why)
        self.reset_stats()
        return FLModel(params=params, params_type=ParamsType.FULL, metrics=None, meta={"unchanged": why})

    def refused(self, site: str, why: str) -> None:
        """A site that refused to mask this round (secure aggregation): logged; the round then misses it."""
        self.rejected.append({"site": site, "round": self.round, "reason": f"the site refused: {why}"})
        self.error(f"{site} sent no update in round {self.round}: {why}")

    def aggregate_model(self) -> FLModel:
        with np.errstate(over="ignore", invalid="ignore"):
            return self._aggregate()

    def _aggregate(self) -> FLModel:
        if self.secure_sites is not None and (self._sites or self.reference is not None):
            return self._unmasked_mean()
        if not self._sites and self._spent and self.reference is not None:
            return self._unchanged(f"no site can train any more: the privacy budget of {sorted(self._spent)} is spent")
        if not self._sites:
            if self.reference is None:
                raise RuntimeError("no valid site update this round: every update was rejected")
            return self._unchanged("no valid site update this round (every update was rejected)")
        out: dict[str, np.ndarray] = {}
        for k, acc in self._sum.items():
            if _is_bn_stat(k):
                continue
            out[k] = acc / self._total
        for k, acc in self._sum.items():  # pooled moments of the BatchNorm statistics
            if k.endswith("running_mean"):
                mean = acc / self._samples
                out[k] = mean
                kv = k[: -len("running_mean")] + "running_var"
                if kv in self._sum:
                    ex2 = (self._sum[kv] + self._bn_sq[k]) / self._samples
                    out[kv] = np.maximum(ex2 - mean * mean, 0.0)
            elif k.endswith("running_var") and k[: -len("running_var")] + "running_mean" not in self._sum:
                out[k] = acc / self._samples
        bad = [k for k, v in out.items() if not np.isfinite(v).all()]
        if bad:
            return self._unchanged(f"the aggregate is not finite in {bad[:3]}")
        ref_dtypes = {k: v.dtype for k, v in (self.reference or {}).items()}
        params = {}
        for k, v in out.items():
            dtype = ref_dtypes.get(k, np.float32)
            if np.dtype(dtype).kind in "iub":
                v = np.rint(v)
            params[k] = v.astype(dtype)
        meta = {"nr_accepted": len(self._sites)}
        if self.scaffold:
            meta[AlgorithmConstants.SCAFFOLD_CTRL_DIFF] = {
                k: (acc / self._total).astype(ref_dtypes.get(k, np.float32)) for k, acc in self._ctrl_sum.items()}
            if any(not np.isfinite(v).all() for v in meta[AlgorithmConstants.SCAFFOLD_CTRL_DIFF].values()):
                return self._unchanged("the SCAFFOLD control aggregate is not finite")
        return self._finish(params, self.params_type or ParamsType.FULL, meta)

    def _log_round(self, accepted: bool, why: str | None = None) -> None:
        if not self.rounds_file:
            return
        total = sum(s["weight"] for s in self._sites) or 1.0
        with open(self.rounds_file, "a") as fh:
            for s in self._sites:
                fh.write(json.dumps({"round": self.round, **s, "weight_share": s["weight"] / total,
                                     "weighting": self.weighting, "aggregated": accepted}) + "\n")
            if why:
                fh.write(json.dumps({"round": self.round, "site": "server", "aggregated": False, "why": why}) + "\n")
