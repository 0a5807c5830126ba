"""Local data for calibration, fine-tuning and evaluation: the checkpoint's run splits, or a federation.

Calibration and fine-tuning read train-split images only; evaluation reads the union of the sites'
test splits.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fedbrain.data.arrays import arrays, normalise  # noqa: F401 (the core's, used by compression)
from fedbrain.data.federation import SiteData
from fedbrain.data.readers import Record
from fedbrain.runs import RunDir


@dataclass
class LocalData:
    sites: list[SiteData]
    source: str  # where the splits came from, for the report

    def records(self, split: str) -> list[Record]:
        return [r for s in self.sites for r in s.splits[split]]

    @classmethod
    def of_run(cls, run: RunDir, source: str | None = None) -> LocalData:
        """The leak-free splits a run trained on (``splits/<site>.csv``); empty when it recorded none."""
        sites = [SiteData.read_split_file(name, run.split_file(name)) for name in run.site_names()]
        # the run's own folder name, not its path on this machine (reports get committed)
        return cls(sites, source or f"run splits {run.root.name}/{run.splits.name}")


def evenly(records: list, n: int | None) -> list:
    """At most ``n`` records, evenly spaced (deterministic; keeps every site and class represented)."""
    if not n or n >= len(records):
        return list(records)
    idx = np.linspace(0, len(records) - 1, n).round().astype(int)
    return [records[i] for i in idx]


def sample(records: list, n: int, seed: int = 0) -> list:
    """A seeded random sample of at most ``n`` records."""
    if n >= len(records):
        return list(records)
    idx = np.sort(np.random.default_rng(seed).choice(len(records), n, replace=False))
    return [records[i] for i in idx]
