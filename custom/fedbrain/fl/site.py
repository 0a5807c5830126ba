"""The hospital-side training script (NVFlare Client API): init -> receive -> evaluate -> train -> send.

One script for every site and every algorithm; per-site differences (data split file) come from
per-site config. Only weights, sample counts and scalar metrics are sent to the server.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import Counter
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from fedbrain.calibration import site_sums
from fedbrain.contract import augmentation_policy
from fedbrain.data.dataset import PoissonLoader, SiteLoaders
from fedbrain.data.federation import SiteData
from fedbrain.distillation import Distiller, Teacher, resolve_teacher_file
from fedbrain.dp import PrivateTraining, SiteLedger, group_privacy, laplace_counts
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
from fedbrain.fl.policy import PolicyError, check_outgoing, find_policy
from fedbrain.fl.privacy import PUBLIC_DP_KEYS, DPConfig, privatize_update, weights_digest
from fedbrain.input_check import feature_histograms
from fedbrain.models import apply_finetune, batchnorms, create_model, default_preprocessing
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
    estimate_bn_statistics,
    evaluate,
    headline,
    make_optimizer,
    place,
    predict_proba,
    present_classes,
    resolve_device,
    seed_everything,
    target_counts,
    train_epochs,
    use_batch_renorm,
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
    own = model.state_dict()
    return {k: torch.as_tensor(np.asarray(v)).to(own[k].dtype).reshape(own[k].shape) for k, v in params.items()}


def bn_initialised(model: torch.nn.Module) -> bool:
    """Whether the model's BatchNorm statistics were ever estimated (a fresh model's are 0 / 1)."""
    bns = batchnorms(model)
    return not bns or any(int(m.num_batches_tracked) > 0 for m in bns)


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


def main(argv: list[str] | None = None) -> None:
    import nvflare.client as flare
    from nvflare.app_common.abstract.fl_model import FLMetaKey
    from nvflare.app_common.app_constant import AlgorithmConstants

    args = parse_args(argv)
    job = JobSettings.from_dict(json.loads(args.job))
    cfg = job.train
    # (1) initialise the Client API and this site's data
    flare.init()
    site = flare.get_site_name()
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
    own_counts = target_counts(train_targets)  # sent every round: the server pools them (class_balance)
    own_profile = feature_histograms(loaders.dataset("train").images)  # counts; sent with the validation counts
    present = present_classes(train_targets) if job.missing_classes == "restrict" else None
    model = create_model(job.model, pretrained=False, **job.model_kwargs)  # the server sends the initial weights
    apply_finetune(model, job.model, job.finetune)
    device = resolve_device(cfg.device)
    place(model, device)  # the one device rule (CUDA when present); what the site sends is always on the CPU
    if job.bn_statistics == "renorm":
        use_batch_renorm(model, momentum=1.0)  # the running buffers then hold this round's batch moments
    optimizer = make_optimizer(model, cfg)  # persists across rounds unless reset_optimizer
    teacher = None
    if job.distil_from:  # the job carries the teacher file into this script's folder (custom/)
        job_custom = [Path(args.job_custom)] if args.job_custom else []  # the executor names the job's custom/
        teacher = Teacher(resolve_teacher_file(job.distil_from, job_custom), pre, device)
        if job.distil_teacher_bn == "site":
            teacher.adapt_batchnorm(loaders.eval("train"))
    dp = DPConfig(clip=job.dp_clip, noise_multiplier=job.dp_noise)
    log_dir = Path(args.log_dir) if args.log_dir else (run.site_log_dir(site) if run else None)
    # record-level DP: the job's request, made at least as strict as this hospital's own policy
    site_home = Path(args.site_workspace) if args.site_workspace else Path.cwd()
    policy = find_policy(run.site_policy(site) if run else None, starts=(site_home,))
    dp_sgd = policy.apply(job.dp_sgd())
    private = None
    ledger = policy.ledger(site)  # the hospital's own, across all its jobs (None: no policy file)
    entry = ledger.job(ledger.job_key(f"{flare.get_job_id()}:{log_dir or ''}", resume=job.start_round > 0)) \
        if ledger is not None else None
    if entry is not None and dp_sgd.private:  # refused before training when the site's lifetime budget is short
        policy.admit(ledger, entry.key, dp_sgd.epsilon + job.dp_count_epsilon)
    if dp_sgd.private and job.bn_statistics != "batch":
        raise PolicyError(f"{site} trains by DP-SGD (ε={dp_sgd.epsilon:g}), and bn_statistics {job.bn_statistics} "
                          "would estimate statistics on its training images outside the accounting")
    if dp_sgd.private:
        per_round = cfg.steps or cfg.epochs * len(PoissonLoader(loaders.dataset("train"), dp_sgd.sample_rate))
        private = PrivateTraining(model, dp_sgd, len(train_targets), planned_steps=job.rounds * per_round,
                                  ledger=entry if entry is not None else privacy_ledger(log_dir) if log_dir else None)
        print(f"{site}: DP-SGD with budget ε={dp_sgd.epsilon:g}, δ={dp_sgd.delta:g} over {job.rounds * per_round} "
              f"steps: noise multiplier {private.noise_multiplier:.3f}"
              + (f" (this site's policy, {policy.source})" if policy.requires_dp else ""), file=sys.stderr)
    private_any = dp.enabled or private is not None  # under any DP, training-data scalars stay home
    # under DP the label counts (and the training-set size, their sum) leave once, Laplace-noised, in the ledger
    sent_counts = released_counts(own_counts, job, entry) if private_any else own_counts.tolist()
    n_sent = max(1, int(sum(sent_counts))) if private_any else len(data.splits["train"])
    count_metrics = {f"{COUNT_PREFIX}{k}": int(c) for k, c in enumerate(sent_counts)}
    k_patient = slices_per_patient(data.splits["train"])
    dp_count_eps = job.dp_count_epsilon if private_any else 0.0

    def release(params: dict) -> dict:
        """Record what leaves in the site's release ledger (its policy filter sends nothing else)."""
        if ledger is not None:
            ledger.record_release(weights_digest(params))
        return params

    def may_evaluate() -> bool:
        """Count one scoring of the held-out images against the site's limit (False: refused)."""
        if ledger is None or ledger.count_query(policy.max_eval_queries):
            return True
        print(f"{site}: this site's limit of {policy.max_eval_queries} evaluations of its held-out images "
              f"({policy.source}) is reached: evaluation refused", file=sys.stderr)
        return False

    secure = secure_masker(site, run) if job.secure_aggregation else None  # this site's own key and ledger
    scaffold = None
    if job.algorithm == "scaffold":
        from nvflare.app_opt.pt.scaffold import PTScaffoldHelper

        scaffold = PTScaffoldHelper()
        scaffold.init(model)

    tracker = None
    if job.tracking == "mlflow":  # NVFlare experiment tracking: the same scalars, streamed to the server
        from nvflare.client.tracking import MLflowWriter

        tracker = MLflowWriter()

    def log(row: dict) -> None:
        if log_dir:
            append_jsonl(metrics_file(log_dir), {"site": site, **row})
        if tracker is not None and not (private_any and row["split"] == "train"):  # training scalars stay home
            prefix = row["split"]
            tracker.log_metrics({f"{prefix}_{k}": float(v) for k, v in flat_scalars(row).items()
                                 if k in TRACKED and np.isfinite(v)}, step=int(row["round"]))

    released = None  # the last weights this site sent: the only local model that may leave it again

    while flare.is_running():
        # (2) receive the global model
        input_model = flare.receive()
        if input_model is None:
            break
        rnd = int(input_model.current_round or 0)
        meta_in = input_model.meta or {}
        if meta_in.get(KEY_EXCHANGE) or (secure is not None and flare.is_submit_model()):
            # secure aggregation: only this site's public key leaves, never its own model
            flare.send(flare.FLModel(params={}, meta={PUBLIC_KEYS: secure.announcement()} if secure is not None
                                     and meta_in.get(KEY_EXCHANGE) else {REFUSED: "secure aggregation"}))
            continue
        request = meta_in.get(REQUEST)  # a task that is no training round
        if request == "counts":  # before round 0: the server pools every site's training-label counts
            flare.send(flare.FLModel(metrics=dict(count_metrics)))
            continue
        if flare.is_submit_model():  # cross-site evaluation asks for this site's last local model
            # what the site already released (privatised under DP), never the unclipped local weights; a site
            # that never trained sends the global model it holds
            sent = released if released is not None else {k: v.detach().cpu() for k, v in model.state_dict().items()}
            flare.send(flare.FLModel(params=release(sent)))
            continue
        model.load_state_dict(to_torch_state(input_model.params, model))

        # (3) evaluate the global model on local data
        if flare.is_evaluate():  # cross-site evaluation: score the received model on the local test split
            test = evaluate(model, loaders.eval("test")) if data.splits["test"] and may_evaluate() else {}
            flare.send(flare.FLModel(metrics={"val_score": headline(test) if test else float("nan"),
                                              **{f"test_{k}": v for k, v in flat_scalars(test).items()}}))
            continue
        val, val_counts = {}, {}
        if data.splits["val"] and (request == "validate" or meta_in.get(VALIDATE)) and may_evaluate():
            probs, targets = predict_proba(model, loaders.eval("val"))
            val, val_counts = compute_metrics(probs, targets), validation_counts(probs, targets)
            val_counts.update(site_sums(probs, targets))  # for the federated calibration fit
            if not private_any:  # the training images' feature histograms are not privatised: kept home under DP
                val_counts.update(own_profile)  # for the federated input profile
        if val:
            log({"round": rnd, "split": "val", "model": "global", **flat_scalars(val), **class_recalls(val)})
        if request == "validate":  # the final global model: validated, not trained
            flare.send(flare.FLModel(metrics={"val_score": headline(val) if val else float("nan"),
                                              **{f"val_{k}": v for k, v in flat_scalars(val).items()}, **val_counts}))
            continue
        if rnd == args.fail_at_round and site == args.fail_site:
            raise RuntimeError(f"fault injection: {site} crashes at round {rnd}")

        # (4) train locally, starting from the global weights
        norm = job.norm_in_round(rnd)
        round_cfg = replace(cfg, norm=norm)
        # this site's exact moments under the received weights: used now where no pooled statistics exist yet,
        # and sent so that the server pools them ("pooled": every round; "frozen": once, in the freeze round)
        estimate = job.bn_statistics == "pooled" and not bn_initialised(model)
        estimate = estimate or (job.bn_statistics == "frozen" and rnd == job.freeze_round())
        if estimate:
            estimate_bn_statistics(model, loaders.eval("train"), job.bn_images)
        global_state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        extra_loss, after_step = None, None
        if job.algorithm == "fedprox":
            from nvflare.app_opt.pt.fedproxloss import PTFedProxLoss

            mu = float(meta_in.get("fedprox_mu", job.fedprox_mu))
            prox = PTFedProxLoss(mu=mu)
            global_model = create_model(job.model, pretrained=False, **job.model_kwargs)
            global_model.load_state_dict(global_state)
            place(global_model, device)

            def extra_loss(m, _g=global_model, _p=prox):
                return _p(m, _g)
        elif scaffold is not None:
            global_ctrl = meta_in.get(AlgorithmConstants.SCAFFOLD_CTRL_GLOBAL)
            if global_ctrl:
                scaffold.load_global_controls(global_ctrl)
            c_global, c_local = scaffold.get_params()

            def after_step(m, lr, _g=c_global, _l=c_local):
                scaffold.model_update(m, lr, _g, _l)
        if job.reset_optimizer:
            optimizer = make_optimizer(model, cfg)
        pooled = meta_in.get(CLASS_COUNTS) if job.class_balance == "federation" else None
        t0 = time.perf_counter()
        batch = site_batch_size(cfg.batch_size, len(data.splits["train"]), meta_in) \
            if job.batch_split == "proportional" else cfg.batch_size
        if dp_sgd.enabled:  # Poisson batches at the job's rate (the same share of every site's images)
            batch = None
            train_loader = PoissonLoader(loaders.dataset("train"), dp_sgd.sample_rate, loaders.augmentation)
        else:
            train_loader = loaders.train(seed=derived_seed(cfg.seed, rnd, site), batch_size=batch)
        if private is not None and not private.can_step():
            # the budget is spent: no more training here; the site still validates and says so
            print(f"{site}: privacy budget ε={dp_sgd.epsilon:g} spent after {private.steps} steps: no update in "
                  f"round {rnd}", file=sys.stderr)
            report = {**private.summary(), **privacy_report(private, ledger, k_patient, dp_count_eps)}
            log({"round": rnd, "split": "train", "model": "local", **report})
            meta = {FLMetaKey.NUM_STEPS_CURRENT_ROUND: 0, NUM_SAMPLES: n_sent,
                    **{k: v for k, v in report.items() if k in PUBLIC_DP_KEYS}}
            check_outgoing(policy, meta)
            flare.send(flare.FLModel(params=release(global_state), meta=meta, metrics={
                "val_score": headline(val) if val else float("nan"),
                **{f"val_{k}": v for k, v in flat_scalars(val).items()}, **val_counts,
                **count_metrics}))
            continue
        stats = train_epochs(model, train_loader, round_cfg, optimizer=optimizer,
                             extra_loss=extra_loss, after_step=after_step,
                             class_counts=torch.tensor(pooled) if pooled else None, present=present,
                             distiller=Distiller(teacher.logits, job.distillation()) if teacher else None,
                             private=private)
        if job.bn_statistics == "pooled":  # this site's exact moments under its new weights: the server pools them
            estimate_bn_statistics(model, loaders.eval("train"), job.bn_images)
        # counts and algorithm state, never data
        meta = {FLMetaKey.NUM_STEPS_CURRENT_ROUND: stats["steps"], NUM_SAMPLES: n_sent}
        if scaffold is not None:
            g = create_model(job.model, pretrained=False, **job.model_kwargs)
            g.load_state_dict(global_state)
            scaffold.terms_update(model, optimizer.param_groups[0]["lr"], c_global, c_local, g)
            meta[AlgorithmConstants.SCAFFOLD_CTRL_DIFF] = scaffold.get_delta_controls()
        # (5) send the update: weights, sample count and scalar metrics only
        params = {k: v.detach().cpu() for k, v in model.state_dict().items()}
        dp_info = {}
        if dp.enabled:
            params, dp_info = privatize_update(params, global_state, dp, rnd)
        elif private is not None:
            dp_info = {**{k: v for k, v in stats.items() if k.startswith("dp_")},
                       **privacy_report(private, ledger, k_patient, dp_count_eps)}
        # only the data-independent accounting leaves the site: the update's norm and clip scale stay in
        # the local log (they would tell the server the unclipped update's size)
        meta.update({k: dp_info[k] for k in PUBLIC_DP_KEYS if k in dp_info})
        check_outgoing(policy, meta)
        released = params
        log({"round": rnd, "split": "train", "model": "local", **stats, **dp_info, "norm": norm, "batch_size": batch,
             "lr": optimizer.param_groups[0]["lr"], "class_balance": "federation" if pooled else "site",
             "train_seconds": time.perf_counter() - t0,
             "released_sha256": weights_digest(params) if private_any else None})  # local log: for the audit
        corrupt = rnd == args.corrupt_at_round and site == args.corrupt_site
        if corrupt:  # what this site's DP mechanism did not produce: never in its release ledger
            params = {k: torch.full_like(v, float("nan")) if v.is_floating_point() else v
                      for k, v in params.items()}
        if secure is not None:  # only the masked, sample-weighted update leaves: the server sees nothing else of it
            delta = {k: v.double().numpy() - global_state[k].double().numpy() for k, v in params.items()}
            job_id = secure.job_identity(flare.get_job_id(), meta_in.get(SESSION))
            try:
                masked = secure.mask(delta, float(n_sent), job_id, rnd, meta_in.get(PUBLIC_KEYS))
                params = {k: torch.from_numpy(v) for k, v in masked.items()}
            except SecureAggregationError as exc:  # refused here: the round goes on without this site
                print(f"{site}: round {rnd}: {exc}", file=sys.stderr)
                flare.send(flare.FLModel(params={}, meta={REFUSED: str(exc), FLMetaKey.NUM_STEPS_CURRENT_ROUND: 0}))
                continue
            meta[SECURE_META] = True
        metrics = {"val_score": headline(val) if val else float("nan"),
                   **({} if private_any else {"train_loss": stats["loss"]}),  # a training-data scalar: not under DP
                   **{f"val_{k}": v for k, v in flat_scalars(val).items()}, **val_counts,
                   **count_metrics}
        flare.send(flare.FLModel(params=params if corrupt else release(params), metrics=metrics, meta=meta))


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main(sys.argv[1:])
