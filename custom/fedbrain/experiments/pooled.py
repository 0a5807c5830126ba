"""The non-federated modes over the training core: centralised (all sites pooled) and local-only (one site)."""

from __future__ import annotations

import time
from pathlib import Path

from fedbrain import calibration
from fedbrain.checkpoint import save_checkpoint, training_card
from fedbrain.contract import augmentation_policy
from fedbrain.data.dataset import SiteLoaders, pooled_site, site_loaders
from fedbrain.data.federation import Federation
from fedbrain.distillation import DistillConfig, Distiller, Teacher
from fedbrain.evaluation import UNION, evaluate_everywhere, site_separability
from fedbrain.features import feature_cache
from fedbrain.fl.metrics import class_recalls
from fedbrain.input_check import build_profile
from fedbrain.models import apply_finetune, create_model, default_preprocessing, weights_source
from fedbrain.runs import MetricsLog, RunDir
from fedbrain.status import FAILED, FINISHED, STOPPED, StatusWriter, headline_of
from fedbrain.training import (
    TrainConfig,
    derived_seed,
    predict_proba,
    resolve_device,
    seed_everything,
    train_keep_best,
)


def train_pooled(
    fed: Federation,
    model_name: str,
    cfg: TrainConfig,
    run: RunDir,
    sites: list[str] | None = None,
    image_size: int | None = None,
    pretrained: bool | None = None,
    model_kwargs: dict | None = None,
    cache_dir: Path | None = None,
    progress: bool = True,
    finetune: str = "all",
    teacher: str | Path | None = None,
    distill: DistillConfig | None = None,
) -> dict:
    """Centralised (all ``sites`` pooled) or local-only (one site) training with validation-based selection.

    Evaluates the best checkpoint on every site's test split and on the union of them; writes the run's
    checkpoints, metrics and results. ``teacher``: a model file whose soft labels the loss mixes in (``distill``).
    """
    seed_everything(cfg.seed)
    names = sites or list(fed.sites)
    unknown = set(names) - set(fed.sites)
    if unknown:
        raise KeyError(f"unknown site(s) {sorted(unknown)}; this federation has {list(fed.sites)}")
    pre = default_preprocessing(model_name, image_size)
    model = create_model(model_name, pretrained=pretrained, **(model_kwargs or {}))
    tuned = apply_finetune(model, model_name, finetune)
    train_site = pooled_site("+".join(names), [fed.sites[n] for n in names])
    if not train_site.splits["train"]:
        raise ValueError(f"no training images at {names}")
    pool = SiteLoaders(train_site, pre, cfg.batch_size, cache_dir=cache_dir,
                       augmentation=augmentation_policy(cfg.augmentation))
    pool.features = feature_cache(model, model_name, finetune, pool.augmentation, cfg.feature_cache,
                                  "distillation" if teacher else "", cache_dir)
    every = site_loaders(fed.sites, pre, cfg.batch_size, cache_dir, union=UNION)
    card = training_card(model_name, model_kwargs, image_size, {n: fed.sites[n].scheme for n in names},
                         {**cfg.to_dict(), "mode": "pooled", "sites": names, "finetune": finetune,
                          "weights": weights_source(model), "trainable_params": tuned["trainable_params"],
                          "augmentation": pool.augmentation.to_dict()})
    guide = None
    if teacher:
        guide = Teacher(teacher, pre, resolve_device(cfg.device))
        distill = distill or DistillConfig()
        card = card.replace(training={**card.training, "distil_from": str(teacher), "distil_weight": distill.weight,
                                      "distil_temperature": distill.temperature, "teacher": guide.describe()})
    log = MetricsLog.of(run)
    status = StatusWriter(run, kind="centralized" if len(names) > 1 else "local", model=model_name, done=0,
                          total=cfg.epochs, unit="epoch", sites={n: {} for n in names})
    try:
        return _train(run, model, model_name, cfg, pool, every, card, log, status, train_site, progress,
                      Distiller(guide.logits, distill) if guide else None)
    except BaseException as exc:
        status.finish(STOPPED if isinstance(exc, KeyboardInterrupt) else FAILED, error=f"{type(exc).__name__}: {exc}")
        raise


def _train(run, model, model_name, cfg, pool, every, card, log, status, train_site, progress,
           distiller=None) -> dict:
    def on_epoch(epoch: int, stats: dict, val: dict, score: float) -> None:
        status.progress(epoch + 1, cfg.epochs)
        log.log(epoch + 1, train_site.name, "train", stats)
        if val:
            log.log(epoch + 1, train_site.name, "val", {**val, **class_recalls(val)})
        if progress:
            print(f"epoch {epoch + 1:>3}/{cfg.epochs}  loss {stats['loss']:.4f}  val {score:.4f}  "
                  f"{stats['images_per_s']:.0f} img/s", flush=True)

    t0 = time.perf_counter()
    best, best_score, history = train_keep_best(
        model, lambda epoch: pool.train(seed=derived_seed(cfg.seed, epoch, train_site.name)), cfg,
        val_loader=pool.eval("val") if train_site.splits["val"] else None, on_epoch=on_epoch,
        progress="epoch" if progress else None, distiller=distiller)
    train_seconds = time.perf_counter() - t0
    save_checkpoint(run.last, model, card)
    if best is not None:
        model.load_state_dict(best)
    if train_site.splits["val"]:  # calibration fitted on the pooled validation split
        probs, targets = predict_proba(model, pool.eval("val"))
        card = card.replace(calibration=calibration.fit(probs, targets, f"pooled validation split of "
                                                        f"{train_site.name} ({len(targets)} images)"))
    profile = build_profile(pool.dataset("train").images, f"training split of {train_site.name}")
    card = card.replace(extra={**card.extra, "input_profile": profile})
    results = evaluate_everywhere(model, every, calibrator=card.calibrator)
    for name, m in results.items():
        log.log(cfg.epochs, name, "test", m, checkpoint="best")
    log.close()
    save_checkpoint(run.best, model, card.replace(metrics={"test": results, "val_score": best_score}))
    out = {"test": results, "history": history, "train_seconds": train_seconds, "best_val_score": best_score,
           "site_probe": site_separability(model, model_name, every)}
    run.write_results(out)
    status.finish(FINISHED, headline=headline_of(results.get(UNION)))
    return out


__all__ = ["train_pooled"]
