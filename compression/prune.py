"""Structured channel pruning that physically removes channels, a short fine-tune, and a loadable format.

Pruning uses torch-pruning's dependency graph (coupled channels across residual adds, depthwise
convs and BatchNorms are removed together) with L2 group-magnitude importance, in small uniform
steps until the MACs fall to ``target_macs_ratio`` of the original.

A pruned model no longer matches ``create_model(...)`` shapes. Its checkpoint stays a normal
``fedbrain-checkpoint/1`` file whose model card records the layer sizes (``card.pruned["layers"]``);
:func:`fedbrain.checkpoint.load_checkpoint` rebuilds it (see that module, which owns the format).
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn

from fedbrain.checkpoint import ModelCard
from fedbrain.contract import Preprocessing
from fedbrain.models import count_macs, count_parameters

# ---------------------------------------------------------------- pruning


def _head_layers(model: nn.Module, num_classes: int) -> list[nn.Module]:
    """Output layers (their out-features are the classes): never pruned."""
    return [m for m in model.modules() if isinstance(m, nn.Linear) and m.out_features == num_classes]


def prune_channels(model: nn.Module, pre: Preprocessing, target_macs_ratio: float = 0.55,
                   round_to: int | None = 16, step: float = 0.02, max_ratio: float = 0.9,
                   num_classes: int | None = None) -> dict:
    """Prune ``model`` in place until its MACs are ``<= target_macs_ratio`` of the original.

    Every prunable layer loses the same fraction of channels per step (local, uniform pruning with
    L2 group-magnitude importance), so no layer is emptied. Channel counts are kept multiples of
    ``round_to``: ONNX Runtime's fp32 convolutions work in blocks of 16 channels (AVX-512), and an
    unrounded pruned fedbrain_cnn (17, 23, ... channels) ran 1.4x SLOWER than the unpruned one,
    while ``round_to=16`` ran 2.1x faster at the same MACs. Returns a summary (params and MACs
    before and after, the channel ratio reached).
    """
    import torch_pruning as tp

    if not 0.0 < target_macs_ratio < 1.0:
        raise ValueError(f"target_macs_ratio must be in (0, 1), got {target_macs_ratio}")
    model.eval()
    num_classes = num_classes or _infer_num_classes(model, pre)
    example = torch.zeros(1, pre.channels, pre.image_size, pre.image_size)
    macs0, params0 = count_macs(model, pre), count_parameters(model)
    widths0 = conv_widths(model)
    # GroupNorm: torch-pruning keeps its number of groups and prunes whole groups, which no multiple of
    # round_to satisfies; prune it as one group, then give it groups of its original size again
    group_sizes = {m: m.num_channels // m.num_groups for m in model.modules() if isinstance(m, nn.GroupNorm)}
    for m in group_sizes:
        m.num_groups = 1
    steps = max(1, int(round(max_ratio / step)))
    pruner = tp.pruner.MetaPruner(
        model, example, importance=tp.importance.GroupMagnitudeImportance(p=2),
        pruning_ratio=max_ratio, iterative_steps=steps, ignored_layers=_head_layers(model, num_classes),
        global_pruning=False, round_to=round_to,
    )
    ratio, macs = 0.0, macs0
    for i in range(steps):
        pruner.step()
        ratio = max_ratio * (i + 1) / steps
        macs = count_macs(model, pre)
        if macs <= target_macs_ratio * macs0:
            break
    else:
        raise RuntimeError(f"could not reach {target_macs_ratio:.0%} of the MACs (got {macs / macs0:.0%})")
    for m, size in group_sizes.items():
        m.num_groups = m.num_channels // size if m.num_channels % size == 0 else math.gcd(m.num_channels, size)
    with torch.no_grad():
        out = model(example)
    if out.shape != (1, num_classes):
        raise RuntimeError(f"pruning changed the output shape to {tuple(out.shape)}")
    return {"target_macs_ratio": target_macs_ratio, "channel_ratio": round(ratio, 4), "round_to": round_to,
            "params_before": params0, "params_after": count_parameters(model),
            "macs_before": macs0, "macs_after": macs, "widths_before": widths0,
            "widths_after": conv_widths(model)}


def conv_widths(model: nn.Module) -> list[int]:
    """Output channels of the dense (non-depthwise) convolutions, consecutive repeats collapsed."""
    out: list[int] = []
    for m in model.modules():
        if isinstance(m, nn.Conv2d) and m.groups == 1 and (not out or out[-1] != m.out_channels):
            out.append(int(m.out_channels))
    return out


def _infer_num_classes(model: nn.Module, pre: Preprocessing) -> int:
    model.eval()
    with torch.no_grad():
        return int(model(torch.zeros(1, pre.channels, pre.image_size, pre.image_size)).shape[1])


def prune_copy(model: nn.Module, pre: Preprocessing, **kw) -> tuple[nn.Module, dict]:
    """A pruned deep copy of ``model`` (the original is untouched) and the summary."""
    pruned = copy.deepcopy(model)
    info = prune_channels(pruned, pre, **kw)
    return pruned, info


def magnitude_sparsify(model: nn.Module, amount: float = 0.5) -> dict:
    """Unstructured global L1 magnitude pruning (zeros weights in place; shapes unchanged).

    Offered for comparison only: a dense file stays the same size and dense kernels run no
    faster. The returned dict says so with numbers (zeros, dense bytes, zlib-compressed bytes).
    """
    import io
    import zlib

    from torch.nn.utils import prune as tprune

    params = [(m, "weight") for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    tprune.global_unstructured(params, pruning_method=tprune.L1Unstructured, amount=amount)
    for m, name in params:
        tprune.remove(m, name)
    total = sum(m.weight.numel() for m, _ in params)
    zeros = sum(int((m.weight == 0).sum()) for m, _ in params)
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    dense = buf.getvalue()
    return {"amount": amount, "weights": total, "zeros": zeros, "dense_bytes": len(dense),
            "zlib_bytes": len(zlib.compress(dense, 6)),
            "note": "unstructured sparsity: dense file size and dense-kernel latency are unchanged"}


# ---------------------------------------------------------------- fine-tune


def finetune(model: nn.Module, loader, epochs: int = 2, lr: float = 1e-3, weight_decay: float = 1e-4,
             seed: int = 0, val_loader=None, progress: bool = False, teacher: nn.Module | None = None,
             distil_weight: float = 0.0) -> dict:
    """A short fine-tune on local data: AdamW, one cosine schedule over all epochs, the class-weighted
    partial-label loss of training. With ``val_loader`` the epoch with the best validation headline
    (macro-F1, else tumour AUROC) is kept, as in training; the model ends in eval mode.

    ``teacher`` (the unpruned model) with ``distil_weight`` > 0: the pruned model also learns the unpruned one's
    soft labels, which carry every class even where the fine-tune site has no label for one (a hospital without
    healthy scans would otherwise unlearn ``no_tumor``)."""
    from fedbrain.distillation import DistillConfig, Distiller
    from fedbrain.training import TrainConfig, train_keep_best

    if epochs <= 0:
        return {"epochs": 0}
    torch.manual_seed(seed)
    cfg = TrainConfig(epochs=epochs, lr=lr, weight_decay=weight_decay, seed=seed)
    distiller = None
    if teacher is not None and distil_weight > 0:
        teacher.eval()

        @torch.no_grad()
        def soft(x: torch.Tensor) -> torch.Tensor:
            return teacher.to(x.device)(x)

        distiller = Distiller(soft, DistillConfig(weight=distil_weight))
    best, _score, history = train_keep_best(model, lambda _epoch: loader, cfg, val_loader=val_loader,
                                            progress="fine-tune" if progress else None, distiller=distiller)
    model.load_state_dict(best)
    model.to("cpu", memory_format=torch.contiguous_format).eval()  # export and int8 calibration run on the CPU
    if teacher is not None:
        teacher.to("cpu")
    return {"epochs": epochs, "lr": lr, "distil_weight": distil_weight if distiller else 0.0,
            "selected_by": "val headline" if val_loader is not None else "train loss",
            "best_epoch": max(history, key=lambda h: h["val_score"])["epoch"], "history": history}


# ---------------------------------------------------------------- storage


def pruned_card(card: ModelCard, prune_info: dict) -> ModelCard:
    """The card of a pruned variant (:func:`fedbrain.checkpoint.save_checkpoint` records its layer sizes)."""
    return card.replace(variant="pruned", pruned=dict(prune_info), metrics={})
