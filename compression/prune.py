"""Structured channel pruning that physically removes channels, a short fine-tune, and a loadable format.

Pruning uses torch-pruning's dependency graph (coupled channels across residual adds, depthwise
convs and BatchNorms are removed together) with L2 group-magnitude importance, in small uniform
steps until the MACs fall to ``target_macs_ratio`` of the original.

A pruned model no longer matches ``create_model(...)`` shapes. Its checkpoint stays a normal
``fedbrain-checkpoint/1`` file (same model name and kwargs, weights as a plain state dict) and
records the layer sizes in ``extra["pruned"]["layers"]``: ``{module name: {"type": "Conv2d",
"in_channels": .., "out_channels": .., "groups": ..}}`` (``BatchNorm2d``: ``num_features``;
``Linear``: ``in_features``/``out_features``). :func:`load_model` rebuilds the registry model,
shrinks those layers (:func:`shrink_to`) and loads the weights strictly, all ``weights_only``-safe.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch import nn

from fedbrain.checkpoint import CheckpointError, save_checkpoint
from fedbrain.contract import Preprocessing
from fedbrain.models import count_macs, count_parameters

PRUNED_KEY = "pruned"

_DIMS: dict[type, tuple[str, ...]] = {
    nn.Conv2d: ("in_channels", "out_channels", "groups"),
    nn.BatchNorm2d: ("num_features",),
    nn.Linear: ("in_features", "out_features"),
}


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
             seed: int = 0, val_loader=None, progress: bool = False) -> dict:
    """A short fine-tune on local data: AdamW, one cosine schedule over all epochs, the class-weighted
    partial-label loss of training. With ``val_loader`` the epoch with the best validation headline
    (macro-F1, else tumour AUROC) is kept, as in training; the model ends in eval mode."""
    from fedbrain.training import TrainConfig, train_keep_best

    if epochs <= 0:
        return {"epochs": 0}
    torch.manual_seed(seed)
    cfg = TrainConfig(epochs=epochs, lr=lr, weight_decay=weight_decay, seed=seed)
    best, _score, history = train_keep_best(model, lambda _epoch: loader, cfg, val_loader=val_loader,
                                            progress="fine-tune" if progress else None)
    model.load_state_dict(best)
    model.eval()
    return {"epochs": epochs, "lr": lr, "selected_by": "val headline" if val_loader is not None else "train loss",
            "best_epoch": max(history, key=lambda h: h["val_score"])["epoch"], "history": history}


# ---------------------------------------------------------------- storage


def layer_shapes(model: nn.Module) -> dict[str, dict]:
    """Sizes of every Conv2d / BatchNorm2d / Linear, by module name (what :func:`shrink_to` needs)."""
    out = {}
    for name, m in model.named_modules():
        attrs = _DIMS.get(type(m))
        if attrs:
            out[name] = {"type": type(m).__name__, **{a: int(getattr(m, a)) for a in attrs}}
    return out


def shrink_to(model: nn.Module, shapes: dict[str, dict]) -> nn.Module:
    """Replace the layers of a freshly built model with ones of the recorded sizes (in place)."""
    for name, spec in shapes.items():
        try:
            m = model.get_submodule(name)
        except AttributeError as exc:
            raise CheckpointError(f"pruned layer {name!r} does not exist in the rebuilt model") from exc
        if type(m).__name__ != spec.get("type"):
            raise CheckpointError(f"pruned layer {name!r} is a {type(m).__name__}, "
                                  f"checkpoint says {spec.get('type')}")
        attrs = _DIMS[type(m)]
        if all(int(getattr(m, a)) == int(spec[a]) for a in attrs):
            continue
        if isinstance(m, nn.Conv2d):
            new: nn.Module = nn.Conv2d(spec["in_channels"], spec["out_channels"], m.kernel_size, m.stride,
                                       m.padding, m.dilation, spec["groups"], bias=m.bias is not None,
                                       padding_mode=m.padding_mode)
        elif isinstance(m, nn.BatchNorm2d):
            new = nn.BatchNorm2d(spec["num_features"], eps=m.eps, momentum=m.momentum, affine=m.affine,
                                 track_running_stats=m.track_running_stats)
        else:
            new = nn.Linear(spec["in_features"], spec["out_features"], bias=m.bias is not None)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, new)
    return model


def save_pruned_checkpoint(path: str | Path, model: nn.Module, meta: dict, prune_info: dict,
                           extra: dict | None = None, metrics: dict | None = None) -> Path:
    """Write a pruned model as a fedbrain checkpoint whose ``extra["pruned"]`` makes it loadable."""
    return save_checkpoint(
        path, model, meta["model"]["name"], meta["preprocessing"], meta["supervised_granularity"],
        label_schemes=meta.get("label_schemes"), model_kwargs=meta["model"].get("kwargs"),
        training=meta.get("training"), metrics=metrics or {},
        extra={**(extra or {}), "variant": "pruned",
               PRUNED_KEY: {**prune_info, "layers": layer_shapes(model)}},
    )


def load_model(path: str | Path) -> tuple[nn.Module, dict]:
    """Load any fedbrain checkpoint, pruned or not (see :func:`fedbrain.checkpoint.load_checkpoint`)."""
    from fedbrain.checkpoint import load_checkpoint

    return load_checkpoint(path)
