"""fedbrain's server workflow: NVFlare's FedAvg loop, made fault tolerant, resumable and SCAFFOLD-capable.

One controller serves FedAvg, FedProx and SCAFFOLD:

- each round goes to every connected site and closes once all answered, or once ``min_responses`` did and
  ``wait_after_min_s`` more seconds passed (a dead or disconnected site misses the round);
- the validating aggregator checks every update against the global model sent this round;
- after every round the global model (and SCAFFOLD's global control variates) is written to
  ``checkpoint_dir/round-NNNN.pt`` (the newest two are kept), so a run killed at any point resumes from its
  last finished round;
- the best global model by the *pooled* validation score (the sites' summed validation counts, see
  :mod:`fedbrain.fl.metrics`) is written to ``checkpoint_dir/best.pt``;
- SCAFFOLD: the global control variates go out with the model and are updated from the validated,
  aggregated control differences (scaled by the share of sites that answered);
- ``checkpoint_dir/progress.json`` says, after every round, which round finished, out of how many, when each
  site last answered, the pooled validation of every round (the run log's global rows), and whether the job
  stops early: a ``stop_file`` (``fedbrain runs stop``) ends the job
  after the round in flight, keeping every model written so far.
"""

from __future__ import annotations

import json
import math
import os

import numpy as np
from nvflare.app_common.abstract.fl_model import FLModel
from nvflare.app_common.app_constant import AlgorithmConstants
from nvflare.app_common.workflows.fedavg import FedAvg, _get_client_name

from fedbrain.fl.metrics import CLASS_COUNTS, NUM_SITES, POOLED_VAL, cosine_scale, pooled_row
from fedbrain.runs import ROUND_FILE, ROUNDS_BEST, ROUNDS_PROGRESS
from fedbrain.status import now_iso

PROGRESS_GROUP = "fedbrain"  # the admin API's show_stats group holding progress()
KEEP_ROUND_FILES = 2  # the newest round files kept (written atomically: the newest alone is enough to resume)


def save_round(path: str, params: dict, round_: int, extra: dict | None = None) -> None:
    """Atomically write ``{"model": tensors, "round": r, ...}`` (loadable with ``weights_only=True``)."""
    import torch

    def tensors(d: dict) -> dict:
        return {k: torch.as_tensor(np.asarray(v.detach().cpu() if hasattr(v, "detach") else v)) for k, v in d.items()}

    payload = {"model": tensors(params), "round": int(round_)}
    for k, v in (extra or {}).items():
        payload[k] = tensors(v) if k == "scaffold_control" else v
    tmp = path + ".tmp"
    torch.save(payload, tmp)
    os.replace(tmp, path)


class FedbrainController(FedAvg):
    """See the module docstring. ``num_sites``: the job's sites (for SCAFFOLD's control-variate scaling)."""

    def __init__(self, *args, min_responses: int = 0, wait_after_min_s: int = 60, checkpoint_dir: str = "",
                 scaffold: bool = False, num_sites: int = 0, initial_control: str = "", server_lr: float = 1.0,
                 server_momentum: float = 0.0, server_optimizer: str = "sgd", server_eps: float = 1e-6,
                 server_cosine: bool = False, server_bn_momentum: float | None = None, stop_file: str = "",
                 **kwargs):
        super().__init__(*args, **kwargs)
        self.stop_file = stop_file
        self._contacts: dict[str, dict] = {}  # site -> {"last_contact": iso time, "last_round": r}
        self._stopped_early = False
        self._last_finished: int | None = None  # the last round whose global model was written
        self.server_lr = server_lr
        self.server_momentum = server_momentum
        self.server_optimizer = server_optimizer
        self.server_eps = server_eps
        self.server_cosine = server_cosine
        self.server_bn_momentum = server_bn_momentum
        self._velocity: dict | None = None
        self._second: dict = {}
        self._steps = 0
        self._class_counts: dict[str, list[int]] = {}  # latest training-label counts per site
        self.min_responses = min_responses
        self.wait_after_min_s = wait_after_min_s
        self.checkpoint_dir = checkpoint_dir
        self.scaffold = scaffold
        self.num_sites = num_sites
        self.initial_control = initial_control
        self._global_ctrl: dict | None = None
        self._best_score = -math.inf
        self._pooled_val: dict[str, dict] = {}  # round -> the pooled validation of the model sent that round

    # -------------------------------------------------------------- where round files go

    def _dir(self) -> str:
        d = self.checkpoint_dir or os.path.join(self.get_run_dir(), "rounds")
        os.makedirs(d, exist_ok=True)
        return d

    # -------------------------------------------------------------- sending

    def sample_clients(self, num_clients: int | None = None) -> list[str]:
        if self.min_responses:
            return super().sample_clients(None)  # every connected site, not a sample of them
        return super().sample_clients(num_clients)

    def send_model(self, task_name="train", data=None, targets=None, min_responses=None, timeout=0, callback=None):
        agg = self.aggregator
        if agg is not None and data is not None and hasattr(agg, "set_reference"):
            agg.set_reference(data.params, self.current_round)
            # a deployed server keeps its audit and round log in its own job folder
            if getattr(agg, "audit_file", "") is None:
                agg.audit_file = os.path.join(self.get_run_dir(), "server_audit.jsonl")
            if getattr(agg, "rounds_file", "") is None:
                agg.rounds_file = os.path.join(self.get_run_dir(), "server_rounds.jsonl")
        if data is not None:
            data.meta = data.meta or {}
            data.meta[NUM_SITES] = self.num_sites
        if data is not None and self._class_counts:  # the federation's pooled label counts (class_balance)
            data.meta[CLASS_COUNTS] = [float(sum(c[k] for c in self._class_counts.values()))
                                       for k in range(len(next(iter(self._class_counts.values()))))]
        if self.scaffold and data is not None:
            if self._global_ctrl is None:
                self._global_ctrl = self._load_control(data.params)
            data.meta = data.meta or {}
            data.meta[AlgorithmConstants.SCAFFOLD_CTRL_GLOBAL] = self._global_ctrl
        self._sent = data
        self.broadcast_model(task_name=task_name, data=data, targets=targets,
                             min_responses=self.min_responses or min_responses, timeout=timeout,
                             wait_time_after_min_received=self.wait_after_min_s if self.min_responses else 0,
                             blocking=False, callback=callback)

    def _load_control(self, params: dict) -> dict:
        zeros = {k: np.zeros_like(np.asarray(v.detach().cpu() if hasattr(v, "detach") else v), dtype=np.float32)
                 for k, v in params.items()}
        if self.initial_control and os.path.isfile(self.initial_control):
            import torch

            saved = torch.load(self.initial_control, map_location="cpu", weights_only=True).get("scaffold_control")
            if saved:
                zeros.update({k: np.asarray(v, dtype=np.float32) for k, v in saved.items() if k in zeros})
        return zeros

    def _server_step(self, current: dict, averaged: dict) -> dict:
        """The server's optimiser on the averaged update ("pseudo-gradient"), BatchNorm statistics excepted:
        FedAvgM (``sgd``: server_lr x momentum) or FedAdam (``adam``: bias-corrected, betas 0.9 / 0.999)."""
        out = dict(averaged)
        self._velocity = self._velocity or {}
        self._steps += 1
        for k, v in averaged.items():
            new, old = np.asarray(v), np.asarray(current[k])
            if new.dtype.kind != "f" or k.endswith(("running_mean", "running_var")):
                continue
            delta = new.astype(np.float64) - old
            if self.server_optimizer == "adam":
                m = 0.9 * self._velocity.get(k, 0.0) + 0.1 * delta
                s2 = 0.999 * self._second.get(k, 0.0) + 0.001 * delta * delta
                self._velocity[k], self._second[k] = m, s2
                m_hat, s_hat = m / (1 - 0.9 ** self._steps), s2 / (1 - 0.999 ** self._steps)
                step = m_hat / (np.sqrt(s_hat) + self.server_eps)
            else:
                step = self.server_momentum * self._velocity.get(k, 0.0) + delta
                self._velocity[k] = step
            out[k] = (old + self._lr() * step).astype(new.dtype)
        return out

    def _bn_ema(self, current: dict, pooled: dict) -> dict:
        """The global BatchNorm statistics move towards this round's pooled moments at ``server_bn_momentum``."""
        out = dict(pooled)
        m = self.server_bn_momentum
        for k, v in pooled.items():
            if k.endswith(("running_mean", "running_var")) and k in current:
                old = np.asarray(current[k], dtype=np.float64)
                out[k] = ((1 - m) * old + m * np.asarray(v, dtype=np.float64)).astype(np.asarray(v).dtype)
        return out

    def _lr(self) -> float:
        """The server lr this round: constant, or one cosine over the job's planned rounds."""
        if not self.server_cosine:
            return self.server_lr
        return self.server_lr * cosine_scale(self.current_round or 0, self.start_round, self.num_rounds)

    # -------------------------------------------------------------- receiving, stopping

    def _aggregate_one_result(self, result: FLModel) -> bool:
        self._contacts[str(_get_client_name(result))] = {"last_contact": now_iso(), "last_round": self.current_round}
        return super()._aggregate_one_result(result)

    def stop_requested(self) -> bool:
        return bool(self.stop_file) and os.path.isfile(self.stop_file)

    def should_stop(self, metrics: dict | None = None) -> bool:
        return self._stopped_early or super().should_stop(metrics)

    # -------------------------------------------------------------- after aggregation

    def update_model(self, model: FLModel, aggr_result: FLModel) -> FLModel:
        sent_params = dict(model.params or {})
        metrics = aggr_result.metrics or {}
        score = metrics.get("val_score")
        pooled = pooled_row(metrics)
        if pooled:  # the run log's global row of this round (fedbrain.fl.runlog)
            self._pooled_val[str(self.current_round)] = {**pooled, "sites": (aggr_result.meta or {}).get("nr_accepted")}
        if isinstance(score, (int, float)) and math.isfinite(score) and score > self._best_score:
            # the sites validated the model they received this round: that one is the new best
            self._best_score = score
            save_round(os.path.join(self._dir(), ROUNDS_BEST), sent_params, self.current_round,
                       {"val_score": float(score), "metrics": {k: float(v) for k, v in metrics.items()
                                                               if isinstance(v, (int, float))}})
        take = getattr(self.aggregator, "take_site_counts", None)
        if take is not None:
            self._class_counts.update(take())
        plain = self.server_optimizer == "sgd" and self.server_lr == 1.0 and not self.server_momentum
        changed = not (aggr_result.meta or {}).get("unchanged")
        if not plain and changed:
            aggr_result.params = self._server_step(sent_params, aggr_result.params)
        if self.server_bn_momentum is not None and changed and self.current_round > self.start_round:
            aggr_result.params = self._bn_ema(sent_params, aggr_result.params)
        model = super().update_model(model, aggr_result)
        extra = {}
        if self.scaffold and self._global_ctrl is not None:
            diff = (aggr_result.meta or {}).get(AlgorithmConstants.SCAFFOLD_CTRL_DIFF) or {}
            share = (aggr_result.meta or {}).get("nr_accepted", 0) / max(1, self.num_sites or 1)
            for k, v in diff.items():
                if k in self._global_ctrl:
                    self._global_ctrl[k] = self._global_ctrl[k] + share * np.asarray(v, dtype=np.float32)
            extra["scaffold_control"] = {k: v.copy() for k, v in self._global_ctrl.items()}
        d = self._dir()
        save_round(os.path.join(d, ROUND_FILE.format(self.current_round)), model.params, self.current_round, extra)
        stale = os.path.join(d, ROUND_FILE.format(self.current_round - KEEP_ROUND_FILES))
        if os.path.exists(stale):  # hundreds of rounds would otherwise fill the disk
            os.remove(stale)
        if self.stop_requested() and self.current_round < self.start_round + self.num_rounds - 1:
            # FedAvg's loop breaks on should_stop, which it only asks when a stop condition is set
            self._stopped_early = True
            self.stop_condition = self.stop_condition or ("val_score", 0.0, lambda _value, _target: True)
            self.info(f"stop requested ({self.stop_file}): the job ends after round {self.current_round}")
        self._last_finished = self.current_round
        with open(os.path.join(d, ROUNDS_PROGRESS + ".tmp"), "w") as fh:
            json.dump(self.progress(), fh)
        os.replace(os.path.join(d, ROUNDS_PROGRESS + ".tmp"), os.path.join(d, ROUNDS_PROGRESS))
        return model

    def progress(self) -> dict:
        """The last finished round, out of how many, each site's last answer: ``progress.json``, and what the
        admin API's ``show_stats`` returns for this job (``fedbrain submit`` follows a deployed job with it)."""
        last = self._last_finished
        return {"last_round": last, "start_round": self.start_round, "num_rounds": self.num_rounds,
                "rounds_done": 0 if last is None else last - self.start_round + 1,
                "best_score": self._best_score if math.isfinite(self._best_score) else None,
                "sites": self._contacts, "stopped_early": self._stopped_early, POOLED_VAL: self._pooled_val,
                "time": now_iso()}

    def handle_event(self, event_type: str, fl_ctx) -> None:
        super().handle_event(event_type, fl_ctx)
        from nvflare.widgets.info_collector import InfoCollector

        if event_type == InfoCollector.EVENT_TYPE_GET_STATS:
            collector = fl_ctx.get_prop(InfoCollector.CTX_KEY_STATS_COLLECTOR, None)
            if collector is not None:
                collector.add_info(group_name=PROGRESS_GROUP, info=self.progress())
