"""The frozen-trunk feature cache: head-only training on cached features is training through the frozen model."""

import copy

import numpy as np
import pytest
import torch

from fedbrain.contract import augmentation_policy
from fedbrain.data.dataset import BatchLoader, PoissonLoader, SliceDataset
from fedbrain.dp import DPSGDConfig, PrivateTraining
from fedbrain.features import FeatureCache, feature_cache
from fedbrain.models import apply_finetune, create_model, default_preprocessing, model_info
from fedbrain.training import TrainConfig, partial_label_loss, predict_proba, train_epochs

NONE = augmentation_policy("none")
MODELS = ["efficientnet_lite0", "fedbrain_cnn"]


def slices(name: str, n: int = 12, size: int = 64, seed: int = 0) -> SliceDataset:
    """``n`` random greyscale slices with labels of every kind, at the model's preprocessing and ``size``."""
    rng = np.random.default_rng(seed)
    ds = SliceDataset.__new__(SliceDataset)
    ds.records, ds.pre = [None] * n, default_preprocessing(name, size)
    ds.images = rng.integers(0, 256, (n, size, size), dtype=np.uint8)
    ds.targets = torch.arange(n) % 5
    return ds


def head_only(name: str, base: torch.nn.Module) -> torch.nn.Module:
    model = copy.deepcopy(base)
    apply_finetune(model, name, "head")
    return model


def head_keys(model: torch.nn.Module, name: str) -> set[str]:
    head = {id(p) for p in model_info(name).blocks(model)[1].parameters()}
    return {k for k, v in model.state_dict(keep_vars=True).items() if id(v) in head}


@pytest.mark.parametrize("name", MODELS)
def test_head_on_cached_features_has_the_loss_and_gradients_of_the_full_frozen_model(name):
    torch.manual_seed(0)
    base = create_model(name, pretrained=False)
    full, cached = head_only(name, base), head_only(name, base)
    ds = slices(name)
    cache = FeatureCache(cached, name)
    x, y = next(iter(BatchLoader(ds, 6, train=True, augmentation=NONE, seed=1)))
    f, y2 = next(iter(BatchLoader(ds, 6, train=True, augmentation=NONE, seed=1, features=cache)))
    assert torch.equal(y, y2)
    losses = []
    for model, forward, batch in [(full, full, x), (cached, cache.head, f)]:
        model.train()
        torch.manual_seed(5)  # the same dropout mask before the head
        loss = partial_label_loss(forward(batch), y)
        loss.backward()
        losses.append(loss.detach())
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-5, atol=1e-6)
    for (k, p), q in zip(full.named_parameters(), cached.parameters(), strict=True):
        assert (p.grad is None) == (q.grad is None), k
        if p.grad is not None:
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6)
    assert any(p.grad is not None for p in cached.parameters())


@pytest.mark.parametrize("name", [pytest.param("efficientnet_lite0", marks=pytest.mark.slow), "fedbrain_cnn"])
def test_training_on_cached_features_gives_the_full_models_weights_and_releases_every_key(name):
    torch.manual_seed(0)
    base = create_model(name, pretrained=False)
    full, cached = head_only(name, base), head_only(name, base)
    ds = slices(name)
    cfg = TrainConfig(epochs=2, batch_size=4, lr=1e-2, augmentation="none", device="cpu")
    cache = FeatureCache(cached, name)
    stats = []
    for model, features in [(full, None), (cached, cache)]:
        torch.manual_seed(7)
        stats.append(train_epochs(model, BatchLoader(ds, 4, True, NONE, seed=2, features=features), cfg))
    assert stats[0]["steps"] == stats[1]["steps"] > 0
    assert stats[0]["loss"] == pytest.approx(stats[1]["loss"], rel=1e-5)
    released, reference = cached.state_dict(), full.state_dict()
    assert set(released) == set(base.state_dict())  # the full model leaves the site, not its head
    for k, v in reference.items():
        torch.testing.assert_close(released[k], v, rtol=1e-4, atol=1e-6)
    trained = head_keys(cached, name)
    assert trained and all(not torch.equal(released[k], base.state_dict()[k]) for k in trained)
    assert all(torch.equal(released[k], v) for k, v in base.state_dict().items() if k not in trained)
    probs_full, _ = predict_proba(full, BatchLoader(ds, 5))
    probs_cached, _ = predict_proba(cached, BatchLoader(ds, 5, features=cache))
    np.testing.assert_allclose(probs_full, probs_cached, rtol=1e-4, atol=1e-6)
    assert cache.computed == len(ds)  # the trunk ran once over the split, for every epoch and the evaluation


def test_a_frozen_trunk_gives_the_same_features_in_training_mode():
    name = "efficientnet_b0"  # torchvision's blocks drop residual branches at random in training (stochastic depth)
    torch.manual_seed(0)
    model = head_only(name, create_model(name, pretrained=False))
    x = torch.randn(2, 3, 32, 32)
    model.train()
    first, second = model.features(x), model.features(x)
    assert torch.equal(first, second)


def test_the_features_are_computed_again_only_when_the_trunk_changes():
    name = "fedbrain_cnn"
    torch.manual_seed(0)
    model = head_only(name, create_model(name, pretrained=False))
    ds, cache = slices(name), FeatureCache(model, name)
    first = cache.of(ds)
    with torch.no_grad():
        cache.head.head.weight.add_(1.0)  # a new head (a round's global model): same features
    assert cache.of(ds) is first and cache.computed == len(ds)
    with torch.no_grad():
        next(iter(model.features.parameters())).mul_(0.5)  # new trunk weights: features computed again
    assert not torch.equal(cache.of(ds), first) and cache.computed == 2 * len(ds)


def test_the_features_are_kept_on_disk_and_read_back(tmp_path):
    name = "fedbrain_cnn"
    torch.manual_seed(0)
    model = head_only(name, create_model(name, pretrained=False))
    ds = slices(name)
    first = FeatureCache(model, name, tmp_path).of(ds)
    again = FeatureCache(model, name, tmp_path)
    assert torch.equal(again.of(ds), first) and again.computed == 0


@pytest.mark.parametrize("finetune, augmentation, why", [
    ("head", "standard", "augmentation changes the images"),
    ("all", "none", "finetune 'all' trains trunk blocks"),
    ("last-2", "none", "finetune 'last-2' trains trunk blocks"),
])
def test_the_cache_is_not_used_and_says_so_where_it_would_not_be_exact(capsys, finetune, augmentation, why):
    name = "fedbrain_cnn"
    model = create_model(name, pretrained=False)
    apply_finetune(model, name, finetune)
    assert feature_cache(model, name, finetune, augmentation_policy(augmentation), who="site-1") is None
    err = capsys.readouterr().err
    assert "site-1: feature cache off" in err and why in err


def test_the_cache_is_used_and_says_so_for_a_frozen_trunk_without_augmentation(capsys):
    name = "fedbrain_cnn"
    model = head_only(name, create_model(name, pretrained=False))
    assert isinstance(feature_cache(model, name, "head", NONE), FeatureCache)
    assert "feature cache on" in capsys.readouterr().err
    assert feature_cache(model, name, "head", NONE, needs_images="distillation") is None
    assert "distillation needs the images" in capsys.readouterr().err


def test_dp_sgd_trains_the_head_on_cached_features():
    name = "efficientnet_lite0"
    torch.manual_seed(0)
    base = create_model(name, pretrained=False)
    model = head_only(name, base)
    ds = slices(name, n=32)
    cache = FeatureCache(model, name)
    private = PrivateTraining(model, DPSGDConfig(epsilon=8.0, sample_rate=0.5), len(ds), planned_steps=4)
    cfg = TrainConfig(epochs=1, lr=1e-2, augmentation="none", device="cpu")
    stats = train_epochs(model, PoissonLoader(ds, 0.5, seed=3, features=cache), cfg, private=private)
    assert stats["steps"] > 0 and 0 < stats["dp_epsilon"] <= 8.0
    trained = head_keys(model, name)
    after = model.state_dict()
    assert all(not torch.equal(after[k], base.state_dict()[k]) for k in trained)
    assert all(torch.equal(after[k], v) for k, v in base.state_dict().items() if k not in trained)
    assert cache.computed == len(ds)


def _centralised(tmp_path, capsys, cache: bool) -> tuple[dict, str]:
    import json

    from fedbrain.cli.main import main

    ws = tmp_path / f"ws-{cache}"
    rc = main(["train", "--set", "data.max_images_per_site=40", "--model", "fedbrain_cnn", "--image-size", "64",
               "--finetune", "head", "--augmentation", "none", "--epochs", "2", "--batch-size", "8",
               "--set", f"train.feature_cache={str(cache).lower()}", "--cache-dir", str(tmp_path / "cache"),
               "--workspace", str(ws)])
    assert rc == 0
    (run,) = [d for d in ws.iterdir() if (d / "config.json").is_file()]
    return json.loads((run / "results.json").read_text()), capsys.readouterr().err


@pytest.mark.slow
def test_centralised_head_training_on_cached_features_scores_as_through_the_trunk(tmp_path, capsys):
    cached, said = _centralised(tmp_path, capsys, True)
    assert "feature cache on" in said
    full, said = _centralised(tmp_path, capsys, False)
    assert "feature cache off" in said
    assert cached["best_val_score"] == pytest.approx(full["best_val_score"], abs=1e-6)
    assert [h["loss"] for h in cached["history"]] == pytest.approx([h["loss"] for h in full["history"]], rel=1e-5)
    for site, m in full["test"].items():
        assert cached["test"][site].get("tumour_auroc") == pytest.approx(m.get("tumour_auroc"), abs=1e-6), site
