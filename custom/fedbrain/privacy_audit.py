"""A privacy audit anyone can run on a finished run: what left each site, and how well a membership-inference
attack tells a site's training images from its held-out ones.

The attack (Yeom et al.'s loss attack, the baseline of every MIA audit) scores an image by the model's loss on its
own label: a model that memorised its training images has a lower loss on them. Members are a site's training
images, non-members the same site's validation and test images (never trained on), equally many of each. AUROC
0.5 is a coin flip; TPR at 1 % FPR says how many members an attacker finds while almost never being wrong.
With a reference model (one trained without these images), the calibrated attack (Watson et al. 2022, the
one-reference form of LiRA's idea) scores an image by its loss under the target minus its loss under the reference:
an image that is simply hard (or easy) is so for both models, and what remains is what training on it did.
Knows nothing of NVFlare: it reads the run's files, the model and the sites' own images.
"""

from __future__ import annotations

import re
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

from fedbrain.contract import COUNT_PREFIX, NO_TUMOR, NUM_CLASSES, TUMOUR_CLASSES

LOW_FPR = 0.01
ROC_POINTS = 101  # the ROC curve is stored at this many false-positive rates
MIN_PER_SIDE = 10  # fewer members or non-members: no attack


def label_loss(probs: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Each image's loss on the label it has: -log p(class), or -log p(any tumour) for 'tumour, type unknown'."""
    p = np.clip(probs, 1e-12, 1.0)
    typed = targets < NUM_CLASSES
    out = np.empty(len(targets))
    out[typed] = -np.log(p[typed, targets[typed]])
    out[~typed] = -np.log(np.clip(p[~typed][:, TUMOUR_CLASSES].sum(1), 1e-12, 1.0))
    return out


def attack(member_loss: np.ndarray, nonmember_loss: np.ndarray, n_boot: int = 500, seed: int = 0) -> dict:
    """The loss attack's AUROC (bootstrap 95 % CI), TPR at 1 % FPR and its ROC curve."""
    from sklearn.metrics import roc_auc_score, roc_curve

    y = np.r_[np.ones(len(member_loss)), np.zeros(len(nonmember_loss))]
    score = -np.r_[member_loss, nonmember_loss]  # lower loss: more likely a member
    auroc = float(roc_auc_score(y, score))
    fpr, tpr, _ = roc_curve(y, score)
    grid = np.linspace(0, 1, ROC_POINTS)
    rng = np.random.default_rng(seed)
    boots = []
    for _ in range(n_boot):
        m = rng.integers(0, len(member_loss), len(member_loss))
        n = rng.integers(0, len(nonmember_loss), len(nonmember_loss))
        boots.append(roc_auc_score(y, -np.r_[member_loss[m], nonmember_loss[n]]))
    return {"auroc": auroc, "auroc_ci": [float(np.percentile(boots, 2.5)), float(np.percentile(boots, 97.5))],
            "tpr_at_1pct_fpr": float(np.interp(LOW_FPR, fpr, tpr)),
            "members": int(len(member_loss)), "nonmembers": int(len(nonmember_loss)),
            "member_mean_loss": float(member_loss.mean()), "nonmember_mean_loss": float(nonmember_loss.mean()),
            "roc": {"fpr": grid.round(4).tolist(), "tpr": np.interp(grid, fpr, tpr).round(4).tolist()}}


def calibrated_attack(member_loss: np.ndarray, nonmember_loss: np.ndarray, member_reference: np.ndarray,
                      nonmember_reference: np.ndarray, seed: int = 0) -> dict:
    """The calibrated attack: the loss attack on each image's loss difference (target minus reference)."""
    out = attack(member_loss - member_reference, nonmember_loss - nonmember_reference, seed=seed)
    out["attack"] = "calibrated loss difference (Watson et al.)"
    return out


def _balanced(members: list, nonmembers: list, max_images: int | None, seed: int) -> tuple[list, list]:
    rng = np.random.default_rng(seed)
    n = min(len(members), len(nonmembers), max_images or 10**9)
    pick = lambda recs: [recs[i] for i in sorted(rng.choice(len(recs), n, replace=False))]  # noqa: E731
    return pick(members), pick(nonmembers)


@torch.no_grad()
def membership_inference(model: torch.nn.Module, sites: dict, pre, max_images: int | None = 500, seed: int = 0,
                         cache_dir: Path | None = None, reference: torch.nn.Module | None = None,
                         reference_seen: list | None = None) -> dict:
    """The loss attack at every site (members: its training images; non-members: its validation and test images,
    as many as members) and over all sites pooled; with a ``reference`` model, the calibrated attack beside it, on
    the images the reference never saw (``reference_seen``: the records it trained on; they and their
    near-duplicates are left out). ``sites``: name -> :class:`fedbrain.data.federation.SiteData`."""
    from fedbrain.data.dataset import BatchLoader, SliceDataset
    from fedbrain.external import training_twins
    from fedbrain.training import predict_proba

    out: dict = {"attack": "loss (Yeom et al.)", "max_images_per_side": max_images, "sites": {}}
    pooled = defaultdict(list)
    for name, site in sites.items():
        held_out = site.splits.get("val", []) + site.splits.get("test", [])
        members, nonmembers = _balanced(site.splits.get("train", []), held_out, max_images, seed)
        if len(members) < MIN_PER_SIDE:
            out["sites"][name] = {"skipped": f"{len(members)} images per side: too few for an attack"}
            continue
        losses = {}
        for side, recs in (("member", members), ("nonmember", nonmembers)):
            ds = SliceDataset(recs, pre, cache_dir=cache_dir)
            for who, m in (("", model), ("ref_", reference)):
                if m is not None:
                    probs, targets = predict_proba(m, BatchLoader(ds, 64))
                    losses[who + side] = label_loss(probs, targets)
            if reference is not None:  # the calibrated attack: only images the reference never saw
                unseen = ~training_twins(recs, reference_seen or [], cache_dir)
                losses["ref_" + side] = losses["ref_" + side][unseen]
                losses["unseen_" + side] = losses[side][unseen]
            for key in (k + side for k in ("", "ref_", "unseen_") if k + side in losses):
                pooled[key].append(losses[key])
        out["sites"][name] = _both_attacks({k: [v] for k, v in losses.items()}, seed)
    if pooled["member"]:
        out["pooled"] = _both_attacks(pooled, seed)
    return out


def _both_attacks(losses: dict, seed: int) -> dict:
    """The loss attack, and the calibrated one under ``calibrated`` where reference losses exist."""
    cat = {k: np.concatenate(v) for k, v in losses.items()}
    out = attack(cat["member"], cat["nonmember"], seed=seed)
    if "ref_member" in cat:
        n = min(len(cat["ref_member"]), len(cat["ref_nonmember"]))
        out["calibrated"] = calibrated_attack(cat["unseen_member"], cat["unseen_nonmember"], cat["ref_member"],
                                              cat["ref_nonmember"], seed=seed) if n >= MIN_PER_SIDE else \
            {"skipped": f"{n} images per side the reference never saw: too few for an attack"}
    return out


# ------------------------------------------------------------------ what left each site (the server's audit)

def structural_audit(audit_rows: list[dict]) -> dict:
    """Per site, from the server's audit of every update (structure only): rounds, rejected updates, the
    parameter tensors, every metric (numbered bins folded: ``val_cm_*``) and meta name that left it, and how many
    updates carried no DP accounting."""
    sites: dict[str, dict] = {}
    for row in audit_rows:
        s = sites.setdefault(row.get("site", "?"), {"updates": 0, "rejected": 0, "no_update": 0, "rounds": set(),
                                                    "tensors": 0, "metrics": set(), "meta": set(),
                                                    "dp_mechanisms": set(), "without_dp": 0})
        s["updates"] += 1
        s["rounds"].add(row.get("round"))
        s["rejected"] += bool(row.get("rejected"))
        s["no_update"] += bool(row.get("no_update"))
        s["tensors"] = max(s["tensors"], len(row.get("params") or {}))
        s["metrics"].update(row.get("metrics") or {})
        meta = row.get("meta") or {}
        s["meta"].update(meta)
        if "dp_epsilon" not in meta:
            s["without_dp"] += 1
    out = {}
    for name, s in sites.items():
        rounds = sorted(r for r in s.pop("rounds") if r is not None)
        metrics, meta = sorted(s.pop("metrics")), sorted(s.pop("meta"))
        out[name] = {**{k: v for k, v in s.items() if k != "dp_mechanisms"}, "rounds": len(rounds),
                     "metric_names": families(metrics), "meta_names": meta,
                     "training_data_scalars": families(m for m in metrics if m.startswith(("train_", "profile_"))
                                                       and not m.startswith(COUNT_PREFIX))}
    return out


def families(names) -> list[str]:
    """Names with their trailing bin / class numbers folded (``profile_hist_mean_*``, 100 names, is one)."""
    return sorted({re.sub(r"_\d+$", "_*", n) for n in names})


def privacy_spent(site_rows: list[dict]) -> dict:
    """ε spent per site over the rounds, from the sites' own logs (train rows with DP accounting)."""
    out: dict[str, dict] = {}
    for r in site_rows:
        if r.get("split") != "train" or "dp_epsilon" not in r:
            continue
        s = out.setdefault(r["site"], {"mechanism": r.get("dp_mechanism", "client-level"), "delta": r.get("dp_delta"),
                                       "budget": r.get("dp_epsilon_budget"), "rounds": [], "epsilon": []})
        s["rounds"].append(int(r["round"]))
        s["epsilon"].append(float(r["dp_epsilon"]))
        for key in ("dp_site_epsilon", "dp_patient_epsilon", "dp_patient_delta", "dp_slices_per_patient"):
            if r.get(key) is not None:  # the site's whole spend (every job) and per patient (group privacy)
                s[key.removeprefix("dp_")] = max(float(r[key]), s.get(key.removeprefix("dp_"), 0.0))
    for s in out.values():
        s["final_epsilon"] = max(s["epsilon"]) if s["epsilon"] else 0.0
    return out


def reference_images(reference: Path) -> list:
    """The records a reference model saw (its run's training and validation images); a clear error for a model
    outside a run folder (what it trained on is then unknown)."""
    from fedbrain.data.federation import Federation
    from fedbrain.runs import RunDir

    run = RunDir.containing(reference)
    if run is None or not run.has_splits():
        raise ValueError(f"the reference model {reference.name} is not inside a run folder with recorded splits: "
                         "the calibrated attack must leave out the images it trained on")
    return [r for site in Federation.read(run).sites.values() for split in ("train", "val")
            for r in site.splits.get(split, [])]


def audit_run(run, max_images: int | None = 500, seed: int = 0, cache_dir: Path | None = None,
              checkpoint: Path | None = None, reference: Path | None = None) -> dict:
    """The whole audit of a run folder (:class:`fedbrain.runs.RunDir`): what left each site, the ε each spent,
    and the membership-inference attack on its best global model; written to ``evaluation/membership.json``."""
    from fedbrain.checkpoint import load_checkpoint
    from fedbrain.data.federation import Federation
    from fedbrain.runs import RunDir, read_metrics, write_json

    checkpoint = Path(checkpoint or run.best)
    if not checkpoint.is_file():
        raise FileNotFoundError(f"{run}: no global model to audit ({checkpoint.name} is missing)")
    model, card = load_checkpoint(checkpoint)
    ref_model, ref_seen = None, None
    if reference is not None:
        ref_model, ref_card = load_checkpoint(reference)
        if ref_card.preprocessing != card.preprocessing:
            raise ValueError(f"the reference model {Path(reference).name} reads images differently from the target")
        ref_seen = reference_images(Path(reference))
    fed = Federation.read(run)
    rows = read_metrics(run.server_audit)
    site_rows = [r for s in fed.sites for r in read_metrics(run.site_metrics(s))]
    result = {"run": run.name, "model": checkpoint.name, "model_name": card.model,
              "what_left": structural_audit(rows), "privacy": privacy_spent(site_rows),
              "membership": membership_inference(model, fed.sites, card.preprocessing, max_images, seed, cache_dir,
                                                reference=ref_model, reference_seen=ref_seen)}
    if reference is not None:
        result["membership"]["reference"] = {"model": str(Path(reference).name), "run": RunDir.containing(
            Path(reference)).name, "left_out": "the images it trained or validated on and their near-duplicates"}
    result["membership"]["healthy_class"] = NO_TUMOR
    run.evaluations.mkdir(parents=True, exist_ok=True)
    write_json(run.membership_audit, result)
    return result


def audit_table(result: dict) -> str:
    """The audit as text: one line per site."""
    lines = [f"{'site':16} {'ε spent':>9} {'MIA AUROC [95% CI]':>22} {'TPR@1%FPR':>10} {'n/side':>7}  what left"]
    mia, spent, left = result["membership"]["sites"], result["privacy"], result["what_left"]
    for site in sorted(set(mia) | set(left)):
        m = mia.get(site, {})
        eps = spent.get(site, {}).get("final_epsilon")
        eps_s = f"{eps:.2f}" if eps is not None else "no DP"
        site_spent = spent.get(site, {})
        if "patient_epsilon" in site_spent:  # per patient: group privacy over the most slices of one patient
            eps_s += (f" (site, all jobs: {site_spent.get('site_epsilon', eps):.2f}; per patient: "
                      f"{site_spent['patient_epsilon']:.2f} at {int(site_spent['slices_per_patient'])} slices)")
        if "auroc" in m:
            auc = f"{m['auroc']:.3f} [{m['auroc_ci'][0]:.2f}, {m['auroc_ci'][1]:.2f}]"
            if "auroc" in m.get("calibrated", {}):
                auc += f" calibrated {m['calibrated']['auroc']:.3f} (n {m['calibrated']['members']})"
            tpr, n = f"{m['tpr_at_1pct_fpr']:.3f}", str(m["members"])
        else:
            auc, tpr, n = m.get("skipped", "-"), "-", "-"
        w = left.get(site)
        what = (f"{w['tensors']} tensors, {len(w['metric_names'])} kinds of metric, {len(w['meta_names'])} meta names; "
                f"{w['rejected']} rejected; from training images: {', '.join(w['training_data_scalars']) or 'none'}"
                if w else "no server audit")
        lines.append(f"{site:16} {eps_s:>9} {auc:>22} {tpr:>10} {n:>7}  {what}")
    p = result["membership"].get("pooled")
    if p:
        lines.append(f"{'all sites':16} {'':>9} {p['auroc']:.3f} [{p['auroc_ci'][0]:.2f}, {p['auroc_ci'][1]:.2f}]"
                     f" {p['tpr_at_1pct_fpr']:>10.3f} {p['members']:>7}")
    return "\n".join(lines)


__all__ = ["label_loss", "attack", "calibrated_attack", "membership_inference", "structural_audit", "privacy_spent",
           "audit_run", "audit_table", "reference_images", "LOW_FPR"]
