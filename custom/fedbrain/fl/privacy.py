"""Optional differential privacy on site updates: clip the update's L2 norm, add Gaussian noise, account (ε, δ)."""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass

import torch

from fedbrain.dp import secret_generator

# what a site may send of its DP accounting: data-independent numbers only (never the update's norm)
PUBLIC_DP_KEYS = ("dp_epsilon", "dp_delta", "dp_mechanism", "dp_epsilon_budget", "dp_noise_multiplier",
                  "dp_sample_rate", "dp_max_grad_norm", "dp_steps", "dp_budget_spent", "dp_site_epsilon",
                  "dp_patient_epsilon", "dp_patient_delta", "dp_slices_per_patient")


@dataclass
class DPConfig:
    clip: float = 0.0  # L2 bound of one site's update per round; 0 disables DP
    noise_multiplier: float = 0.0  # noise std = noise_multiplier * clip
    delta: float = 1e-5

    @property
    def enabled(self) -> bool:
        return self.clip > 0


def weights_digest(params: dict) -> str:
    """sha256 of a state dict's values (names sorted, float32): which released weights a model is."""
    import hashlib

    import numpy as np

    h = hashlib.sha256()
    for k in sorted(params):
        v = params[k]
        arr = np.asarray(v.detach().cpu() if hasattr(v, "detach") else v)
        h.update(k.encode())
        h.update(np.ascontiguousarray(arr, dtype=np.float32 if arr.dtype.kind == "f" else arr.dtype).tobytes())
    return h.hexdigest()


def epsilon_after(rounds: int, noise_multiplier: float, delta: float) -> float:
    """(ε, δ) of ``rounds`` Gaussian-mechanism releases (sampling rate 1), by opacus' RDP accountant."""
    if noise_multiplier <= 0:
        return float("inf")
    from opacus.accountants import RDPAccountant

    acc = RDPAccountant()
    for _ in range(rounds):
        acc.step(noise_multiplier=noise_multiplier, sample_rate=1.0)
    return float(acc.get_epsilon(delta=delta))


def privatize_update(params: dict[str, torch.Tensor], global_state: dict[str, torch.Tensor], dp: DPConfig,
                     round_: int, trained: Collection[str] | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    """Return clipped+noised weights (global + privatised delta) and what was spent so far. With ``trained`` (the
    names of the parameters the site trains), only those are released privatised; every other tensor (a frozen
    trunk, normalisation statistics) is released as the global model had it, so nothing leaves outside the
    mechanism and no noise lands on weights nobody trains."""
    keys = [k for k, v in params.items() if v.is_floating_point() and (trained is None or k in trained)]
    delta = {k: params[k] - global_state[k] for k in keys}
    norm = torch.sqrt(sum((d.float() ** 2).sum() for d in delta.values()))
    scale = min(1.0, dp.clip / (float(norm) + 1e-12))
    gen = secret_generator()  # noise from a known seed could be subtracted by whoever knows the seed
    out = dict(params) if trained is None else {k: global_state[k] for k in params}
    for k in keys:
        noise = torch.randn(delta[k].shape, generator=gen) * (dp.noise_multiplier * dp.clip)
        out[k] = global_state[k] + delta[k] * scale + noise.to(delta[k].dtype)
    eps = epsilon_after(round_ + 1, dp.noise_multiplier, dp.delta)
    return out, {"dp_update_norm": float(norm), "dp_clip_scale": scale, "dp_epsilon": eps, "dp_delta": dp.delta,
                 "dp_mechanism": "client-level"}
