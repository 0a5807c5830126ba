"""A hospital's own privacy policy: its admin sets it in the site's local folder, and every job that arrives
trains under it, whatever the job asked for.

The file is ``local/fedbrain_privacy.json`` in the site's workspace (the folder of its ``startup/`` kit), or the
file named by ``$FEDBRAIN_PRIVACY_POLICY``; a simulated hospital keeps it in ``<run>/sites/<site>/local/``::

    {"dp_epsilon": 8, "dp_delta": 1e-5, "lifetime_epsilon": 24, "max_eval_queries": 200}

``dp_epsilon`` is the record-level budget (DP-SGD) of one job at this site: a job that asks for less privacy, or
for none, is trained with this budget instead; a job that asks for more keeps its own. ``lifetime_epsilon`` bounds
the ε the site spends over all its jobs: the site's ledger (``fedbrain_ledger.<site>.json`` beside this file, in
the hospital's folder, never the job's) adds up every job, and a job whose planned spend exceeds what is left is
refused before it trains. ``max_eval_queries`` bounds how many times any model is scored on the site's validation
and test images, over all jobs. The site refuses to send an update that does not carry the accounting this policy
requires (:func:`check_outgoing`), and its filter sends only weights its own DP mechanism produced.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, fields, replace
from pathlib import Path

from fedbrain.dp import DPSGDConfig, SiteLedger
from fedbrain.runs import SITE_POLICY_FILE as POLICY_FILE

POLICY_ENV = "FEDBRAIN_PRIVACY_POLICY"


class PolicyError(ValueError):
    """A site's privacy policy that cannot be read, or an update that breaks it."""


@dataclass(frozen=True)
class SitePolicy:
    dp_epsilon: float = 0.0  # record-level budget every job must keep (0: the site leaves DP to the job)
    dp_delta: float = 1e-5
    lifetime_epsilon: float = 0.0  # ε this site may spend over all its jobs (0: no lifetime bound)
    max_eval_queries: int | None = None  # scorings of its validation/test images over all jobs (None: no bound)
    source: str = ""  # the file it came from ("" : no policy)

    def __post_init__(self) -> None:
        for name in ("dp_epsilon", "dp_delta", "lifetime_epsilon"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0:
                raise PolicyError(f"{self.source or 'privacy policy'}: {name} must be a number ≥ 0, not {v!r}")
        if not 0 < self.dp_delta < 1:
            raise PolicyError(f"{self.source or 'privacy policy'}: dp_delta must lie in (0, 1), not {self.dp_delta}")
        q = self.max_eval_queries
        if q is not None and (isinstance(q, bool) or not isinstance(q, int) or q < 0):
            raise PolicyError(f"{self.source or 'privacy policy'}: max_eval_queries must be an integer ≥ 0 or null, "
                              f"not {q!r}")

    @property
    def requires_dp(self) -> bool:
        return self.dp_epsilon > 0 or self.lifetime_epsilon > 0

    def ledger(self, site: str) -> SiteLedger | None:
        """This site's ledger across all jobs, beside the policy file (None without a policy file)."""
        return SiteLedger(Path(self.source).with_name(f"fedbrain_ledger.{site}.json")) if self.source else None

    def admit(self, ledger: SiteLedger, key: str, planned_epsilon: float) -> None:
        """Refuse, before training, a job whose planned ε would take the site past its lifetime budget."""
        if not self.lifetime_epsilon:
            return
        spent, _ = ledger.spent(exclude=key)
        if spent + planned_epsilon > self.lifetime_epsilon * (1 + 1e-9):
            raise PolicyError(f"this site's lifetime privacy budget ε={self.lifetime_epsilon:g} ({self.source}) "
                              f"has {max(0.0, self.lifetime_epsilon - spent):.3g} left and the job plans to spend "
                              f"{planned_epsilon:.3g}: it is refused before training")

    def apply(self, job: DPSGDConfig) -> DPSGDConfig:
        """The DP-SGD this site trains by: the job's, made at least as strict as the policy."""
        if not self.requires_dp:
            return job
        cap = self.dp_epsilon or self.lifetime_epsilon  # a lifetime budget alone still requires DP
        epsilon = min(cap, job.epsilon) if job.enabled else float(cap)  # (job inf: no noise)
        return replace(job, epsilon=epsilon, delta=min(self.dp_delta, job.delta))

    @classmethod
    def read(cls, path: Path) -> SitePolicy:
        try:
            raw = json.loads(Path(path).read_text())
        except OSError as exc:
            raise PolicyError(f"cannot read the site's privacy policy {path}: {exc.strerror or exc}") from exc
        except ValueError as exc:
            raise PolicyError(f"the site's privacy policy {path} is not valid JSON: {exc}") from exc
        if not isinstance(raw, dict):
            raise PolicyError(f"the site's privacy policy {path} must be a JSON object")
        known = {f.name for f in fields(cls)} - {"source"}
        unknown = sorted(set(raw) - known - {"comment"})
        if unknown:
            raise PolicyError(f"the site's privacy policy {path} has unknown setting(s) {unknown}; known: "
                              f"{sorted(known)}")
        return cls(**{k: v for k, v in raw.items() if k in known}, source=str(path))


def site_workspace_policy(start: Path, name: str = POLICY_FILE) -> Path | None:
    """``local/<name>`` (default: the privacy policy) of the site workspace (the folder with ``startup/``) above
    ``start``, if it exists."""
    for d in [start, *start.parents]:
        if (d / "startup").is_dir():
            f = d / "local" / name
            return f if f.is_file() else None
    return None


def find_policy(simulated: Path | None = None, starts: tuple[Path, ...] = ()) -> SitePolicy:
    """This site's policy: ``$FEDBRAIN_PRIVACY_POLICY``, else its workspace's ``local/`` file (searched above
    ``starts``), else a simulated hospital's ``simulated`` file; no file: no policy."""
    env = os.environ.get(POLICY_ENV)
    if env:
        return SitePolicy.read(Path(env))
    for start in starts:
        found = site_workspace_policy(Path(start).resolve())
        if found:
            return SitePolicy.read(found)
    if simulated is not None and simulated.is_file():
        return SitePolicy.read(simulated)
    return SitePolicy()


def check_outgoing(policy: SitePolicy, meta: dict) -> None:
    """Refuse to send an update that lacks the DP-SGD accounting the policy requires, or that spent more."""
    if not policy.requires_dp:
        return
    if meta.get("dp_mechanism") != "dp-sgd":
        raise PolicyError(f"this site's policy ({policy.source}) requires record-level DP, and the update was not "
                          "trained by DP-SGD: it is not sent")
    eps, cap = meta.get("dp_epsilon"), policy.dp_epsilon or policy.lifetime_epsilon
    if not isinstance(eps, (int, float)) or eps > cap * (1 + 1e-9):
        raise PolicyError(f"this site's policy ({policy.source}) allows ε ≤ {cap}, and the update "
                          f"spent {eps}: it is not sent")


__all__ = ["SitePolicy", "PolicyError", "POLICY_FILE", "POLICY_ENV", "find_policy", "check_outgoing",
           "site_workspace_policy"]
