"""Scoring a model on every site's split and on their union, and the results table the CLI prints."""

from __future__ import annotations

import torch

from fedbrain.data.dataset import UNION, SiteLoaders
from fedbrain.data.federation import SiteData
from fedbrain.training import evaluate

__all__ = ["UNION", "evaluate_everywhere", "results_table", "split_differences"]


def evaluate_everywhere(model: torch.nn.Module, loaders: dict[str, SiteLoaders], split: str = "test") -> dict:
    """Metrics on every site's ``split`` and on their union (sites with an empty split are left out)."""
    out = {}
    for name, sl in loaders.items():
        if sl.site.splits[split]:
            out[name] = evaluate(model, sl.eval(split))
    return out


def results_table(results: dict[str, dict]) -> str:
    """Per-site test table: n, macro-F1, accuracy, tumour accuracy, tumour AUROC."""
    hdr = f"{'site':<18}{'n':>6}{'macro-F1':>10}{'accuracy':>10}{'tumour acc':>12}{'tumour AUROC':>14}"
    lines = [hdr, "-" * len(hdr)]

    def f(v):
        return f"{v:.4f}" if isinstance(v, (int, float)) else "-"

    for name, m in results.items():
        lines.append(f"{name:<18}{m.get('n', 0):>6}{f(m.get('macro_f1')):>10}{f(m.get('accuracy')):>10}"
                     f"{f(m.get('tumour_accuracy')):>12}{f(m.get('tumour_auroc')):>14}")
    return "\n".join(lines)


def split_differences(recorded: list[SiteData], given: list[SiteData], split: str = "test") -> list[str]:
    """How the caller's data differs from the splits a run recorded (empty: identical ``split`` everywhere).

    Flags, in particular, images the caller would score that the run trained on.
    """
    rec = {s.name: s for s in recorded}
    out = []
    trained = {r.path for s in recorded for r in s.splits["train"]}
    for s in given:
        if s.name not in rec:
            out.append(f"site {s.name!r} is not among the run's sites {sorted(rec)}")
            continue
        mine = {r.path for r in rec[s.name].splits[split]}
        theirs = {r.path for r in s.splits[split]}
        if mine != theirs:
            out.append(f"site {s.name!r}: {len(theirs - mine)} of the given {len(theirs)} {split} images are not "
                       f"in the run's {split} split ({len(mine)} images)")
        leaked = theirs & trained
        if leaked:
            out.append(f"site {s.name!r}: {len(leaked)} of the given {split} images were TRAINING images of this "
                       f"run; scores on them are not a test")
    return out
