"""A frozen trunk's features, computed once: head-only training on cached pooled features.

With ``finetune = "head"`` and no training augmentation, the trunk's output for an image never changes while its
weights do not, so it is computed once per split (on the training device, batched) and the head trains and
predicts on it. This is exact: frozen blocks always run in eval mode (:func:`fedbrain.models.apply_finetune`), and
what follows the pooled features in training (the model's dropout, then its head) still runs on every batch. The
model itself is unchanged, so its state_dict (frozen trunk + trained head) is what leaves a site.
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import numpy as np
import torch
from torch import nn

from fedbrain.contract import Augmentation
from fedbrain.models import model_info
from fedbrain.training import autocast, model_device, to_device

FEATURE_BATCH = 128  # images per trunk forward pass when the cache is filled


class HeadOnly(nn.Module):
    """What follows the pooled features: the model's dropout before its head (if any), then the head itself (the
    model's own modules, so training this trains the model)."""

    def __init__(self, head: nn.Module, dropout: nn.Module | None = None):
        super().__init__()
        self.dropout = dropout if dropout is not None else nn.Identity()
        self.head = head

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(features))


class Trunk:
    """A model up to its head: the head's input (the pooled features) in eval mode, without gradients."""

    def __init__(self, model: nn.Module, head: nn.Module):
        self.model, self.head = model, head
        head_params = {id(t) for t in [*head.parameters(), *head.buffers()]}
        self._names = [k for k, v in model.state_dict(keep_vars=True).items() if id(v) not in head_params]

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        captured: list[torch.Tensor] = []
        hook = self.head.register_forward_pre_hook(lambda _m, inputs: captured.append(inputs[0]))
        was_training = self.model.training
        self.model.eval()
        try:
            with autocast(x.device):
                self.model(x)
        finally:
            hook.remove()
            self.model.train(was_training)
        return captured[0].float().flatten(1)

    def digest(self) -> str:
        """A digest of every trunk weight and buffer (the head's excluded): features change only with it."""
        h = hashlib.blake2b(digest_size=16)
        state = self.model.state_dict()
        for k in self._names:
            h.update(k.encode())
            h.update(state[k].detach().cpu().contiguous().numpy().tobytes())
        return h.hexdigest()


def split_model(model: nn.Module, name: str) -> tuple[Trunk, HeadOnly]:
    """(trunk, head) of a registry model by its ``model_info(name).blocks``: the head is what
    ``apply_finetune(model, name, "head")`` leaves trainable. Raises ValueError where the modules between the
    blocks and the head hold weights or more than one dropout (the split would not be exact)."""
    blocks, head = model_info(name).blocks(model)
    inside = {id(m) for block in blocks for b in block for m in b.modules()} | {id(m) for m in head.modules()}
    outside = [(n, m) for n, m in model.named_modules() if id(m) not in inside and not list(m.children())]
    stateful = [n for n, m in outside if list(m.parameters(recurse=False)) or list(m.buffers(recurse=False))]
    dropouts = [m for _, m in outside if isinstance(m, nn.modules.dropout._DropoutNd)]
    if stateful or len(dropouts) > 1:
        why = f"{stateful[0]} holds weights outside its blocks" if stateful else "it has several dropouts"
        raise ValueError(f"{name} cannot be split into a frozen trunk and a head: {why}")
    return Trunk(model, head), HeadOnly(head, dropouts[0] if dropouts else None)


def _data_digest(ds) -> str:
    """The pixels and the preprocessing of a split (``SliceDataset``), as one digest."""
    h = hashlib.blake2b(digest_size=16)
    h.update(repr(sorted(ds.pre.to_dict().items())).encode())
    h.update(np.ascontiguousarray(ds.images).tobytes())
    return h.hexdigest()


class FeatureCache:
    """The frozen trunk's pooled features of whole splits, keyed by (model name, trunk digest, preprocessing,
    pixels): kept in memory (only those of the current trunk weights) and, with ``cache_dir``, on disk."""

    def __init__(self, model: nn.Module, name: str, cache_dir: Path | None = None):
        self.trunk, self.head = split_model(model, name)
        self.name, self.cache_dir = name, cache_dir
        self._memory: dict[tuple[str, str], torch.Tensor] = {}
        self._data: dict[int, tuple[object, str]] = {}  # id(dataset) -> (dataset, its digest)
        self.computed = 0  # images whose features were computed (not found in the cache)

    def _key(self, ds) -> tuple[str, str]:
        kept = self._data.get(id(ds))
        if kept is None or kept[0] is not ds:
            kept = self._data[id(ds)] = (ds, _data_digest(ds))
        return self.trunk.digest(), kept[1]

    def _file(self, trunk: str, data: str) -> Path | None:
        if self.cache_dir is None:
            return None
        device = model_device(self.trunk.model).type  # CUDA computes under autocast: its features differ slightly
        key = hashlib.blake2b(f"{self.name}:{device}:{trunk}:{data}".encode(), digest_size=16).hexdigest()
        return Path(self.cache_dir) / "features" / f"{self.name}-{key}.pt"

    def of(self, ds) -> torch.Tensor:
        """The features ``(N, D)`` (on the CPU, float32) of every image of ``ds``, in its order."""
        trunk, data = key = self._key(ds)
        if key in self._memory:
            return self._memory[key]
        self._memory = {k: v for k, v in self._memory.items() if k[0] == trunk}  # older trunk weights: dropped
        file = self._file(trunk, data)
        if file is not None and file.is_file():
            feats = torch.load(file, map_location="cpu", weights_only=True)
        else:
            feats = self._compute(ds)
            if file is not None:
                file.parent.mkdir(parents=True, exist_ok=True)
                tmp = file.with_suffix(".tmp")
                torch.save(feats, tmp)
                tmp.replace(file)
        self._memory[key] = feats
        return feats

    def _compute(self, ds) -> torch.Tensor:
        from fedbrain.data.dataset import make_batch

        device, gen, out = model_device(self.trunk.model), torch.Generator(), []
        for start in range(0, len(ds), FEATURE_BATCH):
            x, _ = make_batch(ds, torch.arange(start, min(start + FEATURE_BATCH, len(ds))), None, gen)
            out.append(self.trunk(to_device(x, device)).cpu())
        self.computed += len(ds)
        return torch.cat(out) if out else torch.zeros(0, 0)


def feature_cache(model: nn.Module, name: str, finetune: str, augmentation: Augmentation, enabled: bool = True,
                  needs_images: str = "", cache_dir: Path | None = None, who: str = "") -> FeatureCache | None:
    """A :class:`FeatureCache` where it is exact (``finetune`` "head", no augmentation, nothing else needing the
    images: ``needs_images`` names what does); else None, and the reason is said once on stderr."""
    why = ""
    if not enabled:
        why = "turned off (train.feature_cache = false)"
    elif finetune != "head":
        why = f"finetune {finetune!r} trains trunk blocks"
    elif augmentation.changes_images:
        why = "the training augmentation changes the images (augmentation = \"none\" allows it)"
    elif needs_images:
        why = f"{needs_images} needs the images"
    cache = None
    if not why:
        try:
            cache = FeatureCache(model, name, cache_dir)
        except ValueError as exc:
            why = str(exc)
    prefix = f"{who}: " if who else ""
    if cache is None:
        print(f"{prefix}feature cache off: {why}; the trunk runs on every batch", file=sys.stderr)
        return None
    print(f"{prefix}feature cache on: the frozen trunk of {name} runs once per split, the head trains on its "
          "features", file=sys.stderr)
    return cache


__all__ = ["FeatureCache", "HeadOnly", "Trunk", "split_model", "feature_cache", "FEATURE_BATCH"]
