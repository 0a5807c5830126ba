"""A hospital's own privacy policy: its admin sets it in the site's local folder, and every job that arrives
trains under it, whatever the job asked for.

The file is ``local/fedbrain_privacy.json`` in the site's workspace (the folder of its ``startup/`` kit), or the
file named by ``$FEDBRAIN_PRIVACY_POLICY``; a simulated hospital keeps it in ``<run>/sites/<site>/local/``::

    {"dp_epsilon": 8, "dp_delta": 1e-5}

``dp_epsilon`` is the record-level budget (DP-SGD) of one job at this site: a job that asks for less privacy, or
for none, is trained with this budget instead; a job that asks for more keeps its own. The site refuses to send
an update that does not carry the accounting this policy requires (:func:`check_outgoing`).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, fields, replace
from pathlib import Path

from fedbrain.dp import DPSGDConfig
from fedbrain.runs import SITE_POLICY_FILE as POLICY_FILE

POLICY_ENV = "FEDBRAIN_PRIVACY_POLICY"


class PolicyError(ValueError):
    """A site's privacy policy that cannot be read, or an update that breaks it."""


@dataclass(frozen=True)
class SitePolicy:
    dp_epsilon: float = 0.0  # record-level budget every job must keep (0: the site leaves DP to the job)
    dp_delta: float = 1e-5
    source: str = ""  # the file it came from ("" : no policy)

    def __post_init__(self) -> None:
        for name in ("dp_epsilon", "dp_delta"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0:
                raise PolicyError(f"{self.source or 'privacy policy'}: {name} must be a number ≥ 0, not {v!r}")
        if not 0 < self.dp_delta < 1:
            raise PolicyError(f"{self.source or 'privacy policy'}: dp_delta must lie in (0, 1), not {self.dp_delta}")

    @property
    def requires_dp(self) -> bool:
        return self.dp_epsilon > 0

    def apply(self, job: DPSGDConfig) -> DPSGDConfig:
        """The DP-SGD this site trains by: the job's, made at least as strict as the policy."""
        if not self.requires_dp:
            return job
        epsilon = min(self.dp_epsilon, job.epsilon) if job.enabled else float(self.dp_epsilon)  # (inf: none)
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
    eps = meta.get("dp_epsilon")
    if not isinstance(eps, (int, float)) or eps > policy.dp_epsilon * (1 + 1e-9):
        raise PolicyError(f"this site's policy ({policy.source}) allows ε ≤ {policy.dp_epsilon}, and the update "
                          f"spent {eps}: it is not sent")


__all__ = ["SitePolicy", "PolicyError", "POLICY_FILE", "POLICY_ENV", "find_policy", "check_outgoing",
           "site_workspace_policy"]
