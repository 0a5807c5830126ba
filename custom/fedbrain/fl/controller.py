"""fedbrain's server workflow: NVFlare's FedAvg loop, made fault tolerant, resumable and SCAFFOLD-capable.

One controller serves FedAvg, FedProx and SCAFFOLD:

- each round goes to every connected site and closes once all answered, or once ``min_responses`` did and
  ``wait_after_min_s`` more seconds passed (a dead or disconnected site misses the round);
- the validating aggregator checks every update against the global model sent this round;
- after every round the global model (and SCAFFOLD's global control variates) is written to
  ``checkpoint_dir/round-NNNN.pt`` (the newest two are kept), so a run killed at any point resumes from its
  last finished round;
- before round 0 the sites send their training-label counts (a ``counts`` request), so the federation's pooled
  class counts (class_balance, proportional batches) hold from the first round;
- the server's optimiser (AdamW by default) follows centralised training's schedule over the planned rounds: a
  linear warm-up, then one cosine to 0, with decoupled weight decay;
- the sites validate the global model at :func:`fedbrain.training.validation_points` (as many candidates as
  centralised training has epochs) and the final model always (a ``validate`` request after the last round); the
  best by the *pooled* validation score (the sites' summed validation counts, see :mod:`fedbrain.fl.metrics`) is
  written to ``checkpoint_dir/best.pt``;
- SCAFFOLD: the global control variates go out with the model and are updated from the validated,
  aggregated control differences (scaled by the share of sites that answered);
- secure aggregation: before round 0 every site sends its public key (signed with its kit key where it has one)
  and the set goes to every site with each round's model; a site that refuses to mask a round is logged;
- ``checkpoint_dir/progress.json`` says, after every round, which round finished, out of how many, when each
  site last answered, the pooled validation of every round (the run log's global rows), and whether the job
  stops early: a ``stop_file`` (``fedbrain runs stop``) ends the job
  after the round in flight, keeping every model written so far.
"""

from __future__ import annotations

import json
import math
import os
import uuid

import numpy as np
from nvflare.app_common.abstract.fl_model import FLModel
from nvflare.app_common.app_constant import AlgorithmConstants
from nvflare.app_common.workflows.fedavg import FedAvg, _get_client_name

from fedbrain.fl.metrics import (
    CLASS_COUNTS,
    NUM_SITES,
    POOLED_VAL,
    REQUEST,
    SERVER_STATE,
    VALIDATE,
    pooled_row,
    pooled_validation,
    site_counts,
)
from fedbrain.runs import ROUND_FILE, ROUNDS_BEST, ROUNDS_PROGRESS
from fedbrain.secagg import KEY_EXCHANGE, PUBLIC_KEYS, REFUSED, SESSION
from fedbrain.status import now_iso
from fedbrain.training import WARMUP_FRACTION, cosine_schedule, validation_points

PROGRESS_GROUP = "fedbrain"  # the admin API's show_stats group holding progress()
KEEP_ROUND_FILES = 2  # the newest round files kept (written atomically: the newest alone is enough to resume)


def save_round(path: str, params: dict, round_: int, extra: dict | None = None) -> None:
    """Atomically write ``{"model": tensors, "round": r, ...}`` (loadable with ``weights_only=True``)."""
    import torch

    def tensors(d: dict) -> dict:
        return {k: torch.as_tensor(np.asarray(v.detach().cpu() if hasattr(v, "detach") else v)) for k, v in d.items()}

    payload = {"model": tensors(params), "round": int(round_)}
    for k, v in (extra or {}).items():
        if k == SERVER_STATE:
            v = {"steps": int(v["steps"]), "m": tensors(v["m"]), "v": tensors(v["v"])}
        payload[k] = tensors(v) if k == "scaffold_control" else v
    tmp = path + ".tmp"
    torch.save(payload, tmp)
    os.replace(tmp, path)


class FedbrainController(FedAvg):
    """See the module docstring. ``num_sites``: the job's sites (for SCAFFOLD's control-variate scaling)."""

    def __init__(self, *args, min_responses: int = 0, wait_after_min_s: int = 60, checkpoint_dir: str = "",
                 scaffold: bool = False, num_sites: int = 0, initial_control: str = "", server_lr: float = 1.0,
                 server_momentum: float = 0.0, server_optimizer: str = "sgd", server_eps: float = 1e-6,
                 server_weight_decay: float = 0.0, server_warmup: float = WARMUP_FRACTION,
                 plan_start_round: int | None = None, validations: int = 0, stop_file: str = "",
                 secure_aggregation: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.secure_aggregation = secure_aggregation
        self._public_keys: dict[str, dict] | None = None  # secure aggregation: each site's announcement
        self.stop_file = stop_file
        self._contacts: dict[str, dict] = {}  # site -> {"last_contact": iso time, "last_round": r}
        self._stopped_early = False
        self._last_finished: int | None = None  # the last round whose global model was written
        self.server_lr = server_lr
        self.server_momentum = server_momentum
        self.server_optimizer = server_optimizer
        self.server_eps = server_eps
        self.server_weight_decay = server_weight_decay
        self.server_warmup = server_warmup
        self.plan_start_round = plan_start_round  # None: start_round (a resumed job keeps its plan's first round)
        self.validations = validations
        self._final: FLModel | None = None  # the last aggregated global model
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
            if self._public_keys is not None:
                data.meta[PUBLIC_KEYS] = self._public_keys
                data.meta[SESSION] = self._session
            data.meta[VALIDATE] = self._validates(int(self.current_round or 0))
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
        FedAvgM (``sgd``: server_lr x momentum), FedAdam (``adam``: bias-corrected, betas 0.9 / 0.999) or AdamW
        (``adamw``: Adam, the weights first decayed by lr x server_weight_decay, as ``torch.optim.AdamW``). Under
        Adam a weight no site changed (a frozen block) stays as it is: neither stepped nor decayed."""
        out = dict(averaged)
        self._velocity = self._velocity or {}
        self._steps += 1
        lr = self._lr()
        adam = self.server_optimizer in ("adam", "adamw")
        for k, v in averaged.items():
            new, old = np.asarray(v), np.asarray(current[k], dtype=np.float64)
            if new.dtype.kind != "f" or k.endswith(("running_mean", "running_var")):
                continue
            delta = new.astype(np.float64) - old
            if adam and not delta.any() and k not in self._velocity:
                continue  # frozen (fine-tuning): centralised AdamW never holds it either
            if adam:
                m = 0.9 * self._velocity.get(k, 0.0) + 0.1 * delta
                s2 = 0.999 * self._second.get(k, 0.0) + 0.001 * delta * delta
                self._velocity[k], self._second[k] = m, s2
                m_hat, s_hat = m / (1 - 0.9 ** self._steps), s2 / (1 - 0.999 ** self._steps)
                step = m_hat / (np.sqrt(s_hat) + self.server_eps)
            else:
                step = self.server_momentum * self._velocity.get(k, 0.0) + delta
                self._velocity[k] = step
            if self.server_optimizer == "adamw":
                old = old * (1.0 - lr * self.server_weight_decay)
            out[k] = (old + lr * step).astype(new.dtype)
        return out

    def _plan(self) -> tuple[int, int]:
        """The planned job's first round and its number of rounds (a resumed job continues its plan)."""
        first = self.start_round if self.plan_start_round is None else self.plan_start_round
        return first, self.start_round + self.num_rounds - first

    def _lr(self) -> float:
        """The server lr this round: under ``adamw`` centralised training's schedule over the planned rounds (a
        linear warm-up over ``server_warmup`` of them, then one cosine to 0); otherwise constant."""
        if self.server_optimizer != "adamw":
            return self.server_lr
        first, planned = self._plan()
        return self.server_lr * cosine_schedule(self.server_warmup)(int(self.current_round or 0) - first, planned)

    def _validates(self, round_: int) -> bool:
        """Whether the sites validate the global model they receive in ``round_`` (the model after
        ``round_ - first`` rounds; the final model is validated after the last round)."""
        first, planned = self._plan()
        return round_ - first in validation_points(planned, self.validations)

    # -------------------------------------------------------------- requests outside the training rounds

    def run(self) -> None:
        """Secure aggregation's key exchange, a ``counts`` request (the pooled class counts hold from round 0),
        FedAvg's rounds, then a ``validate`` request of the final global model."""
        if self.secure_aggregation and not self._exchange_keys():
            return
        self._load_server_state()
        self._request_counts()
        super().run()
        if self._final is not None and not self.abort_signal.triggered:
            self._validate_final(self._final)

    def _load_server_state(self) -> None:
        """A resumed job's server Adam moments and step count, from the round file it starts from."""
        if not (self.initial_control and os.path.isfile(self.initial_control)):
            return
        import torch

        saved = torch.load(self.initial_control, map_location="cpu", weights_only=True).get(SERVER_STATE)
        if saved:
            self._steps = int(saved["steps"])
            self._velocity = {k: np.asarray(v, dtype=np.float64) for k, v in saved["m"].items()}
            self._second = {k: np.asarray(v, dtype=np.float64) for k, v in saved["v"].items()}

    def _request(self, what: str, data: FLModel) -> list[FLModel]:
        """Ask every site for ``what`` instead of a training round; the answers that came back."""
        data.meta = {**(data.meta or {}), REQUEST: what, NUM_SITES: self.num_sites}
        return self.broadcast_model(data=data, task_name=self.task_name, min_responses=self.min_responses or 0,
                                    wait_time_after_min_received=self.wait_after_min_s if self.min_responses else 0,
                                    blocking=True) or []

    def _request_counts(self) -> None:
        """Each site's training-label counts before round 0 (no model is sent)."""
        for result in self._request("counts", FLModel(metrics={}, current_round=self.start_round)):
            counts = site_counts(result.metrics or {})
            if counts is not None:
                self._class_counts[str(_get_client_name(result))] = counts

    def _validate_final(self, model: FLModel) -> None:
        """The sites validate the final global model; it becomes ``best.pt`` when it scores best."""
        after = self.start_round + self.num_rounds if self._last_finished is None else self._last_finished + 1
        data = FLModel(params=model.params, params_type=model.params_type, current_round=after)
        rows = [dict(r.metrics or {}) for r in self._request("validate", data)]
        metrics = pooled_validation(rows) if rows else {}
        self._record_pooled(metrics, after, len(rows))
        self._keep_if_best(metrics, model.params, after)
        self._write_progress()  # the final model's pooled validation joins the progress (the run log's last row)

    def _record_pooled(self, metrics: dict, round_: int, sites) -> None:
        """The run log's global row of the model sent in ``round_`` (fedbrain.fl.runlog): its pooled validation."""
        pooled = pooled_row(metrics)
        if pooled:
            self._pooled_val[str(round_)] = {**pooled, "sites": sites}

    def _keep_if_best(self, metrics: dict, params: dict, round_: int) -> None:
        """Write ``best.pt`` when ``metrics``' pooled validation score beats the best so far."""
        score = metrics.get("val_score")
        if isinstance(score, (int, float)) and math.isfinite(score) and score > self._best_score:
            self._best_score = score
            save_round(os.path.join(self._dir(), ROUNDS_BEST), params, round_,
                       {"val_score": float(score), "metrics": {k: float(v) for k, v in metrics.items()
                                                               if isinstance(v, (int, float))}})

    # -------------------------------------------------------------- receiving, stopping

    def _exchange_keys(self) -> bool:
        """Secure aggregation, before round 0: every site's public key, to be sent to all with each round."""
        results = self.send_model_and_wait(task_name=self.task_name, data=FLModel(params={}, meta={KEY_EXCHANGE: True}))
        self._session = uuid.uuid4().hex  # tells apart two executions of a simulator job (they share its job id)
        keys = {}
        for r in results or []:
            ann = (r.meta or {}).get(PUBLIC_KEYS)
            if isinstance(ann, dict) and isinstance(ann.get("public_key"), str):
                keys[str(_get_client_name(r))] = {k: str(ann.get(k) or "") for k in ("public_key", "signature",
                                                                                    "certificate")}
        if len(keys) < self.num_sites:
            self.system_panic(f"secure aggregation: only {sorted(keys)} sent a public key, of {self.num_sites} "
                              "sites: the job stops before round 0", self.fl_ctx)
            return False
        self._public_keys = keys
        self.info(f"secure aggregation: public keys of {sorted(keys)} exchanged")
        return True

    def _aggregate_one_result(self, result: FLModel) -> bool:
        self._contacts[str(_get_client_name(result))] = {"last_contact": now_iso(), "last_round": self.current_round}
        refused = (result.meta or {}).get(REFUSED)
        if refused and not result.params and hasattr(self.aggregator, "refused"):
            self.aggregator.refused(str(_get_client_name(result)), str(refused))
        return super()._aggregate_one_result(result)

    def stop_requested(self) -> bool:
        return bool(self.stop_file) and os.path.isfile(self.stop_file)

    def should_stop(self, metrics: dict | None = None) -> bool:
        return self._stopped_early or super().should_stop(metrics)

    # -------------------------------------------------------------- after aggregation

    def update_model(self, model: FLModel, aggr_result: FLModel) -> FLModel:
        sent_params = dict(model.params or {})
        metrics = aggr_result.metrics or {}
        self._record_pooled(metrics, self.current_round, (aggr_result.meta or {}).get("nr_accepted"))
        # the sites validated the model they received this round: it may be the new best
        self._keep_if_best(metrics, sent_params, self.current_round)
        take = getattr(self.aggregator, "take_site_counts", None)
        if take is not None:
            self._class_counts.update(take())
        plain = self.server_optimizer == "sgd" and self.server_lr == 1.0 and not self.server_momentum
        changed = not (aggr_result.meta or {}).get("unchanged")
        if not plain and changed:
            aggr_result.params = self._server_step(sent_params, aggr_result.params)
        model = super().update_model(model, aggr_result)
        extra = {}
        if self.scaffold and self._global_ctrl is not None:
            diff = (aggr_result.meta or {}).get(AlgorithmConstants.SCAFFOLD_CTRL_DIFF) or {}
            share = (aggr_result.meta or {}).get("nr_accepted", 0) / max(1, self.num_sites or 1)
            for k, v in diff.items():
                if k in self._global_ctrl:
                    self._global_ctrl[k] = self._global_ctrl[k] + share * np.asarray(v, dtype=np.float32)
            extra["scaffold_control"] = {k: v.copy() for k, v in self._global_ctrl.items()}
        if self.server_optimizer in ("adam", "adamw") and self._velocity:
            extra[SERVER_STATE] = {"steps": self._steps, "m": self._velocity, "v": self._second}
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
        self._final = model
        self._write_progress()
        return model

    def _write_progress(self) -> None:
        d = self._dir()
        with open(os.path.join(d, ROUNDS_PROGRESS + ".tmp"), "w") as fh:
            json.dump(self.progress(), fh)
        os.replace(os.path.join(d, ROUNDS_PROGRESS + ".tmp"), os.path.join(d, ROUNDS_PROGRESS))

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
