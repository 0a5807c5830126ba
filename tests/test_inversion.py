"""Gradient inversion (issue 28, finding 10 / item 5): what one round's update gives the server, the attack, its
scores beside no-information baselines, ``fedbrain audit --attack inversion`` and the Privacy page."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from fedbrain import inversion as inv
from fedbrain.contract import NO_TUMOR, TUMOUR_ANY
from fedbrain.models import create_model, default_preprocessing

SIZE = 32


def _slices(n: int, seed: int = 0) -> torch.Tensor:
    """Brain-like [0, 1] slices: a dark background, a bright ellipse of random size with a darker blob."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:SIZE, :SIZE] / SIZE - 0.5
    out = []
    for _ in range(n):
        a, b = rng.uniform(0.25, 0.45, 2)
        img = ((xx / a) ** 2 + (yy / b) ** 2 < 1) * rng.uniform(0.6, 0.9)
        cx, cy = rng.uniform(-0.15, 0.15, 2)
        img = img - 0.4 * (((xx - cx) ** 2 + (yy - cy) ** 2) < 0.01)
        out.append(np.clip(img, 0, 1))
    return torch.tensor(np.stack(out), dtype=torch.float32).unsqueeze(1)


@pytest.fixture
def model():
    torch.manual_seed(0)
    return create_model("fedbrain_cnn_gn").eval()


PRE = default_preprocessing("fedbrain_cnn_gn", SIZE)


@pytest.mark.parametrize("label", [NO_TUMOR, TUMOUR_ANY, 2])
def test_one_image_update_gives_the_server_its_label_and_its_pooled_features_exactly(model, label):
    x = _slices(1)
    view = inv.plain_view(model, x, torch.tensor([label]), PRE)
    dw, db = inv._classifier_grads(model, view)
    assert inv.infer_label(db) == label
    true = inv.pooled_features(model, inv._normalise(x, PRE))[0]
    assert torch.allclose(inv.recover_features(model, view), true, rtol=1e-3, atol=1e-5)


def test_secure_aggregation_view_is_the_sample_weighted_sum_of_the_sites_plain_updates(model):
    x, y = _slices(3), torch.tensor([NO_TUMOR, TUMOUR_ANY, NO_TUMOR])
    samples = [26, 5, 2]
    view = inv.secure_view(model, [(x[i:i + 1], y[i:i + 1]) for i in range(3)], samples, PRE)
    plain = [inv.plain_view(model, x[i:i + 1], y[i:i + 1], PRE).gradient for i in range(3)]
    for k, g in enumerate(view.gradient):
        assert torch.allclose(g, sum(n * p[k] for n, p in zip(samples, plain, strict=True)),
                              rtol=1e-4, atol=1e-4)


def test_dp_view_is_clipped_and_noised(model):
    x, y = _slices(2), torch.tensor([NO_TUMOR, TUMOUR_ANY])
    quiet = inv.dp_view(model, x, y, PRE, clip=1e-3, noise_multiplier=0.0)
    norm = float(torch.sqrt(sum((g ** 2).sum() for g in quiet.gradient)))
    assert norm <= 1e-3 / 2 * 2 + 1e-9  # each image's gradient clipped to 1e-3, then averaged
    loud = inv.dp_view(model, x, y, PRE, clip=1e-3, noise_multiplier=1.0)
    assert not torch.allclose(loud.gradient[0], quiet.gradient[0])


def test_ssim_and_psnr_rank_an_image_above_a_noisy_copy_above_a_flat_one():
    x = _slices(1)
    noisy = (x + 0.2 * torch.randn_like(x)).clamp(0, 1)
    flat = torch.full_like(x, float(x.mean()))
    assert float(inv.ssim(x, x)) == pytest.approx(1.0, abs=1e-5)
    assert float(inv.ssim(x, x)) > float(inv.ssim(noisy, x)) > float(inv.ssim(flat, x))
    assert float(inv.psnr(noisy, x)) > float(inv.psnr(flat, x))


def test_score_matches_each_original_to_its_own_reconstruction_and_sees_it_beat_the_baselines():
    x = _slices(3)
    rows = inv.score(x.flip(0), x, _slices(3, seed=1))
    assert [r["reconstruction"] for r in rows] == [2, 1, 0]
    assert all(r["beats_baselines"] for r in rows)
    assert not inv.summary(inv.score(torch.full_like(x, 0.5), x, _slices(3, seed=1)))["any_beats_baselines"]


@pytest.mark.slow
def test_attack_under_secure_aggregation_is_reported_and_does_not_beat_the_baselines(model):
    x, y = _slices(3), torch.tensor([NO_TUMOR, TUMOUR_ANY, NO_TUMOR])
    view = inv.secure_view(model, [(x[i:i + 1], y[i:i + 1]) for i in range(3)], [26, 5, 2], PRE)
    cfg = inv.InversionConfig(iterations=15, restarts=1, feature_iterations=15)
    found = inv.attack_suite(model, view, PRE, cfg)["inverting gradients"]
    rows = inv.score(found["reconstruction"], x[:1], _slices(1, seed=1))
    assert found["info"]["view"] == "secure" and found["reconstruction"].shape == (3, 1, SIZE, SIZE)
    assert not inv.summary(rows)["any_beats_baselines"]


def test_the_default_cnn_has_no_dense_input_layer_so_the_suite_reports_the_analytic_attack_not_applicable(model):
    x, y = _slices(1), torch.tensor([TUMOUR_ANY])
    cfg = inv.InversionConfig(iterations=2, restarts=1, feature_iterations=2)
    suite = inv.attack_suite(model, inv.plain_view(model, x, y, PRE), PRE, cfg)
    assert set(suite) == set(inv.ATTACKS)
    assert "no dense layer on the flattened input" in suite["analytic"]["not_applicable"]
    assert suite["feature inversion"]["reconstruction"].shape == suite["inverting gradients"]["reconstruction"].shape


def _imprint(model, bins: int = 128):
    return inv.imprint_model(model, _slices(32, seed=7), PRE, bins)


def test_imprint_model_gives_the_server_a_batch_s_images_exactly_beating_both_baselines(model):
    x, y = _slices(5), torch.tensor([NO_TUMOR, TUMOUR_ANY, NO_TUMOR, 2, 3])
    crafted = _imprint(model)
    rec = inv.attack_suite(crafted, inv.plain_view(crafted, x, y, PRE), PRE,
                           inv.InversionConfig(iterations=1, restarts=1))["analytic"]["reconstruction"]
    rows = inv.score(rec, x, _slices(5, seed=1))
    assert min(r["ssim"] for r in rows) > 0.9
    assert all(r["beats_baselines"] for r in rows)


def test_imprint_model_leaks_the_target_site_s_images_even_from_the_secure_aggregation_sum(model):
    x, y = _slices(6), torch.tensor([NO_TUMOR, TUMOUR_ANY] * 3)
    crafted = _imprint(model)
    view = inv.secure_view(crafted, [(x[i:i + 2], y[i:i + 2]) for i in (0, 2, 4)], [26, 5, 2], PRE)
    rows = inv.score(inv.analytic_recovery(crafted, view, PRE), x[:2], _slices(2, seed=1))
    assert min(r["ssim"] for r in rows) > 0.9


def test_one_image_through_a_dense_first_layer_is_a_row_s_weight_gradient_over_its_bias_gradient():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(SIZE * SIZE, 16), torch.nn.ReLU(),
                              torch.nn.Linear(16, 4))
    x = _slices(1)
    rec = inv.analytic_recovery(net, inv.plain_view(net, x, torch.tensor([2]), PRE), PRE)
    assert torch.allclose(rec, x, atol=1e-4)


def test_a_site_refuses_weights_with_a_tensor_its_own_model_does_not_have(model):
    from fedbrain.fl.site import to_torch_state

    crafted = {k: v.numpy() for k, v in _imprint(model).state_dict().items()}
    with pytest.raises(ValueError, match=r"refused: .*extra tensors \['back', 'imprint.bias', 'imprint.weight'\]"):
        to_torch_state(crafted, model)
    own = {k: v.numpy() for k, v in model.state_dict().items()}
    first = next(iter(own))
    with pytest.raises(ValueError, match="other shapes"):
        to_torch_state({**own, first: own[first].reshape(-1)}, model)
    assert to_torch_state(own, model).keys() == own.keys()


def test_a_site_builds_only_models_of_its_installed_registry():
    from fedbrain.fl import site

    with pytest.raises(KeyError, match="unknown model 'imprint'"):
        site.create_model("imprint", pretrained=False)


def test_crafted_model_keeps_a_channel_per_pixel_at_its_last_stage():
    model, width = inv.crafted_model(SIZE)
    assert width * 128 >= SIZE * SIZE
    assert inv.pooled_features(model, torch.zeros(1, 1, SIZE, SIZE)).shape[1] >= SIZE * SIZE
    with pytest.raises(ValueError, match="image_size <= 32"):
        inv.crafted_model(64)


@pytest.mark.slow
def test_audit_inversion_writes_its_report_and_pictures_and_the_privacy_page_shows_them(sim_run, monkeypatch):
    from streamlit.testing.v1 import AppTest

    from fedbrain.cli.main import main
    from fedbrain.runs import RunDir

    run = RunDir(sim_run)
    assert main(["audit", str(run.best), "--attack", "inversion", "--images", "1", "--iterations", "2"]) == 0
    result = json.loads(run.inversion_audit.read_text())
    plain = result["attacks"]["default-1-plain"]
    assert plain["images"] == 1 and len(plain["images_scored"]) == 1
    assert {"ssim", "psnr", "flat_ssim", "other_slice_psnr"} <= set(plain["images_scored"][0])
    assert (run.evaluations / plain["png"]).is_file()
    assert "default-1-secure" in result["attacks"]
    assert "not_applicable" in plain["suite"]["analytic"]

    assert main(["audit", str(run.root), "--attack", "inversion", "--setting", "imprint", "--images", "2",
                 "--iterations", "2"]) == 0
    result = json.loads(run.inversion_audit.read_text())
    imprint = result["attacks"]["imprint-2-plain"]
    assert imprint["best_attack"] == "analytic" and imprint["summary"]["any_beats_baselines"]
    assert "default-1-plain" in result["attacks"]  # merged beside the earlier setting

    monkeypatch.setenv("FEDBRAIN_WORKSPACE", str(sim_run.parent))
    at = AppTest.from_string("from fedbrain.dashboard.views import privacy_page\nprivacy_page()",
                             default_timeout=60).run()
    assert not at.exception, [e.value for e in at.exception]
    assert "Gradient inversion of one round" in "\n".join(str(s.value) for s in at.subheader)
    assert "default-1-plain" in "\n".join(str(d.value) for d in at.dataframe)
    assert len(at.get("image")) == 4  # originals over reconstructions: both settings, in the clear and secure
