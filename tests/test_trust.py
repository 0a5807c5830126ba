"""Issue 14: calibrated probabilities (pooled and federated fits), inputs outside the training data, robustness to
acquisition shifts, external validation in every layout, and leave-one-hospital-out."""

from __future__ import annotations

import csv
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fedbrain import calibration as cal
from fedbrain.checkpoint import ModelCard, read_card, save_checkpoint
from fedbrain.cli.main import main
from fedbrain.contract import (
    AUGMENTATIONS,
    DEFAULT_AUGMENTATION,
    NO_TUMOR,
    TUMOUR_ANY,
    TUMOUR_CLASSES,
    Augmentation,
    Preprocessing,
)
from fedbrain.data.dataset import augment_batch
from fedbrain.fl.metrics import federated_calibration, pooled_validation, validation_counts
from fedbrain.input_check import build_profile, check_input, feature_histograms, pooled_ranges, profile_of_metrics
from fedbrain.models import create_model, default_preprocessing
from fedbrain.predict import load_predictor
from fedbrain.robustness import SHIFTS, STRENGTHS, shifted
from fedbrain.training import compute_metrics

os.environ.setdefault("FEDBRAIN_OFFLINE", "1")
DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def _miscalibrated(n: int = 4000, slope: float = 0.5, bias: float = 1.0, type_scale: float = 2.0, seed: int = 0):
    """Labels drawn from known posteriors and a model's probabilities that distort them in a known way: its tumour
    log-odds are ``(z - bias) / slope`` of the true ``z``, its type log-probabilities ``type_scale`` times too sharp.
    The calibration that undoes this is ``tumour_slope = slope``, ``tumour_bias = bias``, ``type_temperature =
    type_scale``."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0.5, 2.0, n)  # true tumour log-odds
    tumour = rng.random(n) < 1 / (1 + np.exp(-z))
    type_logits = rng.normal(0, 1.2, (n, 3))
    q = np.exp(type_logits) / np.exp(type_logits).sum(1, keepdims=True)  # true p(type | tumour)
    types = np.array([rng.choice(3, p=row) for row in q])
    y = np.where(tumour, np.array(TUMOUR_CLASSES)[types], NO_TUMOR)
    p_tumour = 1 / (1 + np.exp(-(z - bias) / slope))
    q_model = np.exp(type_scale * type_logits)
    q_model /= q_model.sum(1, keepdims=True)
    probs = np.zeros((n, 4))
    probs[:, NO_TUMOR] = 1 - p_tumour
    probs[:, list(TUMOUR_CLASSES)] = q_model * p_tumour[:, None]
    return probs.astype(np.float32), y


# ---------------------------------------------------------------- calibration


def test_the_fit_recovers_a_known_distortion_and_lowers_both_eces():
    probs, y = _miscalibrated()
    record = cal.fit(probs, y, "synthetic")
    assert record["tumour_slope"] == pytest.approx(0.5, rel=0.1)
    assert record["tumour_bias"] == pytest.approx(1.0, abs=0.15)
    assert record["type_temperature"] == pytest.approx(2.0, rel=0.1)  # the Brier score is proper: the true T wins
    assert record["tumour"]["fitted"] and record["type"]["fitted"]
    assert record["tumour"]["nll_after"] < record["tumour"]["nll_before"]
    assert record["type"]["brier_after"] < record["type"]["brier_before"]
    calibrator = cal.Calibrator.from_record(record)
    fresh, y2 = _miscalibrated(seed=1)  # new images from the same distortion
    calibrated = calibrator.apply(fresh)
    assert np.allclose(calibrated.sum(1), 1, atol=1e-5)
    types = list(TUMOUR_CLASSES)
    assert (calibrated[:, types].argmax(1) == fresh[:, types].argmax(1)).all()  # the type ranking never changes
    raw, after = compute_metrics(fresh, y2), compute_metrics(calibrated, y2)
    assert after["tumour_ece"] < 0.5 * raw["tumour_ece"] and after["ece"] < 0.5 * raw["ece"]
    assert after["tumour_auroc"] == pytest.approx(raw["tumour_auroc"], abs=1e-6)  # monotone in the tumour log-odds


def test_the_federated_fit_is_the_pooled_fit_of_the_sites_sums():
    probs, y = _miscalibrated(slope=0.7, bias=-0.5, type_scale=0.6, seed=2)
    y = y.copy()
    y[:800] = np.where(y[:800] == NO_TUMOR, NO_TUMOR, TUMOUR_ANY)  # a binary site: "tumour, type unknown"
    parts = [(probs[:800], y[:800]), (probs[800:2500], y[800:2500]), (probs[2500:], y[2500:])]
    rows = [{**validation_counts(p, t), **cal.site_sums(p, t)} for p, t in parts]
    assert all(isinstance(v, float) for r in rows for k, v in r.items() if k.startswith(cal.PREFIX))
    pooled = pooled_validation(rows)
    record = federated_calibration(pooled)
    reference = cal.fit(probs, y, "pooled")
    for key in ("tumour_slope", "tumour_bias", "type_temperature"):
        assert record[key] == pytest.approx(reference[key], rel=1e-9), key
    assert record["n"] == len(y) and record["tumour"]["n_healthy"] == int((y == NO_TUMOR).sum())
    assert record["type"]["n"] == int(np.isin(y, TUMOUR_CLASSES).sum())  # the binary site's tumours: no type
    assert "federated" in record["fitted_on"] and record["method"] == cal.METHOD
    assert federated_calibration({}) == {}  # sites that sent no sums: no calibration claimed


def test_too_few_validation_images_leave_a_level_as_it_is_and_say_why():
    probs, y = _miscalibrated(n=400, seed=3)
    y = np.where(y == NO_TUMOR, NO_TUMOR, TUMOUR_ANY)  # tumour / no tumour labels only (the demo's federation)
    record = cal.fit(probs, y, "binary sites")
    assert record["tumour"]["fitted"] and not record["type"]["fitted"] and record["type_temperature"] == 1.0
    assert any("tumour types left as is" in n for n in cal.notes(record))
    few = np.concatenate([np.flatnonzero(y == NO_TUMOR)[:5], np.flatnonzero(y != NO_TUMOR)[:50]])
    record = cal.fit(probs[few], y[few], "5 healthy images")
    assert (record["tumour_slope"], record["tumour_bias"]) == (1.0, 0.0) and not record["tumour"]["fitted"]
    assert any("5 healthy" in n for n in cal.notes(record))
    assert cal.Calibrator.from_record(record).identity and cal.fit(probs[:0], y[:0], "none") == {}


def test_a_calibrator_reads_older_temperature_cards_and_ignores_malformed_ones():
    probs, _ = _miscalibrated(n=50)
    old = cal.Calibrator.from_record({"temperature": 2.0, "fitted_on": "an older run"})
    assert np.allclose(old.apply(probs), cal.apply_temperature(probs, 2.0)) and old.params() == {"temperature": 2.0}
    for bad in ({}, None, {"temperature": -1}, {"tumour_slope": float("nan"), "type_temperature": 0},
                {"temperature": True}):
        assert cal.Calibrator.from_record(bad).identity, bad
    assert np.array_equal(cal.Calibrator().apply(probs), probs)


def test_the_calibration_travels_in_pt_and_onnx_model_cards_and_predict_uses_it(tmp_path):
    pre = default_preprocessing("fedbrain_cnn")
    record = {"tumour_slope": 0.5, "tumour_bias": 0.8, "type_temperature": 2.0, "fitted_on": "test"}
    card = ModelCard("fedbrain_cnn", pre, "multiclass", calibration=record,
                     extra={"input_profile": {"ranges": {"mean": [0.1, 0.5]}}})
    torch.manual_seed(0)
    model = create_model("fedbrain_cnn").eval()
    path = save_checkpoint(tmp_path / "best.pt", model, card)
    expected_params = {"tumour_slope": 0.5, "tumour_bias": 0.8, "type_temperature": 2.0}
    assert read_card(path).calibrator.params() == expected_params
    back = ModelCard.from_onnx_metadata(card.to_onnx_metadata())
    assert back.calibrator.params() == expected_params and back.extra["input_profile"]["ranges"]["mean"] == [0.1, 0.5]
    predictor = load_predictor(path)
    rng = np.random.default_rng(0)
    arr = (rng.random((128, 128)) * 60 + np.linspace(0, 150, 128)[None]).astype(np.uint8)
    logits = predictor.logits(predictor.preprocess(arr)).astype(np.float64)[0]
    p = np.exp(logits) / np.exp(logits).sum()
    types = list(TUMOUR_CLASSES)
    z = np.log(p[types].sum()) - np.log(p[NO_TUMOR])
    p_tumour = 1 / (1 + np.exp(-(0.5 * z + 0.8)))
    q = p[types] ** 0.5 / (p[types] ** 0.5).sum()  # log-probabilities divided by the type temperature 2
    expected = np.zeros(4)
    expected[NO_TUMOR], expected[types] = 1 - p_tumour, q * p_tumour
    pred = predictor.predict(arr)
    assert np.allclose(list(pred.probabilities.values()), expected, atol=1e-5)
    assert pred.tumour_probability == pytest.approx(p_tumour, abs=1e-5) and pred.calibration == expected_params
    x = predictor.preprocess(arr)
    assert np.allclose(predictor.probabilities(x)[0], expected, atol=1e-5)
    assert np.allclose(predictor.raw_probabilities(x)[0], p, atol=1e-5)


# ---------------------------------------------------------------- inputs outside the training data


def _slices(n: int, rng: np.random.Generator, size: int = 128) -> np.ndarray:
    """Bright ovals on black: the shape of an axial brain slice."""
    yy, xx = np.mgrid[0:size, 0:size] / size - 0.5
    out = []
    for _ in range(n):
        a, b = rng.uniform(0.3, 0.42), rng.uniform(0.3, 0.42)
        inside = (xx / a) ** 2 + (yy / b) ** 2 < 1
        img = np.where(inside, rng.uniform(90, 160) + rng.normal(0, 25, (size, size)), rng.uniform(0, 8))
        out.append(np.clip(img, 0, 255).astype(np.uint8))
    return np.stack(out)


def test_input_check_flags_what_is_not_like_the_training_slices():
    rng = np.random.default_rng(0)
    reference, held_out = _slices(400, rng), _slices(100, rng)
    profile = build_profile(reference, "test slices")
    pre = Preprocessing()
    flagged = sum(bool(check_input(a, profile, pre)) for a in held_out)
    assert flagged <= 8  # ~5 features at their central 99 %
    yy, xx = np.mgrid[0:256, 0:256]
    gradient = xx.astype(np.uint8)
    document = np.where(rng.random((256, 256)) < 0.1, 0, 255).astype(np.uint8)  # white page, dark marks
    for odd in (gradient, document):
        warnings = check_input(odd, profile, pre)
        assert warnings and all("range of the reference slices" in w for w in warnings)


def test_the_federated_profile_is_the_pooled_profile_at_bin_resolution():
    rng = np.random.default_rng(1)
    a, b = _slices(150, rng), _slices(250, rng)
    federated = profile_of_metrics({f"val_pooled_{k}": v for k, v in
                                    pooled_ranges([feature_histograms(a), feature_histograms(b)]).items()})
    pooled = build_profile(np.concatenate([a, b]), "pooled")
    assert federated["n"] == 400 and "federated" in federated["source"]
    for key, (lo, hi) in federated["ranges"].items():
        plo, phi = pooled["ranges"][key]
        width = 0.02  # widest histogram bin
        assert lo <= plo + 1e-9 and hi >= phi - 1e-9 and plo - lo <= width + 1e-9 and hi - phi <= width + 1e-9


# ---------------------------------------------------------------- augmentation policy


@pytest.mark.slow
def test_a_simulated_federation_saves_its_policy_calibration_and_input_profile(sim_run):
    card = read_card(sim_run / "checkpoints" / "best.pt")
    assert tuple(card.training["augmentation"]["gamma"]) == AUGMENTATIONS[DEFAULT_AUGMENTATION].gamma
    assert card.calibration["fitted_on"].startswith("federated") and card.calibration["n"] > 0
    profile = card.extra["input_profile"]  # from the sites' summed histograms of their training images
    train = sum(1 for f in (sim_run / "splits").glob("*.csv") for row in csv.DictReader(f.open())
                if row["split"] == "train")
    assert profile["source"].startswith("federated") and profile["n"] == train
    results = json.loads((sim_run / "results.json").read_text())["test"]["union"]
    assert results["calibration"] == card.calibrator.params() and "reliability" in results


def test_the_robust_policy_varies_gamma_and_field_of_view():
    robust = AUGMENTATIONS["robust"]
    assert robust.gamma[0] < 1 < robust.gamma[1] and robust.scale[0] < Augmentation().scale[0]
    x = torch.full((64, 1, 16, 16), 0.5)
    g = torch.Generator().manual_seed(0)
    no_geometry = Augmentation(hflip=False, max_rotate_deg=0, scale=(1, 1), translate=0, brightness=0, contrast=0,
                               gamma=robust.gamma)
    out = augment_batch(x, no_geometry, g)
    means = out.mean(dim=(1, 2, 3))
    assert means.min() < 0.5 ** robust.gamma[0] + 0.02 and means.max() > 0.5 ** robust.gamma[1] - 0.02
    assert means.std() > 0.03


# ---------------------------------------------------------------- robustness


def test_shifts_are_deterministic_and_grow_with_strength():
    imgs = _slices(6, np.random.default_rng(2))
    for sh in SHIFTS:
        out = [shifted(imgs, sh, s) for s in STRENGTHS]
        assert all(o.shape == imgs.shape and o.dtype == np.uint8 for o in out)
        assert np.array_equal(out[1], shifted(imgs, sh, "moderate"))  # seeded
        change = [np.abs(o.astype(float) - imgs).mean() for o in out]
        assert change[1] > 0, sh.name
        if sh.name != "mirror":
            assert change[0] <= change[1] <= change[2] + 1e-9, (sh.name, change)
    assert np.array_equal(shifted(imgs, SHIFTS[-1], "moderate"), imgs[:, :, ::-1])


@pytest.mark.slow  # scores 36 shifted copies of the test split
def test_evaluate_robustness_writes_every_shift_for_the_run(compression_synthetic_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(compression_synthetic_run, run, ignore=shutil.ignore_patterns("compression", "evaluation"))
    assert main(["evaluate", str(run), "--robustness", "--cache-dir", str(tmp_path / "cache")]) == 0
    out = capsys.readouterr().out
    assert "worst tumour auroc drop at moderate strength" in out
    res = json.loads((run / "evaluation" / "robustness-best.json").read_text())
    assert len(res["rows"]) == 3 * (len(SHIFTS) - 1) + 1  # mirror has one strength
    assert {r["shift"] for r in res["rows"]} == {s.name for s in SHIFTS}
    assert res["clean"]["n"] == 32 and res["worst"]["macro_f1"]["strength"] == "moderate"
    assert (run / "evaluation" / "robustness-best.csv").is_file()


# ---------------------------------------------------------------- external validation


def _copy(src: list[Path], dst: Path) -> None:
    dst.mkdir(parents=True, exist_ok=True)
    for p in src:
        shutil.copy(p, dst / p.name)


def _first(folder: Path, n: int) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))[:n]


@pytest.fixture(scope="module")
def layouts(tmp_path_factory) -> dict[str, tuple[Path, int]]:
    """Real MRI slices from ../shared/data laid out in every supported layout: ``layout -> (folder, images)``."""
    if not DATA.is_dir():
        pytest.fail(f"the benchmark data is missing at {DATA}")
    root = tmp_path_factory.mktemp("external")
    out = {}
    fig = root / "figshare"
    for k in ("0", "1", "2"):
        _copy(_first(DATA / "figshare_cheng" / k, 4), fig / k)
    out["figshare"] = (fig, 12)
    sar = root / "sartaj"
    for c in ("glioma_tumor", "meningioma_tumor", "pituitary_tumor", "no_tumor"):
        _copy(_first(DATA / "sartaj" / "Testing" / c, 3), sar / "Testing" / c)
    out["sartaj"] = (sar, 12)
    yn = root / "yesno"
    for c in ("yes", "no"):
        _copy(_first(DATA / "navoneel" / c, 5), yn / c)
    out["yesno"] = (yn, 10)
    gen = root / "folders"
    for c, src in (("glioma", DATA / "sartaj" / "Testing" / "glioma_tumor"), ("healthy", DATA / "navoneel" / "no")):
        _copy(_first(src, 4), gen / c)
    (gen / "healthy" / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")  # skipped and counted, never scored
    out["folders"] = (gen, 8)
    man = root / "csv"
    _copy(_first(DATA / "navoneel" / "yes", 3) + _first(DATA / "navoneel" / "no", 3), man / "img")
    with (man / "manifest.csv").open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "label"])
        for p in sorted((man / "img").iterdir()):
            w.writerow([f"img/{p.name}", "yes" if p.name in {q.name for q in _first(DATA / "navoneel" / "yes", 3)}
                        else "no"])
    out["csv"] = (man, 6)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["figshare", "sartaj", "yesno", "folders", "csv"])
def test_evaluate_external_scores_real_images_in_every_layout(layout, layouts, compression_synthetic_run, tmp_path,
                                                              capsys):
    folder, n = layouts[layout]
    out = tmp_path / "external.json"
    rc = main(["evaluate", str(compression_synthetic_run / "checkpoints" / "best.pt"), "--external", str(folder),
               "--layout", layout, "--json", str(out), "--cache-dir", str(tmp_path / "cache")])
    assert rc == 0
    res = json.loads(out.read_text())
    assert res["n_images"] == n and res["results"]["all images"]["n"] == n
    assert res["n_training_twins"] == 0 and res["twin_check"] == "run training split"
    assert "ci" in res["results"]["all images"]
    if layout == "folders":
        assert sum(v for k, v in res["skipped"].items() if k.startswith("unreadable image")) == 1
    if layout in ("yesno", "csv"):
        assert res["scheme"] == "binary" and "tumour_auroc" in res["results"]["all images"]
    assert "near-duplicates of the run's training images: 0" in capsys.readouterr().out


def test_external_images_that_are_training_twins_are_counted_and_scored_apart(compression_synthetic_run, tmp_path):
    run = compression_synthetic_run
    rows = list(csv.DictReader((run / "splits" / "site-a.csv").open()))
    ext = tmp_path / "ext"
    for r in rows:
        if r["split"] == "test" or (r["split"] == "train" and r["path"].endswith("_0.png")):
            dst = ext / r["label"]
            dst.mkdir(parents=True, exist_ok=True)
            img = Image.open(r["path"])
            if r["split"] == "train":  # a re-encoded, mirrored copy of a training image is still a twin
                img = img.transpose(Image.FLIP_LEFT_RIGHT)
            img.save(dst / f"{r['split']}-{Path(r['path']).stem}.jpg", quality=90)
    out = tmp_path / "ext.json"
    assert main(["evaluate", str(run / "checkpoints" / "best.pt"), "--external", str(ext), "--layout", "folders",
                 "--json", str(out), "--cache-dir", str(tmp_path / "cache")]) == 0
    res = json.loads(out.read_text())
    assert res["n_images"] == 32 + 4 and res["n_training_twins"] >= 4
    assert res["results"]["without training twins"]["n"] == 36 - res["n_training_twins"]


def test_evaluate_external_refuses_bad_requests_clearly(compression_synthetic_run, tmp_path, capsys):
    best = str(compression_synthetic_run / "checkpoints" / "best.pt")
    assert main(["evaluate", best, "--external", str(tmp_path)]) == 2
    assert "--layout" in capsys.readouterr().err
    assert main(["evaluate", best, "--external", str(tmp_path / "nope"), "--layout", "yesno"]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "yes").mkdir()
    (tmp_path / "yes" / "a.jpg").write_bytes(b"junk")
    assert main(["evaluate", best, "--external", str(tmp_path), "--layout", "yesno"]) == 2
    assert "none of the 1 images" in capsys.readouterr().err


@pytest.mark.slow
def test_onnx_models_are_scored_externally_through_the_same_predictor(compression_output, layouts, tmp_path):
    folder, n = layouts["yesno"]
    out = tmp_path / "onnx.json"
    assert main(["evaluate", str(compression_output / "int8.onnx"), "--external", str(folder), "--layout", "yesno",
                 "--json", str(out), "--cache-dir", str(tmp_path / "cache")]) == 0
    res = json.loads(out.read_text())
    assert res["results"]["all images"]["n"] == n and res["twin_check"] == "run training split"


# ---------------------------------------------------------------- a hospital's own calibration


@pytest.fixture()
def own_slices(compression_synthetic_run, tmp_path) -> Path:
    """A hospital's labelled slices, class per folder: every image of the synthetic run (22 per class)."""
    root = tmp_path / "own_slices"
    for r in csv.DictReader((compression_synthetic_run / "splits" / "site-a.csv").open()):
        folder = root / ("healthy" if r["label"] == "no_tumor" else r["label"])
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copy(r["path"], folder / f"{r['split']}-{Path(r['path']).name}")
    return root


@pytest.mark.parametrize("variant", ["best.pt", "int8.onnx"])
def test_calibrate_refits_on_a_hospitals_own_slices_and_keeps_what_it_cannot_fit(
        variant, own_slices, compression_synthetic_run, compression_output, tmp_path, capsys):
    source = (compression_synthetic_run / "checkpoints" if variant == "best.pt" else compression_output) / variant
    before = read_card(source) if variant == "best.pt" else load_predictor(source).card
    previous = {"tumour_slope": 0.7, "tumour_bias": 0.3, "type_temperature": 0.5, "fitted_on": "the federation"}
    model = tmp_path / f"model{source.suffix}"
    from fedbrain.external import save_with_calibration

    save_with_calibration(source, model, previous)  # a model whose federation fitted both levels
    out = tmp_path / f"local{source.suffix}"
    assert main(["calibrate", str(model), "--data", str(own_slices), "--layout", "folders", "--scheme", "binary",
                 "--out", str(out), "--cache-dir", str(tmp_path / "cache")]) == 0
    printed = capsys.readouterr().out  # tumour / no tumour labels only: the type level stays the federation's
    assert "66 tumour and 22 healthy images" in printed and "tumour types kept from the federation" in printed
    card = load_predictor(out).card
    record = card.calibration
    assert record["fitted_on"].startswith("local: 88 labelled images") and record["tumour"]["fitted"]
    assert record["type_temperature"] == 0.5 and record["type"]["kept_from"] == "the federation"
    assert (record["tumour_slope"], record["tumour_bias"]) != (0.7, 0.3)
    assert card.model == before.model and card.preprocessing == before.preprocessing  # the rest of the card stays
    assert load_predictor(model).card.calibration == previous  # the input file is untouched


def test_calibrate_refuses_bad_requests_clearly(own_slices, compression_synthetic_run, tmp_path, capsys):
    best = compression_synthetic_run / "checkpoints" / "best.pt"
    assert main(["calibrate", str(best), "--data", str(own_slices), "--layout", "folders", "--out",
                 str(tmp_path / "x.onnx")]) == 2
    assert "keep the model's format" in capsys.readouterr().err
    assert main(["calibrate", str(best), "--data", str(own_slices), "--layout", "folders", "--out", str(best)]) == 2
    assert "names the model file itself" in capsys.readouterr().err
    assert main(["calibrate", str(best), "--data", str(tmp_path / "nope"), "--layout", "yesno"]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert not list(best.parent.glob("*-local.pt"))  # nothing written


def test_keep_unfitted_takes_only_the_levels_a_local_fit_could_not_make():
    probs, y = _miscalibrated(n=400, seed=5)
    local = cal.fit(probs, np.where(y == NO_TUMOR, NO_TUMOR, TUMOUR_ANY), "local")  # no tumour types here
    previous = {"tumour_slope": 2.0, "tumour_bias": -1.0, "type_temperature": 0.4, "fitted_on": "the federation"}
    merged = cal.keep_unfitted(local, previous)
    assert merged["tumour_slope"] == local["tumour_slope"] and merged["type_temperature"] == 0.4
    assert any("tumour types kept from the federation" in n for n in cal.notes(merged))
    assert cal.keep_unfitted(local, {"temperature": 2.0}) == local  # an older card: nothing to keep
    reversed_ranking = cal.fit(probs, np.where(y == NO_TUMOR, TUMOUR_ANY, NO_TUMOR), "labels swapped")
    assert not reversed_ranking["tumour"]["fitted"] and reversed_ranking["tumour_slope"] == 1.0
    kept = cal.keep_unfitted(reversed_ranking, previous)
    assert kept["tumour_slope"] == 2.0 and any("would reverse its ranking" in n for n in cal.notes(kept))


# ---------------------------------------------------------------- leave-one-hospital-out


@pytest.mark.slow
def test_compare_leave_one_out_scores_each_hospital_unseen(tmp_path, capsys):
    rc = main(["compare", "--set", "data.max_images_per_site=30", "--rounds", "1", "--algorithms", "--no-baselines",
               "--leave-one-out", "--set", "cross_site_eval=false", "--workspace", str(tmp_path)])
    assert rc == 0
    out = capsys.readouterr().out
    assert "leave-one-hospital-out" in out
    run = next(p for p in tmp_path.iterdir() if p.name.startswith("compare"))
    rows = json.loads((run / "compare.json").read_text())["rows"]
    unseen = [r for r in rows if "unseen hospital" in (r.get("evaluated_on") or "")]
    assert {r["mode"] for r in unseen} == {f"fedavg without hospital-{i}" for i in (1, 2, 3)}
    for r in unseen:  # the held-out hospital is scored, and took no part in training
        assert r["mode"].endswith(r["site"])
        trained = {x["site"] for x in rows if x["mode"] == r["mode"] and x.get("evaluated_on") == "test split"}
        assert r["site"] not in trained
    every = [r for r in unseen if r["evaluated_on"].startswith("every image")]
    assert all(r["n"] > 10 for r in every)
    card = read_card(run / "fedavg_without_hospital-1" / "checkpoints" / "best.pt")
    assert "hospital-1" not in card.label_schemes and card.calibration.get("fitted_on", "").startswith("federated")
    assert card.extra.get("input_profile", {}).get("source", "").startswith("federated")


def test_the_leave_one_out_table_shows_the_raw_decisions_beside_the_calibrated_ones():
    from fedbrain.evaluation import scored
    from fedbrain.experiments.compare import UNSEEN_TEST, Mode, _rows, leave_one_out_table

    probs, y = _miscalibrated(n=600, slope=0.5, bias=2.0, seed=4)
    calibrator = cal.Calibrator.from_record(cal.fit(probs, y, "synthetic"))
    m = scored(probs, y, n_boot=50, calibrator=calibrator)
    rows = _rows(Mode("fedavg without hospital-9", "federated"), 0, {"hospital-9": m}, 8, 10, 1.0, None,
                 evaluated_on=UNSEEN_TEST)
    assert rows[0]["tumour_accuracy_raw"] == m["uncalibrated"]["tumour_accuracy"] != m["tumour_accuracy"]
    table = leave_one_out_table(rows)
    assert "tumour accuracy (raw)" in table
    assert f"{m['tumour_accuracy']:.3f} ({m['uncalibrated']['tumour_accuracy']:.3f})" in table


def test_leave_one_out_of_one_hospital_is_refused_before_any_run(tmp_path, capsys):
    rc = main(["compare", "--set", "data.num_sites=1", "--set", "data.max_images_per_site=30",
               "--leave-one-out", "--workspace",
               str(tmp_path)])
    assert rc == 2 and "at least two hospitals" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())
