"""Grad-CAM for torch classifiers and a heatmap overlay on the greyscale slice (pure functions)."""

from __future__ import annotations

import threading
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image
from torch import nn


def last_conv(model: nn.Module, x: torch.Tensor) -> nn.Conv2d:
    """The last ``Conv2d`` that runs in ``model``'s forward pass with a spatial (> 1x1) output."""
    order: list[nn.Conv2d] = []
    me = threading.get_ident()

    def seen(mod, _i, out):
        if threading.get_ident() == me and out.dim() == 4 and out.shape[-1] * out.shape[-2] > 1:
            order.append(mod)

    hooks = [m.register_forward_hook(seen) for m in model.modules() if isinstance(m, nn.Conv2d)]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in hooks:
            h.remove()
    if not order:
        raise ValueError("Grad-CAM needs a model with a Conv2d layer")
    return order[-1]


def gradcam(model: nn.Module, x: torch.Tensor, target: int | Sequence[int],
            layer: nn.Module | None = None) -> np.ndarray:
    """Grad-CAM heatmap of ``target`` for one input ``x`` (1xCxHxW), as an HxW float array in [0, 1].

    ``target`` is a class index, or several (e.g. all tumour classes). The explained score is the
    log-probability of the target (group) under the softmax, so evidence *for* it is what lights up,
    not evidence that raises every logit alike. All zeros when no region raises the score.
    The model is left in its mode with no hooks and no gradients kept.
    """
    if x.dim() != 4 or x.shape[0] != 1:
        raise ValueError(f"expected one input of shape 1xCxHxW, got {tuple(x.shape)}")
    layer = layer or last_conv(model, x)
    acts: list[torch.Tensor] = []

    me = threading.get_ident()

    def keep(_m, _i, out):
        if threading.get_ident() != me:  # the model may be shared: ignore other threads' forward passes
            return None
        acts.append(out)
        return out.clone()  # later layers get a copy, so an in-place op downstream cannot touch `out`

    handle = layer.register_forward_hook(keep)
    idx = [target] if isinstance(target, int) else list(target)
    try:
        with torch.enable_grad():
            x = x.detach().clone().requires_grad_(True)  # gradients flow even through frozen weights
            logits = model(x)
            score = torch.logsumexp(logits[0, idx], dim=0) - torch.logsumexp(logits[0], dim=0)
            (grad,) = torch.autograd.grad(score, acts[-1])
    finally:
        handle.remove()
    a = acts[-1].detach()[0]
    weights = grad.detach()[0].mean(dim=(1, 2))  # channel importance: spatially averaged gradient
    cam = torch.relu((weights[:, None, None] * a).sum(0))
    cam = torch.nn.functional.interpolate(cam[None, None], size=tuple(x.shape[-2:]), mode="bilinear",
                                          align_corners=False)[0, 0]
    cam = cam.numpy().astype(np.float32)
    hi = float(cam.max())
    return cam / hi if hi > 0 else np.zeros_like(cam)


def _jet(v: np.ndarray) -> np.ndarray:
    """Jet-like colour map: [0, 1] -> RGB uint8 (blue, cyan, yellow, red)."""
    v = np.clip(v, 0, 1)
    r = np.clip(1.5 - np.abs(4 * v - 3), 0, 1)
    g = np.clip(1.5 - np.abs(4 * v - 2), 0, 1)
    b = np.clip(1.5 - np.abs(4 * v - 1), 0, 1)
    return (np.stack([r, g, b], -1) * 255).round().astype(np.uint8)


def overlay(gray: np.ndarray, cam: np.ndarray, alpha: float = 0.45) -> np.ndarray:
    """Blend the heatmap over the HxW uint8 slice (resized to the slice); returns HxWx3 uint8.

    Colour is weighted by the heat, so cold regions keep the original slice.
    """
    if gray.ndim != 2:
        raise ValueError(f"expected an HxW greyscale slice, got shape {gray.shape}")
    h, w = gray.shape
    heat8 = Image.fromarray((np.clip(cam, 0, 1) * 255).astype(np.uint8)).resize((w, h), Image.BILINEAR)
    c = np.asarray(heat8, dtype=np.float32) / 255.0
    base = np.repeat(gray[..., None].astype(np.float32), 3, axis=-1)
    heat = _jet(c).astype(np.float32)
    a = (alpha * c)[..., None]
    return np.clip(base * (1 - a) + heat * a, 0, 255).round().astype(np.uint8)
