"""The label-skew levers in the training core and on the server, the compare plan, and honest uncertainty."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from torch import nn

from fedbrain.contract import NO_TUMOR, TUMOUR_ANY
from fedbrain.evaluation import _fast_metrics, bootstrap_ci, small_n_flags
from fedbrain.fl.metrics import COUNT_PREFIX, site_counts
from fedbrain.settings import JobSettings, legacy_overrides
from fedbrain.training import (
    TrainConfig,
    class_weights,
    compute_metrics,
    estimate_bn_statistics,
    partial_label_loss,
    present_classes,
    train_epochs,
)


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        return self.fc(torch.relu(self.bn(self.conv(x))).mean((2, 3)))


def batches(n: int = 6, size: int = 8, seed: int = 0, shift: float = 0.0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(size, 1, 8, 8, generator=g) + shift, torch.randint(0, 4, (size,), generator=g))
            for _ in range(n)]


def test_local_steps_are_exact_whatever_the_loader_length():
    model = Tiny()
    stats = train_epochs(model, batches(3), TrainConfig(steps=7, class_weighting=False), epochs=1)
    assert stats["steps"] == 7 and stats["samples"] == 56
    stats = train_epochs(model, batches(3), TrainConfig(class_weighting=False), epochs=2)
    assert stats["steps"] == 6


def test_restricted_softmax_leaves_missing_classes_alone():
    """A site without healthy scans: its loss gives the no_tumor logit no gradient at all."""
    logits = torch.zeros(4, 4, requires_grad=True)
    targets = torch.tensor([0, 1, 2, TUMOUR_ANY])
    present = present_classes(torch.tensor([0, 1, 2]))
    assert present.tolist() == [True, True, True, False]
    partial_label_loss(logits, targets, present=present).backward()
    assert torch.all(logits.grad[:, NO_TUMOR] == 0)
    logits.grad = None
    partial_label_loss(logits, targets).backward()
    assert torch.all(logits.grad[:, NO_TUMOR] > 0)  # unrestricted: pushed down at every image
    assert present_classes(torch.tensor([TUMOUR_ANY, NO_TUMOR])).all()  # 'some tumour' covers every type


def test_pooled_class_counts_set_the_weights():
    local = torch.tensor([0, 0, 0, 1])  # a site without healthy scans
    pooled = torch.tensor([3.0, 1.0, 0.0, 4.0, 0.0])
    w = class_weights(local, pooled)
    assert w[NO_TUMOR] > 0 and w[0] == pytest.approx(w[NO_TUMOR] * 4 / 3)
    assert class_weights(local)[NO_TUMOR] == 0


def test_site_shares_of_a_pooled_batch_add_up_to_the_pooled_loss():
    """Sites' 'count'-normalised weighted losses, averaged by batch share, equal the pooled batch's loss with
    the pooled weights; per-site weight-sum normalisation would give the healthy-only site its batch share."""
    from fedbrain.training import partial_label_loss

    torch.manual_seed(0)
    y_a, y_b = torch.tensor([0, 0, 0, 1, 1, 2]), torch.tensor([3])  # site b holds the healthy scan
    logits_a, logits_b = torch.randn(6, 4), torch.randn(1, 4)
    w = class_weights(torch.cat([y_a, y_b]))
    pooled = partial_label_loss(torch.cat([logits_a, logits_b]), torch.cat([y_a, y_b]), w, normalise="count")
    shares = (6 * partial_label_loss(logits_a, y_a, w, normalise="count")
              + 1 * partial_label_loss(logits_b, y_b, w, normalise="count")) / 7
    assert shares == pytest.approx(pooled.item())
    own_sums = (6 * partial_label_loss(logits_a, y_a, w) + 1 * partial_label_loss(logits_b, y_b, w)) / 7
    assert own_sums != pytest.approx(pooled.item())


def test_bn_statistics_are_estimated_exactly_and_training_updates_them():
    model = Tiny()
    data = batches(4, shift=3.0)
    n = estimate_bn_statistics(model, data)
    assert n == 32 and model.training  # the mode is left as it was
    with torch.no_grad():
        feats = torch.cat([model.conv(x) for x, _ in data])
    torch.testing.assert_close(model.bn.running_mean, feats.mean((0, 2, 3)), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(model.bn.running_var, feats.var((0, 2, 3)), rtol=1e-3, atol=1e-4)
    before = model.bn.running_mean.clone()
    train_epochs(model, data, TrainConfig(class_weighting=False), epochs=1)  # batch statistics: the moments move
    assert not torch.allclose(model.bn.running_mean, before)


def test_frozen_blocks_keep_their_statistics():
    model = Tiny()
    model.bn.running_mean.fill_(7.0)
    for p in model.bn.parameters():
        p.requires_grad_(False)
    estimate_bn_statistics(model, batches(2))
    assert torch.all(model.bn.running_mean == 7.0)


def test_site_counts_are_read_and_checked():
    good = {f"{COUNT_PREFIX}{k}": v for k, v in enumerate([5, 0, 2, 9, 1])}
    assert site_counts({**good, "val_score": 0.5}) == [5, 0, 2, 9, 1]
    assert site_counts({f"{COUNT_PREFIX}0": 1}) is None
    assert site_counts({**good, f"{COUNT_PREFIX}3": -4}) is None


def test_job_settings_validate_their_levers():
    with pytest.raises(ValueError, match="class_balance"):
        JobSettings.create(class_balance="world")
    legacy = legacy_overrides()
    s = JobSettings.create(train=legacy["train"], **{k: v for k, v in legacy.items() if k != "train"})
    assert not s.train.steps and s.train.epochs == 1 and s.site_weighting == "steps" and s.class_balance == "site"
    assert JobSettings.from_dict(s.to_dict()) == s


def test_server_momentum_accumulates_updates():
    from fedbrain.fl.controller import FedbrainController

    ctrl = FedbrainController(num_rounds=2, server_lr=1.0, server_momentum=0.5)
    cur = {"w": np.zeros(2, np.float32), "bn.running_mean": np.zeros(2, np.float32)}
    out = ctrl._server_step(cur, {"w": np.ones(2, np.float32), "bn.running_mean": np.full(2, 3.0, np.float32)})
    np.testing.assert_allclose(out["w"], 1.0)
    np.testing.assert_allclose(out["bn.running_mean"], 3.0)  # statistics are pooled, never momentum-stepped
    out = ctrl._server_step(out, {"w": np.full(2, 2.0, np.float32), "bn.running_mean": np.full(2, 3.0)})
    np.testing.assert_allclose(out["w"], 1.0 + (0.5 * 1.0 + 1.0))


# ---------------------------------------------------------------- compare plan


def test_compare_plans_every_mode_at_one_budget():
    from fedbrain.data.federation import Federation, SiteData
    from fedbrain.data.readers import Record
    from fedbrain.experiments.compare import (
        budget_epochs,
        epochs_per_round,
        iid_federation,
        plan_modes,
        rounds_for_budget,
        summarise,
    )

    def site(name, labels, n):
        recs = [Record(f"/{name}/{i}.png", labels[i % len(labels)]) for i in range(n)]
        return SiteData(name, "multiclass", {"train": recs, "val": recs[:2], "test": recs[:3]}, {})

    fed = Federation(None, {"a": site("a", ["glioma"], 96), "b": site("b", ["no_tumor", "pituitary"], 32)}, {})
    s = JobSettings.create(rounds=10, train={"steps": 2, "batch_size": 16})
    # proportional batches: a step takes 16 images from the federation (12 from a, 4 from b)
    assert epochs_per_round(s, fed) == pytest.approx(2 * 16 / 128)
    assert epochs_per_round(replace(s, batch_split="site"), fed) == pytest.approx(2 * 2 * 16 / 128)
    assert rounds_for_budget(s, fed, 8) == 32 and budget_epochs(replace(s, rounds=32), fed) == 8
    modes = plan_modes(fed, s, ["fedavg", "scaffold"], iid_control=True, ablation=True, legacy=True)
    names = [m.name for m in modes]
    assert names[:4] == ["fedavg", "scaffold", "fedavg IID control", "fedavg legacy"]
    assert names[-3:] == ["centralized", "local:a", "local:b"]
    assert all(m.train.epochs == budget_epochs(s, fed) for m in modes if m.kind != "federated")
    iid = iid_federation(fed, seed=1)
    assert [len(x.splits["train"]) for x in iid.sites.values()] == [96, 32]
    assert {r.label for r in iid.sites["a"].splits["train"]} == {"glioma", "no_tumor", "pituitary"}
    assert iid.sites["b"].splits["test"] == fed.sites["b"].splits["test"]
    rows = [{"mode": m, "kind": k, "seed": sd, "site": "union", "macro_f1": v, "tumour_auroc": 0.9, "n": 5}
            for m, k, sd, v in (("fedavg", "federated", 0, 0.70), ("fedavg", "federated", 1, 0.74),
                                ("centralized", "centralized", 0, 0.80), ("centralized", "centralized", 1, 0.80))]
    fedavg = summarise(rows)[0]
    assert fedavg["macro_f1_mean"] == pytest.approx(0.72) and fedavg["macro_f1_gap"] == pytest.approx(-0.08)
    assert fedavg["macro_f1_sd"] == pytest.approx(np.std([0.70, 0.74], ddof=1))


# ---------------------------------------------------------------- uncertainty


def test_bootstrap_intervals_contain_the_estimate_and_match_the_metrics():
    rng = np.random.default_rng(0)
    t = rng.choice([0, 1, 2, 3, 4], 300)
    logits = rng.normal(0, 1, (300, 4))
    logits[np.arange(300), np.where(t < 4, t, 0)] += 1.2
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    ref = compute_metrics(p, t)
    fast = _fast_metrics(p, t)
    for k in ("macro_f1", "accuracy", "tumour_auroc", "no_tumor_recall", "tumour_accuracy", "ece", "tumour_ece"):
        assert fast[k] == pytest.approx(ref[k])
    ci = bootstrap_ci(p, t, n_boot=300)
    for k, (lo, hi) in ci.items():
        assert lo <= ref[k] <= hi and hi - lo < 0.3


def test_small_n_metrics_are_flagged():
    flags = small_n_flags(np.array([0] * 30 + [1] * 12 + [NO_TUMOR] * 1))
    assert "tumour_auroc" in flags and "no_tumor_recall" in flags and "macro_f1" in flags
    assert small_n_flags(np.array([0] * 30 + [NO_TUMOR] * 12)) == {}


# ---------------------------------------------------------------- do the features encode the site?


def test_site_probe_tells_styled_sites_apart_and_not_identical_ones():
    from types import SimpleNamespace

    from fedbrain.evaluation import site_separability
    from fedbrain.models import create_model
    torch.manual_seed(0)
    model = create_model("fedbrain_cnn_gn")  # one grey channel, as the synthetic sites below

    def site(offset: float, seed: int):
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(40, 1, 64, 64, generator=g) * 0.5 + offset
        return SimpleNamespace(site=SimpleNamespace(splits={"test": list(range(40))}),
                               eval=lambda _split, _x=x: [(_x[:20], None), (_x[20:], None)])

    styled = site_separability(model, "fedbrain_cnn_gn", {"a": site(0.0, 1), "b": site(2.0, 2)})
    same = site_separability(model, "fedbrain_cnn_gn", {"a": site(0.0, 1), "b": site(0.0, 2)})
    assert styled["chance"] == 0.5 and styled["n"] == 80
    assert styled["site_probe_balanced_accuracy"] > 0.9
    assert same["site_probe_balanced_accuracy"] < 0.8
