"""One training core for every mode (centralised, local-only, federated). Knows nothing of NVFlare."""

from __future__ import annotations

import contextlib
import hashlib
import math
import random
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, fields
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fedbrain.contract import CLASSES, DEFAULT_AUGMENTATION, NO_TUMOR, NUM_CLASSES, TUMOUR_ANY, TUMOUR_CLASSES
from fedbrain.models import batchnorms

if TYPE_CHECKING:
    from fedbrain.dp import PrivateTraining


@dataclass
class TrainConfig:
    epochs: int = 10
    batch_size: int = 32
    lr: float = 2e-3
    weight_decay: float = 1e-4
    optimizer: str = "adamw"  # adamw | sgd
    momentum: float = 0.9  # SGD's momentum (0: plain SGD steps, e.g. for a server-side optimiser)
    label_smoothing: float = 0.0
    class_weighting: bool = True  # inverse-frequency weights: sites are skewed
    seed: int = 0
    threads: int | None = None
    device: str = "auto"  # auto (CUDA when present, else CPU) | cpu | cuda | cuda:N
    steps: int | None = None  # optimiser steps per call of train_epochs (reshuffling as needed), instead of epochs
    # (0 or None: epochs)
    augmentation: str = DEFAULT_AUGMENTATION  # the train-only augmentation policy (contract.AUGMENTATIONS)
    feature_cache: bool = True  # finetune "head" without augmentation: the head trains on cached trunk features

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        return cls(**{k: v for k, v in d.items() if k in {f.name for f in fields(cls)}})


DEVICE_HELP = "auto (CUDA when present, else the CPU), cpu, cuda or cuda:N"


def resolve_device(name: str | None = "auto") -> torch.device:
    """The one device rule: ``auto`` is the first CUDA device when one is present, else the CPU; asking for CUDA
    where there is none is an error (never a silent CPU run)."""
    name = name or "auto"
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise ValueError(f"device must be {DEVICE_HELP}, not {name!r}") from exc
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {name!r} asked for, but this machine has no usable CUDA device "
                             "(use --device auto or cpu)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"device {name!r}: only {torch.cuda.device_count()} CUDA device(s) here")
    elif device.type != "cpu":
        raise ValueError(f"device must be {DEVICE_HELP}, not {name!r}")
    return device


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """Mixed precision on CUDA: bf16 where the GPU has it, else fp16; None (fp32) on the CPU."""
    if device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def autocast(device: torch.device):
    """``torch.autocast`` at :func:`autocast_dtype` on CUDA; a no-op on the CPU."""
    import contextlib

    dtype = autocast_dtype(device)
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


def place(model: nn.Module, device: torch.device) -> nn.Module:
    """Move a model to ``device``: channels-last on CUDA (faster convolutions with tensor cores)."""
    model.to(device)
    if device.type == "cuda":
        model.to(memory_format=torch.channels_last)
    return model


def to_device(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host batch on ``device``: pinned and copied asynchronously, channels-last for images, on CUDA."""
    if device.type != "cuda":
        return x.to(device)
    x = x.pin_memory().to(device, non_blocking=True)
    return x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x


def model_device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def derived_seed(seed: int, step: int, site: str = "") -> int:
    """The data-order seed of one epoch or round (``step``) at one site: a hash of (seed, step, site), so no two
    (seed, step) pairs share an order (``seed + step`` made seed 1's epoch 0 seed 0's epoch 1)."""
    digest = hashlib.blake2b(f"{int(seed)}:{int(step)}:{site}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> 1  # 63 bits: a valid torch.Generator seed


def validation_points(total: int, candidates: int) -> list[int]:
    """After how many of ``total`` epochs or rounds the model is validated (and may be kept as the best):
    ``candidates`` points spread evenly, the last one always ``total`` (the final model). Centralised training
    validates every epoch; a federation gets as many candidates as centralised has epochs at its budget
    (``candidates`` <= 0 or >= ``total``: every one)."""
    if total <= 0:
        return []
    n = total if candidates <= 0 else min(candidates, total)
    return [-(-total * (i + 1) // n) for i in range(n)]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)


def partial_label_loss(logits: torch.Tensor, targets: torch.Tensor, weight: torch.Tensor | None = None,
                       label_smoothing: float = 0.0, present: torch.Tensor | None = None,
                       normalise: str = "weights") -> torch.Tensor:
    """Cross-entropy where target 4 means 'some tumour': -log(p_glioma + p_meningioma + p_pituitary).

    With ``weight``: the weighted sum over the batch divided by the batch's weight sum (``"weights"``, as
    PyTorch's weighted cross-entropy) or by the batch size (``"count"``: for a site's share of a federation-wide
    batch, whose weights have mean 1 over the pooled data).

    ``present`` (bool, one per class): a restricted softmax over the classes this data can show, so a site
    without healthy scans does not push the no_tumor logit down (the model's outputs are not changed).
    """
    if present is not None:
        logits = logits.masked_fill(~present.to(logits.device), -1e4)
    logp = F.log_softmax(logits, dim=1)
    known = targets < NUM_CLASSES
    safe = torch.where(known, targets, torch.zeros_like(targets))
    nll_known = -logp.gather(1, safe.unsqueeze(1)).squeeze(1)
    if label_smoothing:
        nll_known = (1 - label_smoothing) * nll_known - label_smoothing * logp.mean(dim=1)
    nll_tumour = -torch.logsumexp(logp[:, list(TUMOUR_CLASSES)], dim=1)
    loss = torch.where(known, nll_known, nll_tumour)
    if weight is not None:
        w = weight[targets]
        if normalise == "count":
            return (loss * w).mean()
        return (loss * w).sum() / w.sum().clamp_min(1e-8)
    return loss.mean()


def target_counts(targets: torch.Tensor) -> torch.Tensor:
    """How many targets of each of the 5 kinds (4 classes + 'some tumour')."""
    return torch.bincount(targets, minlength=NUM_CLASSES + 1).float()


def class_weights(targets: torch.Tensor | None = None, counts: torch.Tensor | None = None) -> torch.Tensor:
    """Inverse-frequency weights over the 5 target kinds (4 classes + 'some tumour'), mean 1 over present ones.

    ``counts`` (e.g. the federation's pooled counts) replaces the counts of ``targets``."""
    counts = target_counts(targets) if counts is None else torch.as_tensor(counts, dtype=torch.float32)
    w = torch.where(counts > 0, counts.sum() / (counts.clamp_min(1) * (counts > 0).sum()), torch.zeros_like(counts))
    return w


def present_classes(targets: torch.Tensor) -> torch.Tensor:
    """Which of the 4 classes a set of targets can show ('some tumour' stands for every tumour type)."""
    counts = target_counts(targets)
    present = counts[:NUM_CLASSES] > 0
    if counts[TUMOUR_ANY] > 0:
        present[list(TUMOUR_CLASSES)] = True
    return present


@torch.no_grad()
def estimate_bn_statistics(model: nn.Module, loader: Iterable, max_images: int | None = None) -> int:
    """Replace every trainable BatchNorm's running statistics by the exact mean and (unbiased) variance of its
    inputs over ``loader`` (no grad; earlier layers normalise by batch statistics, as in training).

    Returns the number of images used. The model's weights and mode are unchanged otherwise."""
    # frozen blocks (fine-tuning) keep their own statistics, e.g. ImageNet's
    layers = [m for m in batchnorms(model) if not list(m.parameters()) or any(p.requires_grad for p in m.parameters())]
    if not layers:
        return 0
    if getattr(loader, "head", None) is not None:
        raise ValueError("BatchNorm statistics need images, and this loader gives cached trunk features")
    sums: dict[nn.Module, list] = {m: [0.0, 0.0, 0] for m in layers}

    def hook(m: nn.Module, inputs) -> None:
        x = inputs[0].detach().double()
        dims = [d for d in range(x.dim()) if d != 1]
        acc = sums[m]
        acc[0] = acc[0] + x.sum(dims)
        acc[1] = acc[1] + (x * x).sum(dims)
        acc[2] += x.numel() // x.shape[1]

    handles = [m.register_forward_pre_hook(hook) for m in layers]
    was_training = model.training
    model.train()
    device, n = model_device(model), 0
    try:
        for x, _ in loader:
            model(x.to(device))
            n += len(x)
            if max_images and n >= max_images:
                break
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    for m, (s1, s2, count) in sums.items():
        if count > 1 and m.running_mean is not None:
            mean = s1 / count
            var = (s2 / count - mean * mean).clamp_min(0) * count / (count - 1)
            m.running_mean.copy_(mean.to(m.running_mean.dtype))
            m.running_var.copy_(var.to(m.running_var.dtype))
            m.num_batches_tracked += 1
    return n


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW (or SGD with ``cfg.momentum``) over the trainable parameters (frozen blocks stay out)."""
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def train_epochs(
    model: nn.Module,
    loader: Iterable,
    cfg: TrainConfig,
    epochs: int | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    extra_loss: Callable[[nn.Module], torch.Tensor] | None = None,
    after_step: Callable[[nn.Module, float], None] | None = None,
    lr_schedule: Callable[[int, int], float] | None = None,
    progress: str | None = None,
    class_counts: torch.Tensor | None = None,
    present: torch.Tensor | None = None,
    distiller: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    private: PrivateTraining | None = None,
) -> dict:
    """Train in place for ``epochs`` (or ``cfg.steps`` optimiser steps); returns loss, samples, steps, images/s.

    ``extra_loss`` adds a term (FedProx's proximal term), ``after_step`` runs after each optimizer
    step with the current lr (SCAFFOLD's correction), ``lr_schedule(step, total)`` scales the lr.
    ``class_counts`` (5 kinds) sets the class weights instead of the loader's own targets (the federation's
    pooled counts); ``present`` restricts the softmax to the classes the data can show.
    ``distiller(logits, x)`` is a distillation term against a frozen teacher on the (augmented) batch, mixed in
    with its ``weight`` (:class:`fedbrain.distillation.Distiller`).
    ``private`` trains by DP-SGD (:class:`fedbrain.dp.PrivateTraining`; ``loader`` should be a
    :class:`~fedbrain.data.dataset.PoissonLoader`): per-image clipping and noise, every step accounted, and training
    stops (``budget_spent``) before a step that would overspend the budget.
    A loader of cached trunk features (its ``head`` set, :mod:`fedbrain.features`) trains the model's head on them.
    """
    epochs = cfg.epochs if epochs is None else epochs
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = resolve_device(cfg.device)
    place(model, device)
    optimizer = optimizer or make_optimizer(model, cfg)
    if private is not None:
        if extra_loss is not None:
            raise ValueError("DP-SGD clips per-image gradients: a model-level loss term (FedProx) would escape it")
        optimizer = private.wrap(optimizer)
    # mixed precision is left out under DP-SGD (Opacus' per-image gradients are computed in float32)
    mixed = private is None
    scaler = torch.amp.GradScaler("cuda") if mixed and autocast_dtype(device) == torch.float16 else None
    forward = _forward(model, loader)
    if distiller is not None and forward is not model:
        raise ValueError("distillation needs the images: the loader gives cached trunk features")
    targets = getattr(getattr(loader, "ds", None), "targets", None)
    weight = None
    if cfg.class_weighting and (class_counts is not None or targets is not None):
        weight = class_weights(targets, class_counts).to(device)
    base_lrs = [g["lr"] for g in optimizer.param_groups]
    total_steps = cfg.steps if cfg.steps else max(1, epochs * len(loader))
    step = 0
    seen, loss_sum, kd_sum = 0, 0.0, 0.0
    model.train()
    t0 = time.perf_counter()
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=total_steps, desc=progress, unit="batch", leave=False, disable=None)
    budget_spent = False
    for x, y in _batches(loader, epochs, cfg.steps):
        if private is not None and not private.can_step():
            budget_spent = True
            break
        if lr_schedule:
            for g, base in zip(optimizer.param_groups, base_lrs, strict=True):
                g["lr"] = base * lr_schedule(step, total_steps)
        x, y = to_device(x, device), to_device(y, device)
        with autocast(device) if mixed else contextlib.nullcontext():
            logits = forward(x).float()
        # with the federation's counts, each site's batch is part of one pooled batch: normalise by the batch
        # size (E[w] = 1 over the pooled data), not by this batch's own weight sum, which would undo the
        # up-weighting of a class that lives at one site (sartaj's healthy scans). Under DP-SGD always by the
        # count: each image's gradient must depend on that image alone
        loss = partial_label_loss(logits, y, weight, cfg.label_smoothing, present,
                                  normalise="count" if class_counts is not None or private else "weights")
        if distiller is not None:
            with autocast(device) if mixed else contextlib.nullcontext():
                kd = distiller(logits, x)
            loss = (1 - distiller.weight) * loss + distiller.weight * kd
            kd_sum += kd.item() * len(y)
        if extra_loss is not None:
            loss = loss + extra_loss(model)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite training loss at step {step}")
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:  # fp16 autocast: scaled gradients
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        if private is not None:
            private.record_step()
        if after_step is not None:
            after_step(model, optimizer.param_groups[0]["lr"])
        seen += len(y)
        loss_sum += loss.item() * len(y)
        step += 1
        if bar:
            bar.update(1)
            bar.set_postfix(loss=f"{loss_sum / seen:.3f}")
    if bar:
        bar.close()
    for g, base in zip(optimizer.param_groups, base_lrs, strict=True):
        g["lr"] = base
    elapsed = time.perf_counter() - t0
    out = {"loss": loss_sum / max(1, seen), "samples": seen, "steps": step, "seconds": elapsed,
           "images_per_s": seen / elapsed if elapsed > 0 else float("nan")}
    if distiller is not None:
        out["distil_loss"] = kd_sum / max(1, seen)
    if private is not None:
        private.save()
        out.update(private.summary(), dp_stopped_early=budget_spent)
    return out


def _forward(model: nn.Module, loader: Iterable) -> nn.Module:
    """What runs on the loader's batches: the model, or its head where the loader gives cached trunk features."""
    head = getattr(loader, "head", None)
    return model if head is None else head


def _batches(loader: Iterable, epochs: int, steps: int | None):
    """``epochs`` passes over ``loader``, or exactly ``steps`` batches (passing over it again as needed)."""
    if not steps:
        for _ in range(epochs):
            yield from loader
        return
    done = 0
    while done < steps:
        empty = True
        for batch in loader:
            empty = False
            yield batch
            done += 1
            if done >= steps:
                return
        if empty:
            return


WARMUP_FRACTION = 0.05  # centralised training's linear warm-up, as a share of all steps (the server's default too)


def cosine_schedule(warmup_fraction: float = WARMUP_FRACTION) -> Callable[[int, int], float]:
    """The lr's scale at ``step`` of ``total``: a linear warm-up over ``warmup_fraction`` of the steps, then one
    cosine towards 0 at the last step (centralised training per optimiser step; the federated server per round)."""

    def f(step: int, total: int) -> float:
        warm = max(1, int(total * warmup_fraction))
        if step < warm:
            return (step + 1) / warm
        return 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, total - warm)))

    return f


def train_keep_best(
    model: nn.Module,
    loader_for_epoch: Callable[[int], Iterable],
    cfg: TrainConfig,
    val_loader: Iterable | None = None,
    on_epoch: Callable[[int, dict, dict, float], None] | None = None,
    progress: str | None = None,
    distiller: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    validations: int = 0,
) -> tuple[dict | None, float, list[dict]]:
    """``cfg.epochs`` epochs with one optimizer and one cosine schedule across all of them, scoring the epochs of
    :func:`validation_points` (``validations`` of them, 0: every epoch; the last always) by the validation
    headline (or minus the training loss without ``val_loader``).

    Returns ``(best_state, best_score, history)``; the model keeps its last-epoch weights.
    ``on_epoch(epoch, train_stats, val_metrics, score)`` runs after each epoch (logging; score None where the
    epoch was not validated).
    """
    place(model, resolve_device(cfg.device))
    optimizer = make_optimizer(model, cfg)  # its state carries over between epochs
    schedule = cosine_schedule()
    validated = set(validation_points(cfg.epochs, validations))
    best, best_score, history = None, -float("inf"), []
    for epoch in range(cfg.epochs):
        loader = loader_for_epoch(epoch)
        per_epoch = max(1, len(loader))
        total = cfg.epochs * per_epoch
        stats = train_epochs(model, loader, cfg, epochs=1, optimizer=optimizer,
                             lr_schedule=lambda step, _n, start=epoch * per_epoch, total=total:
                             schedule(start + step, total),
                             progress=f"{progress} {epoch + 1}/{cfg.epochs}" if progress else None,
                             distiller=distiller)
        val, score = {}, None
        if epoch + 1 in validated:
            val = evaluate(model, val_loader) if val_loader is not None else {}
            score = headline(val) if val else -stats["loss"]
        history.append({"epoch": epoch + 1, "loss": stats["loss"], "val_score": score,
                        "images_per_s": stats["images_per_s"], "seconds": stats["seconds"]})
        if on_epoch is not None:
            on_epoch(epoch, stats, val, score)
        if score is not None and score > best_score:
            best_score = score
            best = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return best, best_score, history


@torch.no_grad()
def predict_proba(model: nn.Module, loader: Iterable) -> tuple[np.ndarray, np.ndarray]:
    """Class probabilities (N, 4) and targets (N,) over a loader (of images or cached features), in eval mode."""
    model.eval()
    device, forward = model_device(model), _forward(model, loader)
    probs, ys = [], []
    for x, y in loader:
        with autocast(device):
            logits = forward(to_device(x, device))
        probs.append(torch.softmax(logits.float(), dim=1).cpu().numpy())
        ys.append(np.asarray(y))
    if not probs:
        return np.zeros((0, NUM_CLASSES), np.float32), np.zeros(0, np.int64)
    return np.concatenate(probs), np.concatenate(ys)


def _auroc(y: np.ndarray, score: np.ndarray) -> float | None:
    from sklearn.metrics import roc_auc_score

    if len(np.unique(y)) < 2:
        return None
    return float(roc_auc_score(y, score))


ECE_BINS = 15


def calibration_error(confidence: np.ndarray, correct: np.ndarray, bins: int = ECE_BINS) -> float | None:
    """Expected calibration error: the |confidence - accuracy| gap of equal-width confidence bins, weighted by
    each bin's share of the samples (0 = calibrated)."""
    if len(confidence) == 0:
        return None
    idx = np.minimum((np.clip(confidence, 0.0, 1.0) * bins).astype(int), bins - 1)
    # a bin's share x |mean confidence - mean accuracy| = |summed confidence - summed accuracy| / n
    gap = np.bincount(idx, confidence, bins) - np.bincount(idx, np.asarray(correct, float), bins)
    return float(np.abs(gap).sum() / len(confidence))


def compute_metrics(probs: np.ndarray, targets: np.ndarray) -> dict:
    """Metrics on whatever labels are present.

    - 4-class metrics (accuracy, macro-F1 over the classes present, per-class precision/recall,
      confusion matrix, one-vs-rest AUROC) on samples with a known class.
    - tumour-vs-no-tumour accuracy / AUROC on all samples (p_tumour = 1 - p_no_tumor).
    """
    from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, precision_recall_fscore_support

    out: dict = {"n": int(len(targets))}
    if len(targets) == 0:
        return out
    bad = ~np.isfinite(probs).all(axis=1)
    if bad.any():  # a diverged model: its non-finite outputs count as uninformative (uniform) predictions
        probs = probs.copy()
        probs[bad] = 1.0 / probs.shape[1]
        out["non_finite_outputs"] = int(bad.sum())
    pred = probs.argmax(1)
    known = targets < NUM_CLASSES
    # 4-class metrics need tumour types: a tumour/no-tumour set only has 'no_tumor' as a typed label
    if np.isin(targets, TUMOUR_CLASSES).any():
        y, p = targets[known], pred[known]
        present = sorted(set(y.tolist()))
        out["n_typed"] = int(known.sum())
        out["accuracy"] = float(accuracy_score(y, p))
        out["macro_f1"] = float(f1_score(y, p, labels=present, average="macro", zero_division=0))
        prec, rec, f1, sup = precision_recall_fscore_support(y, p, labels=list(range(NUM_CLASSES)), zero_division=0)
        out["per_class"] = {
            CLASSES[c]: {"precision": float(prec[c]), "recall": float(rec[c]), "f1": float(f1[c]),
                         "support": int(sup[c])}
            for c in range(NUM_CLASSES) if sup[c] > 0
        }
        out["confusion_matrix"] = confusion_matrix(y, p, labels=list(range(NUM_CLASSES))).tolist()
        aucs = {CLASSES[c]: _auroc((y == c).astype(int), probs[known, c]) for c in present}
        aucs = {k: v for k, v in aucs.items() if v is not None}
        out["auroc_ovr"] = aucs
        if aucs:
            out["macro_auroc"] = float(np.mean(list(aucs.values())))
        out["ece"] = calibration_error(probs[known].max(1), (p == y).astype(float))
    is_tumour = (targets != NO_TUMOR).astype(int)
    p_tumour = 1.0 - probs[:, NO_TUMOR]
    pred_tumour = (pred != NO_TUMOR).astype(int)
    healthy = targets == NO_TUMOR
    out["n_no_tumor"] = int(healthy.sum())
    if healthy.any():
        out["no_tumor_recall"] = float((pred[healthy] == NO_TUMOR).mean())
    out["tumour_accuracy"] = float((pred_tumour == is_tumour).mean())
    # the tumour probability as a forecast of "tumour": its confidence is max(p, 1 - p)
    out["tumour_ece"] = calibration_error(np.maximum(p_tumour, 1 - p_tumour),
                                          ((p_tumour >= 0.5).astype(int) == is_tumour).astype(float))
    auc = _auroc(is_tumour, p_tumour)
    if auc is not None:
        out["tumour_auroc"] = auc
        from sklearn.metrics import f1_score as f1s

        out["tumour_f1"] = float(f1s(is_tumour, pred_tumour, zero_division=0))
    out["n_tumour_unknown_type"] = int((targets == TUMOUR_ANY).sum())
    return out


def evaluate(model: nn.Module, loader: Iterable) -> dict:
    """Evaluate on a loader (no augmentation): see :func:`compute_metrics`."""
    probs, ys = predict_proba(model, loader)
    return compute_metrics(probs, ys)


def headline(metrics: dict) -> float:
    """The single number we select and compare by: macro-F1 where types are known, else tumour AUROC."""
    if "macro_f1" in metrics:
        return metrics["macro_f1"]
    return metrics.get("tumour_auroc", metrics.get("tumour_accuracy", float("nan")))
