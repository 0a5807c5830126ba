"""The hospital-side training script (NVFlare Client API): set up -> per round: receive -> validate -> train -> release.

One script for every site and every algorithm; per-site differences (data split file) come from
per-site config. Only weights, sample counts and scalar metrics are sent to the server. The algorithm hooks
(FedProx's proximal term, SCAFFOLD's control variates, DP, distillation) live in :class:`AlgorithmHooks`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fedbrain.calibration import site_sums
from fedbrain.contract import augmentation_policy
from fedbrain.data.dataset import PoissonLoader, SiteLoaders
from fedbrain.data.federation import SiteData
from fedbrain.distillation import Distiller, Teacher, resolve_teacher_file
from fedbrain.dp import PrivateTraining, SiteLedger, group_privacy, laplace_counts
from fedbrain.features import feature_cache
from fedbrain.fl.metrics import (
    CLASS_COUNTS,
    COUNT_PREFIX,
    NUM_SAMPLES,
    REQUEST,
    SECURE_META,
    VALIDATE,
    class_recalls,
    site_batch_size,
    validation_counts,
)
from fedbrain.fl.policy import check_outgoing, find_policy
from fedbrain.fl.privacy import PUBLIC_DP_KEYS, DPConfig, privatize_update, weights_digest
from fedbrain.input_check import feature_histograms
from fedbrain.models import apply_finetune, create_model, default_preprocessing
from fedbrain.runs import RunDir, append_jsonl, flat_scalars, metrics_file, privacy_ledger
from fedbrain.secagg import (
    KEY_EXCHANGE,
    PUBLIC_KEYS,
    REFUSED,
    SESSION,
    SecureAggregationError,
    SiteMasker,
    site_key_folder,
)
from fedbrain.settings import JobSettings
from fedbrain.training import (
    compute_metrics,
    derived_seed,
    headline,
    make_optimizer,
    place,
    predict_proba,
    present_classes,
    resolve_device,
    seed_everything,
    target_counts,
    train_epochs,
)

TRACKED = ("loss", "macro_f1", "accuracy", "tumour_auroc", "tumour_accuracy", "no_tumor_recall", "glioma_recall",
           "meningioma_recall", "pituitary_recall", "samples", "seconds")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="fedbrain site training (NVFlare Client API)")
    p.add_argument("--job", required=True, help="the job's site settings as JSON (fedbrain.settings.JobSettings)")
    p.add_argument("--split-file", help="this site's split CSV (default: <run-dir>/splits/<site>.csv)")
    p.add_argument("--run-dir", help="simulation run folder (site logs go to <run-dir>/sites/<site>/)")
    p.add_argument("--log-dir", help="where this site keeps its own metrics log (default: <run-dir>/sites/<site>)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--fail-at-round", type=int, default=-1, help="testing: raise at this round (fault injection)")
    p.add_argument("--fail-site", default="", help="testing: the site that fails")
    p.add_argument("--corrupt-at-round", type=int, default=-1, help="testing: send NaN weights at this round")
    p.add_argument("--corrupt-site", default="", help="testing: the site that sends NaN weights")
    # set by the site's executor (after the job's arguments, so the site's values win)
    p.add_argument("--site-workspace", default=None, help="this site's NVFlare workspace (its kit's folder)")
    p.add_argument("--job-custom", default=None, help="the job's custom/ folder (data files the job carries)")
    return p.parse_args(argv)


def to_torch_state(params: dict, model: torch.nn.Module) -> dict:
    """The received weights as tensors of this site's model. Weights that are not exactly its state dict (an extra
    tensor, such as a crafted input layer's, a missing one, or another shape) are refused."""
    own = model.state_dict()
    extra, missing = sorted(set(params) - set(own)), sorted(set(own) - set(params))
    reshaped = [k for k in params if k in own and tuple(np.shape(params[k])) != tuple(own[k].shape)]
    if extra or missing or reshaped:
        raise ValueError(f"refused: the received weights are not this site's {type(model).__name__} (extra tensors "
                         f"{extra[:3]}, missing {missing[:3]}, other shapes {reshaped[:3]}); a site loads only weights "
                         "of the model its installed registry builds")
    return {k: torch.as_tensor(np.asarray(v)).to(own[k].dtype).reshape(own[k].shape) for k, v in params.items()}


def secure_masker(site: str, run: RunDir | None) -> SiteMasker:
    """This site's secure aggregation: its key folder (beside a deployed kit, else its folder under the run) and
    its kit's certificates when it has them."""
    kit = next((d for d in [Path.cwd(), *Path.cwd().parents] if (d / "startup").is_dir()), None)
    folder = site_key_folder(site, kit if kit is not None and (kit / "startup" / "client.key").is_file() else None,
                             run.site_keys(site) if run else None)
    return SiteMasker(site, folder, kit / "startup" if kit is not None else None)


def slices_per_patient(records) -> int:
    """The most training slices one patient has at this site (1 where the data names no patients)."""
    per = Counter(r.patient_id for r in records if r.patient_id)
    return max(per.values(), default=1)


def released_counts(own_counts: np.ndarray, job: JobSettings, entry) -> list[int]:
    """Under DP, the training-label counts this site releases: Laplace-noised once (ε = dp_count_epsilon, kept in
    the site's ledger entry ``entry`` so a resumed job sends the same numbers and spends nothing more)."""
    kept = entry.get("released_counts") if entry is not None else None
    if kept is not None:
        return list(kept)
    noisy = laplace_counts(own_counts.tolist(), job.dp_count_epsilon)
    if entry is not None:
        entry.write({"released_counts": noisy, "count_epsilon": job.dp_count_epsilon, "delta": job.dp_delta})
    return noisy


def privacy_report(private: PrivateTraining | None, ledger: SiteLedger | None, k: int, count_eps: float) -> dict:
    """ε of the whole site (every job in its ledger) and per patient (group privacy over ``k`` slices)."""
    if private is None:
        return {}
    eps, delta = private.epsilon + count_eps, private.cfg.delta
    site_eps = ledger.spent()[0] if ledger is not None else eps
    patient_eps, patient_delta = group_privacy(eps, delta, k)
    return {"dp_site_epsilon": site_eps, "dp_patient_epsilon": patient_eps, "dp_patient_delta": patient_delta,
            "dp_slices_per_patient": k}


def cpu_state(model: torch.nn.Module) -> dict:
    return {k: v.detach().cpu() for k, v in model.state_dict().items()}


# ---------------------------------------------------------------- the algorithm hooks


class AlgorithmHooks:
    """What each algorithm adds to a site's round, in one place: FedProx's proximal term and SCAFFOLD's control
    variates around training, distillation from a teacher, DP-SGD (``private``) inside training, and update DP
    (``dp``: clip and noise the released update)."""

    def __init__(self, job: JobSettings, model: torch.nn.Module, dp: DPConfig,
                 private: PrivateTraining | None, teacher: Teacher | None, device):
        self.job, self.dp, self.private, self.teacher, self.device = job, dp, private, teacher, device
        self.trained = {name for name, p in model.named_parameters() if p.requires_grad}  # what update DP releases
        self.scaffold = None
        if job.algorithm == "scaffold":
            from nvflare.app_opt.pt.scaffold import PTScaffoldHelper

            self.scaffold = PTScaffoldHelper()
            self.scaffold.init(model)
        self._controls = None

    @property
    def private_any(self) -> bool:
        """Under any DP, training-data scalars stay home."""
        return self.dp.enabled or self.private is not None

    def _global_model(self, global_state: dict) -> torch.nn.Module:
        g = create_model(self.job.model, pretrained=False, **self.job.model_kwargs)
        g.load_state_dict(global_state)
        return g

    def train_kwargs(self, meta_in: dict, global_state: dict) -> dict:
        """``train_epochs``'s hooks this round: FedProx's loss or SCAFFOLD's step correction, the distiller, DP-SGD."""
        extra_loss, after_step = None, None
        if self.job.algorithm == "fedprox":
            from nvflare.app_opt.pt.fedproxloss import PTFedProxLoss

            mu = float(meta_in.get("fedprox_mu", self.job.fedprox_mu))
            prox = PTFedProxLoss(mu=mu)
            global_model = self._global_model(global_state)
            place(global_model, self.device)

            def extra_loss(m, _g=global_model, _p=prox):
                return _p(m, _g)
        elif self.scaffold is not None:
            from nvflare.app_common.app_constant import AlgorithmConstants

            global_ctrl = meta_in.get(AlgorithmConstants.SCAFFOLD_CTRL_GLOBAL)
            if global_ctrl:
                self.scaffold.load_global_controls(global_ctrl)
            c_global, c_local = self._controls = self.scaffold.get_params()

            def after_step(m, lr, _g=c_global, _l=c_local, _s=self.scaffold):
                _s.model_update(m, lr, _g, _l)
        return {"extra_loss": extra_loss, "after_step": after_step, "private": self.private,
                "distiller": Distiller(self.teacher.logits, self.job.distillation()) if self.teacher else None}

    def after_train(self, model: torch.nn.Module, lr: float, global_state: dict, meta: dict) -> None:
        """SCAFFOLD: this site's control-variate difference joins the update's meta."""
        if self.scaffold is None:
            return
        from nvflare.app_common.app_constant import AlgorithmConstants

        c_global, c_local = self._controls
        self.scaffold.terms_update(model, lr, c_global, c_local, self._global_model(global_state))
        meta[AlgorithmConstants.SCAFFOLD_CTRL_DIFF] = self.scaffold.get_delta_controls()

    def privatise(self, params: dict, global_state: dict, stats: dict, rnd: int,
                  report: dict) -> tuple[dict, dict]:
        """(the update as it may leave, its DP record): update DP clips and noises it; DP-SGD reports its spend
        and ``report`` (the site's and each patient's ε, :func:`privacy_report`)."""
        if self.dp.enabled:
            return privatize_update(params, global_state, self.dp, rnd, self.trained)
        if self.private is not None:
            return params, {**{k: v for k, v in stats.items() if k.startswith("dp_")}, **report}
        return params, {}


# ---------------------------------------------------------------- setup


@dataclass
class Site:
    """One hospital's state across rounds (built once by :func:`setup_site`)."""

    args: argparse.Namespace
    job: JobSettings
    name: str
    data: SiteData
    loaders: SiteLoaders
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    hooks: AlgorithmHooks
    policy: object
    dp_sgd: object
    log_dir: Path | None
    sent_counts: list[int]  # the training-label counts that leave (Laplace-noised once under DP)
    n_sent: int  # the training-set size that leaves (under DP: the noised counts' sum)
    own_profile: dict
    present: object
    k_patient: int = 1  # the most training slices of one patient (group privacy)
    dp_count_eps: float = 0.0  # the ε the released counts spent (0 without DP)
    ledger: SiteLedger | None = None  # the hospital's own, across all its jobs (None: no policy file)
    job_id: str = ""
    secure: SiteMasker | None = None  # secure aggregation: this site's own key and ledger
    tracker: object = None
    released: dict | None = None  # the last weights this site sent: the only local model that may leave it again

    def log(self, row: dict) -> None:
        if self.log_dir:
            append_jsonl(metrics_file(self.log_dir), {"site": self.name, **row})
        if self.tracker is not None and not (self.hooks.private_any and row["split"] == "train"):
            prefix = row["split"]  # training scalars stay home under DP
            self.tracker.log_metrics({f"{prefix}_{k}": float(v) for k, v in flat_scalars(row).items()
                                      if k in TRACKED and np.isfinite(v)}, step=int(row["round"]))

    def count_metrics(self) -> dict:
        return {f"{COUNT_PREFIX}{k}": int(c) for k, c in enumerate(self.sent_counts)}

    def record_release(self, params: dict) -> dict:
        """Record what leaves in the site's release ledger (its policy filter sends nothing else)."""
        if self.ledger is not None:
            self.ledger.record_release(weights_digest(params))
        return params

    def may_evaluate(self) -> bool:
        """Count one scoring of the held-out images against the site's limit (False: refused)."""
        if self.ledger is None or self.ledger.count_query(self.policy.max_eval_queries):
            return True
        print(f"{self.name}: this site's limit of {self.policy.max_eval_queries} evaluations of its held-out images "
              f"({self.policy.source}) is reached: evaluation refused", file=sys.stderr)
        return False

    def privacy_report(self) -> dict:
        return privacy_report(self.hooks.private, self.ledger, self.k_patient, self.dp_count_eps)


def load_teacher(job: JobSettings, pre, device, loaders: SiteLoaders, job_custom: str | None) -> Teacher | None:
    """The distillation teacher: the job carries its file in its custom/ folder (the executor names it)."""
    if not job.distil_from:
        return None
    teacher = Teacher(resolve_teacher_file(job.distil_from, [Path(job_custom)] if job_custom else []), pre, device)
    if job.distil_teacher_bn == "site":
        teacher.adapt_batchnorm(loaders.eval("train"))
    return teacher


def private_training(site: str, job: JobSettings, model, loaders: SiteLoaders, run: RunDir | None,
                     log_dir: Path | None, site_home: Path, job_id: str):
    """(policy, dp_sgd, private, ledger, entry): record-level DP, the job's request made at least as strict as this
    hospital's own policy, and the hospital's ledger (across all its jobs) with this job's entry."""
    cfg = job.train
    policy = find_policy(run.site_policy(site) if run else None, starts=(site_home,))
    dp_sgd = policy.apply(job.dp_sgd())
    ledger = policy.ledger(site)  # the hospital's own, across all its jobs (None: no policy file)
    entry = ledger.job(ledger.job_key(f"{job_id}:{log_dir or ''}", resume=job.start_round > 0)) \
        if ledger is not None else None
    if entry is not None and dp_sgd.private:  # refused before training when the site's lifetime budget is short
        policy.admit(ledger, entry.key, dp_sgd.epsilon + job.dp_count_epsilon)
    if not dp_sgd.private:
        return policy, dp_sgd, None, ledger, entry
    per_round = cfg.steps or cfg.epochs * len(PoissonLoader(loaders.dataset("train"), dp_sgd.sample_rate))
    private = PrivateTraining(model, dp_sgd, len(loaders.dataset("train").targets),
                              planned_steps=job.rounds * per_round,
                              ledger=entry if entry is not None else privacy_ledger(log_dir) if log_dir else None)
    print(f"{site}: DP-SGD with budget ε={dp_sgd.epsilon:g}, δ={dp_sgd.delta:g} over {job.rounds * per_round} "
          f"steps: noise multiplier {private.noise_multiplier:.3f}"
          + (f" (this site's policy, {policy.source})" if policy.requires_dp else ""), file=sys.stderr)
    return policy, dp_sgd, private, ledger, entry


def setup_site(args: argparse.Namespace, site: str, job_id: str = "") -> Site:
    """This site's data, model, optimiser, privacy and algorithm hooks (once, before the first round)."""
    job = JobSettings.from_dict(json.loads(args.job))
    cfg = job.train
    if args.threads:
        torch.set_num_threads(args.threads)
    seed_everything(cfg.seed)
    run = RunDir(args.run_dir) if args.run_dir else None
    split_file = Path(args.split_file) if args.split_file else run.split_file(site)
    data = SiteData.read_split_file(site, split_file)
    pre = default_preprocessing(job.model, job.image_size)
    loaders = SiteLoaders(data, pre, cfg.batch_size, cache_dir=Path(args.cache_dir) if args.cache_dir else None,
                          augmentation=augmentation_policy(cfg.augmentation))
    train_targets = loaders.dataset("train").targets
    model = create_model(job.model, pretrained=False, **job.model_kwargs)  # the server sends the initial weights
    apply_finetune(model, job.model, job.trained_layers)
    device = resolve_device(cfg.device)
    place(model, device)  # the one device rule (CUDA when present); what the site sends is always on the CPU
    # a frozen trunk (finetune "head", no augmentation): training and evaluation run the head on its cached features
    loaders.features = feature_cache(model, job.model, job.trained_layers, loaders.augmentation, cfg.feature_cache,
                                     "distillation" if job.distil_from else "", loaders.cache_dir, site)
    optimizer = make_optimizer(model, cfg)  # persists across rounds unless reset_optimizer
    teacher = load_teacher(job, pre, device, loaders, args.job_custom)
    log_dir = Path(args.log_dir) if args.log_dir else (run.site_log_dir(site) if run else None)
    site_home = Path(args.site_workspace) if args.site_workspace else Path.cwd()
    policy, dp_sgd, private, ledger, entry = private_training(site, job, model, loaders, run, log_dir, site_home,
                                                             job_id)
    hooks = AlgorithmHooks(job, model, DPConfig(clip=job.dp_clip, noise_multiplier=job.dp_noise), private,
                           teacher, device)
    own_counts = target_counts(train_targets)  # sent with every update: the server pools them (class_balance)
    # under DP the label counts (and the training-set size, their sum) leave once, Laplace-noised, in the ledger
    sent_counts = released_counts(own_counts, job, entry) if hooks.private_any else own_counts.tolist()
    tracker = None
    if job.tracking == "mlflow":  # NVFlare experiment tracking: the same scalars, streamed to the server
        from nvflare.client.tracking import MLflowWriter

        tracker = MLflowWriter()
    return Site(args=args, job=job, name=site, data=data, loaders=loaders, model=model, optimizer=optimizer,
                hooks=hooks, policy=policy, dp_sgd=dp_sgd, log_dir=log_dir, sent_counts=sent_counts,
                n_sent=max(1, int(sum(sent_counts))) if hooks.private_any else len(data.splits["train"]),
                own_profile=feature_histograms(loaders.dataset("train").images),  # sent with the validation counts
                present=present_classes(train_targets) if job.missing_classes == "restrict" else None,
                k_patient=slices_per_patient(data.splits["train"]),
                dp_count_eps=job.dp_count_epsilon if hooks.private_any else 0.0, ledger=ledger, job_id=job_id,
                secure=secure_masker(site, run) if job.secure_aggregation else None, tracker=tracker)


# ---------------------------------------------------------------- one round


def evaluate_on_test(s: Site) -> dict:
    """Cross-site evaluation: the received model's scores on the local test split, and its test counts (summed
    over sites they give a deployed run's pooled test metrics, :func:`fedbrain.fl.runlog.pooled_test_results`)."""
    if not s.data.splits["test"] or not s.may_evaluate():
        return {"val_score": float("nan")}
    probs, targets = predict_proba(s.model, s.loaders.eval("test"))
    test = compute_metrics(probs, targets)
    return {"val_score": headline(test), **{f"test_{k}": v for k, v in flat_scalars(test).items()},
            **validation_counts(probs, targets, prefix="test")}


def validate(s: Site, rnd: int, meta_in: dict) -> tuple[dict, dict]:
    """(metrics, counts) of the received model on the local validation split, when the server asks for them (the
    round's meta says VALIDATE, or the final "validate" request) and the site's evaluation limit allows."""
    val, val_counts = {}, {}
    asked = meta_in.get(REQUEST) == "validate" or meta_in.get(VALIDATE)
    if s.data.splits["val"] and asked and s.may_evaluate():
        probs, targets = predict_proba(s.model, s.loaders.eval("val"))
        val, val_counts = compute_metrics(probs, targets), validation_counts(probs, targets)
        val_counts.update(site_sums(probs, targets))  # for the federated calibration fit
        if not s.hooks.private_any:  # the training images' feature histograms are not privatised: kept home under DP
            val_counts.update(s.own_profile)  # for the federated input profile
    if val:
        s.log({"round": rnd, "split": "val", "model": "global", **flat_scalars(val), **class_recalls(val)})
    return val, val_counts


def val_metrics(val: dict, val_counts: dict) -> dict:
    """The validation scalars and counts an update carries."""
    return {"val_score": headline(val) if val else float("nan"),
            **{f"val_{k}": v for k, v in flat_scalars(val).items()}, **val_counts}


def train_loader(s: Site, rnd: int, meta_in: dict):
    """(this round's training batches, the batch size; None for Poisson batches under DP-SGD)."""
    cfg = s.job.train
    if s.dp_sgd.enabled:  # Poisson batches at the job's rate (the same share of every site's images)
        return s.loaders.poisson(s.dp_sgd.sample_rate), None
    batch = site_batch_size(cfg.batch_size, len(s.data.splits["train"]), meta_in) \
        if s.job.batch_split == "proportional" else cfg.batch_size
    return s.loaders.train(seed=derived_seed(cfg.seed, rnd, s.name), batch_size=batch), batch


def budget_spent(s: Site, rnd: int, global_state: dict, val: dict, val_counts: dict):
    """The DP-SGD budget is spent: no more training here; the site still validates and says so."""
    from nvflare.app_common.abstract.fl_model import FLMetaKey
    from nvflare.client import FLModel

    private = s.hooks.private
    print(f"{s.name}: privacy budget ε={s.dp_sgd.epsilon:g} spent after {private.steps} steps: no update in "
          f"round {rnd}", file=sys.stderr)
    report = {**private.summary(), **s.privacy_report()}
    s.log({"round": rnd, "split": "train", "model": "local", **report})
    meta = {FLMetaKey.NUM_STEPS_CURRENT_ROUND: 0, NUM_SAMPLES: s.n_sent,
            **{k: v for k, v in report.items() if k in PUBLIC_DP_KEYS}}
    check_outgoing(s.policy, meta)
    return FLModel(params=s.record_release(global_state), meta=meta,
                   metrics={**val_metrics(val, val_counts), **s.count_metrics()})


def train(s: Site, rnd: int, meta_in: dict, global_state: dict) -> tuple[dict, dict, dict]:
    """Train locally from the global weights: (the training stats, the update's meta: counts and algorithm state,
    the round's settings for the local log)."""
    from nvflare.app_common.abstract.fl_model import FLMetaKey

    job, cfg, model = s.job, s.job.train, s.model
    hooks = s.hooks.train_kwargs(meta_in, global_state)
    if job.reset_optimizer:
        s.optimizer = make_optimizer(model, cfg)
    pooled = meta_in.get(CLASS_COUNTS) if job.class_balance == "federation" else None
    t0 = time.perf_counter()
    loader, batch = train_loader(s, rnd, meta_in)
    stats = train_epochs(model, loader, cfg, optimizer=s.optimizer,
                         class_counts=torch.tensor(pooled) if pooled else None, present=s.present,
                         **hooks)
    # counts and algorithm state, never data
    meta = {FLMetaKey.NUM_STEPS_CURRENT_ROUND: stats["steps"], NUM_SAMPLES: s.n_sent}
    s.hooks.after_train(model, s.optimizer.param_groups[0]["lr"], global_state, meta)
    return stats, meta, {"batch_size": batch, "lr": s.optimizer.param_groups[0]["lr"],
                         "class_balance": "federation" if pooled else "site", "train_seconds": time.perf_counter() - t0}


def release(s: Site, rnd: int, meta_in: dict, trained: tuple[dict, dict, dict], global_state: dict, val: dict,
            val_counts: dict):
    """The update as it may leave the site: weights (privatised, masked), sample count and scalar metrics only,
    recorded in the site's release ledger; a refused mask sends nothing but the refusal."""
    from nvflare.app_common.abstract.fl_model import FLMetaKey
    from nvflare.client import FLModel

    args, (stats, meta, settings) = s.args, trained
    params, dp_info = s.hooks.privatise(cpu_state(s.model), global_state, stats, rnd, s.privacy_report())
    # only the data-independent accounting leaves the site: the update's norm and clip scale stay in
    # the local log (they would tell the server the unclipped update's size)
    meta.update({k: dp_info[k] for k in PUBLIC_DP_KEYS if k in dp_info})
    check_outgoing(s.policy, meta)
    s.released = {k: v.clone() for k, v in params.items()}  # a copy: the model's tensors change when it next loads
    private_any = s.hooks.private_any
    s.log({"round": rnd, "split": "train", "model": "local", **stats, **dp_info, **settings,
           "released_sha256": weights_digest(params) if private_any else None})  # local log: for the audit
    corrupt = rnd == args.corrupt_at_round and s.name == args.corrupt_site
    if corrupt:  # what this site's DP mechanism did not produce: never in its release ledger
        params = {k: torch.full_like(v, float("nan")) if v.is_floating_point() else v for k, v in params.items()}
    if s.secure is not None:  # only the masked, sample-weighted update leaves: the server sees nothing else of it
        delta = {k: v.double().numpy() - global_state[k].double().numpy() for k, v in params.items()}
        job_id = s.secure.job_identity(s.job_id, meta_in.get(SESSION))
        try:
            masked = s.secure.mask(delta, float(s.n_sent), job_id, rnd, meta_in.get(PUBLIC_KEYS))
        except SecureAggregationError as exc:  # refused here: the round goes on without this site
            print(f"{s.name}: round {rnd}: {exc}", file=sys.stderr)
            return FLModel(params={}, meta={REFUSED: str(exc), FLMetaKey.NUM_STEPS_CURRENT_ROUND: 0})
        params = {k: torch.from_numpy(v) for k, v in masked.items()}
        meta[SECURE_META] = True
    metrics = {**val_metrics(val, val_counts), **s.count_metrics(),
               **({} if private_any else {"train_loss": stats["loss"]})}  # a training-data scalar: not under DP
    return FLModel(params=params if corrupt else s.record_release(params), metrics=metrics, meta=meta)


def run_round(flare, s: Site, input_model) -> None:
    """One task from the server: answer the key exchange or the counts request, send the released model, score on
    the test split, validate the final model, or validate -> train -> release."""
    rnd = int(input_model.current_round or 0)
    meta_in = input_model.meta or {}
    if meta_in.get(KEY_EXCHANGE) or (s.secure is not None and flare.is_submit_model()):
        # secure aggregation: only this site's public key leaves, never its own model
        flare.send(flare.FLModel(params={}, meta={PUBLIC_KEYS: s.secure.announcement()} if s.secure is not None
                                 and meta_in.get(KEY_EXCHANGE) else {REFUSED: "secure aggregation"}))
        return
    request = meta_in.get(REQUEST)  # a task that is no training round
    if request == "counts":  # before round 0: the server pools every site's training-label counts
        flare.send(flare.FLModel(metrics=s.count_metrics()))
        return
    if flare.is_submit_model():  # cross-site evaluation asks for this site's last local model
        # what the site already released (privatised under DP), never the unclipped local weights; a site
        # that never trained sends the global model it holds
        flare.send(flare.FLModel(params=s.record_release(s.released if s.released is not None
                                                         else cpu_state(s.model))))
        return
    s.model.load_state_dict(to_torch_state(input_model.params, s.model))
    if flare.is_evaluate():  # cross-site evaluation: score the received model on the local test split
        flare.send(flare.FLModel(metrics=evaluate_on_test(s)))
        return
    val, val_counts = validate(s, rnd, meta_in)
    if request == "validate":  # the final global model: validated, not trained
        flare.send(flare.FLModel(metrics=val_metrics(val, val_counts)))
        return
    if rnd == s.args.fail_at_round and s.name == s.args.fail_site:
        raise RuntimeError(f"fault injection: {s.name} crashes at round {rnd}")
    global_state = {k: v.detach().cpu().clone() for k, v in s.model.state_dict().items()}
    private = s.hooks.private
    if private is not None and not private.can_step():
        flare.send(budget_spent(s, rnd, global_state, val, val_counts))
        return
    flare.send(release(s, rnd, meta_in, train(s, rnd, meta_in, global_state), global_state, val, val_counts))


def main(argv: list[str] | None = None) -> None:
    import nvflare.client as flare

    args = parse_args(argv)
    flare.init()
    s = setup_site(args, flare.get_site_name(), flare.get_job_id())
    while flare.is_running():
        input_model = flare.receive()
        if input_model is None:
            break
        run_round(flare, s, input_model)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main(sys.argv[1:])
