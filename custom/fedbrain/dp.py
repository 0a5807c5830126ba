"""Record-level differential privacy for local training: DP-SGD through Opacus.

Each step samples every training image independently (Poisson, rate ``sample_rate``), clips each image's gradient
to ``max_grad_norm``, adds Gaussian noise of ``noise_multiplier * max_grad_norm`` to their sum, and an RDP (or PRV)
accountant adds up what was spent. The noise multiplier is chosen once, from the budget (ε, δ) and the steps the
job plans, so the budget lasts exactly that long; a run that goes on longer stops training when the next step
would overspend it. Knows nothing of NVFlare: the site script and a pooled run use it alike.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from fedbrain.models import freeze_batchnorm

ACCOUNTANTS = ("rdp", "prv")
MIN_EXPECTED_BATCH = 8  # below this, Poisson batches are often empty or tiny: the noise swamps the gradient


class PrivacyBudgetError(ValueError):
    """A DP setting that cannot work: a model with BatchNorm, a site too small for its sampling rate."""


@dataclass(frozen=True)
class DPSGDConfig:
    """What a DP-SGD training run promises: (ε, δ) over the whole job, per image of the training data."""

    epsilon: float = 0.0  # the budget; 0: no record-level DP; inf: DP-SGD's sampling, no clipping, no noise
    delta: float = 1e-5
    max_grad_norm: float = 1.0  # each image's gradient is clipped to this L2 norm
    sample_rate: float = 0.1  # the chance that an image is in a step's batch (Poisson sampling)
    accountant: str = "rdp"

    def __post_init__(self) -> None:
        if not self.epsilon >= 0:
            raise ValueError(f"the DP budget ε must be a positive number (0: off, inf: no noise), not {self.epsilon}")
        if not 0 < self.delta < 1:
            raise ValueError(f"δ must lie in (0, 1), not {self.delta}")
        if self.max_grad_norm <= 0:
            raise ValueError(f"the per-image clipping norm must be positive, not {self.max_grad_norm}")
        if not 0 < self.sample_rate <= 1:
            raise ValueError(f"the sampling rate must lie in (0, 1], not {self.sample_rate}")
        if self.accountant not in ACCOUNTANTS:
            raise ValueError(f"accountant must be one of {ACCOUNTANTS}, not {self.accountant!r}")

    @property
    def enabled(self) -> bool:
        """Whether training follows DP-SGD's schedule (Poisson batches at ``sample_rate``)."""
        return self.epsilon > 0

    @property
    def private(self) -> bool:
        """Whether images' gradients are clipped and noised (a finite budget); ε = inf is the same schedule
        without privacy: the reference a DP utility curve is measured against."""
        return self.enabled and math.isfinite(self.epsilon)

    def to_dict(self) -> dict:
        return asdict(self)


def secret_generator(device: torch.device | str = "cpu") -> torch.Generator:
    """A generator seeded from OS entropy: DP noise drawn from a known seed could be subtracted again."""
    import secrets

    return torch.Generator(device=device).manual_seed(secrets.randbits(63))


def noise_multiplier_for(cfg: DPSGDConfig, steps: int) -> float:
    """The smallest noise multiplier whose ``steps`` sampled steps stay within (ε, δ)."""
    from opacus.accountants.utils import get_noise_multiplier

    return float(get_noise_multiplier(target_epsilon=cfg.epsilon, target_delta=cfg.delta, sample_rate=cfg.sample_rate,
                                      steps=max(1, steps), accountant=cfg.accountant, epsilon_tolerance=0.005))


def epsilon_spent(noise_multiplier: float, sample_rate: float, steps: int, delta: float, accountant: str = "rdp") \
        -> float:
    """ε after ``steps`` DP-SGD steps (0 before the first)."""
    if steps <= 0:
        return 0.0
    from opacus.accountants import create_accountant

    acc = create_accountant(accountant)
    acc.history = [(noise_multiplier, sample_rate, int(steps))]
    return float(acc.get_epsilon(delta=delta))


def group_privacy(epsilon: float, delta: float, k: int) -> tuple[float, float]:
    """(ε, δ) for a group of ``k`` records (a patient's ``k`` slices) from the per-record (ε, δ):
    ``k·ε`` and ``k·e^{(k-1)ε}·δ`` (δ capped at 1)."""
    k = max(1, int(k))
    return k * epsilon, min(1.0, k * math.exp(min((k - 1) * epsilon, 700.0)) * delta)


def laplace_counts(counts, epsilon: float) -> list[int]:
    """``counts`` (one histogram over the records, L1 sensitivity 1) with Laplace noise of scale 1/ε from OS
    entropy, rounded and kept ≥ 0: ε-DP, released once and reused (post-processing)."""
    gen = secret_generator()
    noisy = []
    for c in counts:
        u = float(torch.rand((), generator=gen)) - 0.5  # Laplace by inverse CDF
        noise = -math.copysign(1.0, u) * math.log(max(1e-300, 1 - 2 * abs(u))) / epsilon
        noisy.append(max(0, round(float(c) + noise)))
    return noisy


def check_private_model(model: nn.Module) -> None:
    """Raise a one-line error when per-image gradients cannot be private for ``model`` (BatchNorm mixes images)."""
    from opacus.validators import ModuleValidator

    trainable_bn = [n for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
                    and any(p.requires_grad for p in m.parameters(recurse=False))]
    if trainable_bn:
        raise PrivacyBudgetError(
            f"record-level DP needs a model without trainable BatchNorm ({trainable_bn[0]} mixes the images of a "
            "batch): use fedbrain_cnn_gn or fedbrain_cnn_v2, or freeze the BatchNorm blocks (the key finetune: 'head' "
            "or 'last-N')")
    errors = [e for e in ModuleValidator.validate(model, strict=False)
              if "BatchNorm" not in type(e).__name__ and "BatchNorm" not in str(e)]
    if errors:
        raise PrivacyBudgetError(f"record-level DP cannot train this model: {errors[0]}")


class PrivateTraining:
    """DP-SGD for one model over the rounds of a job: per-image gradients (Opacus hooks on the model's layers),
    the clipping and noise of Opacus' DPOptimizer, and the accountant of every step taken so far.

    ``planned_steps``: the steps the job will take (the noise is set so that they spend exactly the budget).
    ``ledger``: a JSON file where the steps taken are kept, so a resumed site goes on from what it spent.
    """

    def __init__(self, model: nn.Module, cfg: DPSGDConfig, dataset_size: int, planned_steps: int,
                 ledger: Path | JobLedger | None = None):
        from opacus import GradSampleModule

        if not cfg.private:
            raise ValueError("PrivateTraining needs a finite DP budget (epsilon > 0)")
        expected = cfg.sample_rate * dataset_size
        if expected < MIN_EXPECTED_BATCH:
            raise PrivacyBudgetError(
                f"{dataset_size} training images at sampling rate {cfg.sample_rate} give batches of {expected:.1f} "
                f"images on average; DP-SGD needs at least {MIN_EXPECTED_BATCH}: raise dp_sample_rate")
        freeze_batchnorm(model)  # BatchNorm normalises by its fixed statistics (e.g. ImageNet's): no batch mixing
        check_private_model(model)
        self.cfg = cfg
        self.dataset_size = dataset_size
        self.expected_batch = expected
        self.ledger = JobLedger(ledger) if isinstance(ledger, (str, Path)) else ledger
        state = self.ledger.read() if self.ledger is not None else None
        if state and (state.get("config") != cfg.to_dict() or state.get("dataset_size") != dataset_size):
            raise PrivacyBudgetError(
                f"this site already spent ε={state.get('epsilon', float('nan')):.3g} under other DP settings "
                f"({ledger}): resume with the same budget, clipping norm and sampling rate")
        if state:
            self.noise_multiplier = float(state["noise_multiplier"])
            self.steps = int(state["steps"])
            self.planned_steps = int(state["planned_steps"])
        else:
            self.noise_multiplier = noise_multiplier_for(cfg, planned_steps)
            self.steps = 0
            self.planned_steps = int(planned_steps)
        self.model = model
        for m in model.modules():  # Opacus' backward hooks cannot see through in-place activations
            if hasattr(m, "inplace"):
                m.inplace = False
        self._hooks = GradSampleModule(model, batch_first=True, loss_reduction="mean", strict=False)

    # ---------------------------------------------------------------- accounting

    @property
    def epsilon(self) -> float:
        """ε spent so far (δ: ``cfg.delta``)."""
        return epsilon_spent(self.noise_multiplier, self.cfg.sample_rate, self.steps, self.cfg.delta,
                             self.cfg.accountant)

    def can_step(self) -> bool:
        """Whether one more step stays within the budget."""
        after = epsilon_spent(self.noise_multiplier, self.cfg.sample_rate, self.steps + 1, self.cfg.delta,
                              self.cfg.accountant)
        return after <= self.cfg.epsilon * (1 + 1e-9)

    def record_step(self) -> None:
        self.steps += 1

    def summary(self) -> dict:
        """The data-independent facts of this run's DP (what may leave a site)."""
        return {"dp_mechanism": "dp-sgd", "dp_epsilon": self.epsilon, "dp_delta": self.cfg.delta,
                "dp_epsilon_budget": self.cfg.epsilon, "dp_noise_multiplier": self.noise_multiplier,
                "dp_sample_rate": self.cfg.sample_rate, "dp_max_grad_norm": self.cfg.max_grad_norm,
                "dp_steps": self.steps, "dp_budget_spent": not self.can_step()}

    # ---------------------------------------------------------------- training

    def wrap(self, optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
        """``optimizer`` behind Opacus' clipping and noise (its state and param groups stay the same)."""
        from opacus.optimizers import DPOptimizer

        return DPOptimizer(optimizer, noise_multiplier=self.noise_multiplier, max_grad_norm=self.cfg.max_grad_norm,
                           expected_batch_size=max(1, round(self.expected_batch)), loss_reduction="mean",
                           generator=secret_generator(next(self.model.parameters()).device))

    def save(self) -> None:
        if self.ledger is not None:
            self.ledger.write({"config": self.cfg.to_dict(), "dataset_size": self.dataset_size,
                               "noise_multiplier": self.noise_multiplier, "steps": self.steps,
                               "planned_steps": self.planned_steps, "epsilon": self.epsilon})


def _write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text()) if path.is_file() else None
    except (OSError, ValueError):
        return None


class JobLedger:
    """One job's DP-SGD state in its own JSON file (a job's resume point where the site keeps no ledger)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def read(self) -> dict | None:
        return _read_json(self.path)

    def write(self, state: dict) -> None:
        _write_json(self.path, state)


class SiteLedger:
    """A hospital's own record across every job it ever ran, kept in its own folder (never the job's):

    * ``jobs``: per job, its DP-SGD state (what PrivateTraining resumes from) and ε spent, including the ε of
      the label counts it released; the site's lifetime spend is their sum (basic composition);
    * ``eval_queries``: how many times a model was scored on this site's validation or test images;
    * ``<name>_releases.jsonl`` beside it: the digest of every update the site's DP mechanism produced, which
      the site's policy filter checks every outgoing model against.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.releases = self.path.with_name(self.path.stem + "_releases.jsonl")

    def state(self) -> dict:
        state = _read_json(self.path) or {}
        return {"jobs": state.get("jobs") or {}, "eval_queries": int(state.get("eval_queries") or 0)}

    def _update(self, change) -> dict:
        state = self.state()
        change(state)
        _write_json(self.path, state)
        return state

    # ------------------------------------------------------------ budgets

    def spent(self, exclude: str | None = None) -> tuple[float, float]:
        """(ε, δ) this site spent over all its jobs (``exclude``: leave one job out)."""
        jobs = [j for k, j in self.state()["jobs"].items() if k != exclude]
        eps = sum(float(j.get("epsilon") or 0) + float(j.get("count_epsilon") or 0) for j in jobs)
        return eps, sum(float(j.get("delta") or 0) for j in jobs if j.get("epsilon") or j.get("count_epsilon"))

    def job_key(self, base: str, resume: bool) -> str:
        """The key of this job's entry: a resumed job continues its latest entry, a new one never reuses one."""
        keys = [k for k in self.state()["jobs"] if k == base or k.startswith(base + "#")]
        if resume and keys:
            return keys[-1]
        return base if not keys else f"{base}#{len(keys) + 1}"

    def job(self, key: str) -> JobEntry:
        return JobEntry(self, key)

    # ------------------------------------------------------------ queries and releases

    def count_query(self, limit: int | None) -> bool:
        """Count one evaluation of this site's held-out images; False (not counted) once ``limit`` is reached."""
        if limit is not None and self.state()["eval_queries"] >= limit:
            return False
        self._update(lambda s: s.__setitem__("eval_queries", s["eval_queries"] + 1))
        return True

    def record_release(self, digest: str) -> None:
        self.releases.parent.mkdir(parents=True, exist_ok=True)
        with self.releases.open("a") as fh:
            fh.write(digest + "\n")

    def released(self, digest: str) -> bool:
        """Whether the site's own DP mechanism produced the weights of ``digest``."""
        if not self.releases.is_file():
            return False
        with self.releases.open() as fh:
            return any(line.strip() == digest for line in fh)


class JobEntry:
    """One job's entry in a :class:`SiteLedger`: read and written like a :class:`JobLedger`."""

    def __init__(self, ledger: SiteLedger, key: str):
        self.ledger, self.key = ledger, key

    def read(self) -> dict | None:
        entry = self.ledger.state()["jobs"].get(self.key)
        return entry if entry and "steps" in entry else None

    def get(self, name: str, default=None):
        return (self.ledger.state()["jobs"].get(self.key) or {}).get(name, default)

    def write(self, state: dict) -> None:
        def change(s: dict) -> None:
            entry = s["jobs"].setdefault(self.key, {})
            entry.update(state)
            entry.setdefault("delta", (state.get("config") or {}).get("delta"))
        self.ledger._update(change)


__all__ = ["DPSGDConfig", "PrivateTraining", "JobLedger", "SiteLedger", "JobEntry", "PrivacyBudgetError",
           "noise_multiplier_for", "epsilon_spent", "check_private_model", "secret_generator", "group_privacy",
           "laplace_counts", "ACCOUNTANTS"]
