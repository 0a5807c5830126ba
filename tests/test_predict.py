"""`fedbrain.predict`: one inference API over torch checkpoints and ONNX variants, and `fedbrain predict`.

Reuses the synthetic run and its compression output from test_compression.py (built once per process).
"""

from __future__ import annotations

import io
import json
import os
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fedbrain.checkpoint import CheckpointError, save_checkpoint
from fedbrain.cli.main import main
from fedbrain.contract import CLASSES, Preprocessing
from fedbrain.data.images import ImageError, load_grayscale
from fedbrain.predict import Prediction, Predictor, load_predictor

os.environ.setdefault("FEDBRAIN_OFFLINE", "1")



@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread):
    yield


@pytest.fixture(scope="module")
def comp(compression_output) -> Path:
    return compression_output


@pytest.fixture(scope="module")
def images(compression_synthetic_run) -> dict[str, str]:
    """One test image path per class."""
    from fedbrain.data.federation import SiteData

    run = compression_synthetic_run
    recs = SiteData.read_split_file("site-a", run / "splits" / "site-a.csv").splits["test"]
    return {c: next(r.path for r in recs if r.label == c) for c in CLASSES}


def test_every_variant_loads_with_its_contract(comp, compression_synthetic_run):
    for f, variant, kind in (("fp32.pt", "fp32", "torch"), ("pruned.pt", "pruned", "torch"),
                             ("fp32.onnx", "fp32", "onnx"), ("pruned.onnx", "pruned", "onnx"),
                             ("int8.onnx", "int8", "onnx"), ("pruned_int8.onnx", "pruned+int8", "onnx")):
        p = load_predictor(comp / f)
        assert isinstance(p, Predictor) and p.kind == kind
        assert p.card.variant == variant
        assert p.card.classes == tuple(CLASSES)
        assert isinstance(p.card.preprocessing, Preprocessing)
        assert p.card.preprocessing.image_size == 128
        assert p.card.supervised_granularity == "multiclass"
        assert p.card.model == "fedbrain_cnn"
        assert (p.torch_model is None) == (kind == "onnx")
    plain = load_predictor(compression_synthetic_run / "checkpoints" / "best.pt")
    assert plain.card.variant == "fp32"


def test_prediction_fields_and_torch_onnx_agree(comp, images):
    pt, ox = load_predictor(comp / "fp32.pt"), load_predictor(comp / "fp32.onnx", threads=1)
    for label, path in images.items():
        a, b = pt.predict(path), ox.predict(path)
        assert isinstance(a, Prediction) and list(a.probabilities) == list(CLASSES)
        assert sum(a.probabilities.values()) == pytest.approx(1.0, abs=1e-5)
        assert a.tumour_probability == pytest.approx(1 - a.probabilities["no_tumor"])
        assert a.predicted == max(a.probabilities, key=a.probabilities.get) == label  # the task is learnt
        assert a.latency_ms > 0 and a.variant == "fp32"
        for c in CLASSES:
            assert b.probabilities[c] == pytest.approx(a.probabilities[c], abs=1e-4)


def test_path_bytes_and_array_inputs_give_the_same_result(comp, images):
    p = load_predictor(comp / "int8.onnx")
    path = images["glioma"]
    arr, _ = load_grayscale(path)
    results = [p.predict(path), p.predict(Path(path).read_bytes()), p.predict(arr),
               p.predict(np.stack([arr] * 3, axis=-1))]
    for r in results[1:]:
        assert r.probabilities == pytest.approx(results[0].probabilities, abs=1e-6)
    x = p.preprocess(arr)
    assert x.shape == (1, 1, 128, 128) and x.dtype == np.float32
    from fedbrain.data.dataset import to_tensor
    from fedbrain.data.images import resize

    np.testing.assert_array_equal(x, to_tensor(np.array(resize(arr, 128))[None], p.preprocessing).numpy())


def test_unreadable_images_raise_a_clear_image_error(comp, tmp_path):
    p = load_predictor(comp / "int8.onnx")
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"this is not an image")
    with pytest.raises(ImageError, match="not an image"):
        p.predict(junk)
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64), dtype=np.uint8)).save(buf, "PNG")
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(buf.getvalue()[:80])
    with pytest.raises(ImageError, match="truncated or corrupt"):
        p.predict(truncated)
    with pytest.raises(ImageError, match="empty file"):
        p.predict(b"")
    with pytest.raises(ImageError, match="unreadable file"):
        p.predict(tmp_path / "missing.png")
    with pytest.raises(ImageError, match="HxW uint8"):
        p.predict(np.zeros((64, 64), np.float32))


def test_predict_cli_prints_probabilities(comp, images, capsys):
    rc = main(["predict", images["meningioma"], "--model", str(comp / "int8.onnx")])
    out = capsys.readouterr().out
    assert rc == 0
    header, rule, row = out.strip().splitlines()[1:4]  # one table: a header, a rule, a row per image
    assert header.split() == ["image", "prediction", *CLASSES, "ms"] and set(rule) == {"-"}
    assert row.startswith(images["meningioma"]) and "int8" in out
    assert main(["predict", images["no_tumor"], "-m", str(comp / "pruned.pt"), "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    first = res["predictions"][0]
    assert res["variant"] == "pruned" and set(first["probabilities"]) == set(CLASSES) and not res["errors"]
    assert first["prediction"] in CLASSES and first["latency_ms"] > 0


def test_predict_cli_on_a_corrupt_image_fails_clearly(comp, images, tmp_path, capsys):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 truncated jpeg")
    rc = main(["predict", str(bad), images["glioma"], "--model", str(comp / "fp32.onnx")])
    cap = capsys.readouterr()
    assert rc == 2
    assert "cannot use image" in cap.err and "bad.jpg" in cap.err
    assert images["glioma"] in cap.out  # the good image is still classified


def test_binary_only_checkpoint_predicts_tumour_or_no_tumor(comp, images, tmp_path):
    from fedbrain.checkpoint import load_checkpoint
    from fedbrain.compression.onnx_export import export_onnx

    model, card = load_checkpoint(comp / "fp32.pt")
    card_b = card.replace(supervised_granularity="binary")
    binary = save_checkpoint(tmp_path / "binary.pt", model, card_b)
    onnx_b = export_onnx(model, card_b, tmp_path / "binary.onnx")
    for path in (binary, onnx_b):
        p = load_predictor(path)
        assert p.card.supervised_granularity == "binary"
        preds = {label: p.predict(img) for label, img in images.items()}
        assert {r.predicted for r in preds.values()} <= {"tumour", "no_tumor"}
        assert preds["no_tumor"].predicted == "no_tumor" and preds["glioma"].predicted == "tumour"
        assert all(len(r.probabilities) == 4 for r in preds.values())
        assert set(p.reported_probabilities(preds["glioma"])) == {"tumour", "no_tumor"}


def test_predict_cli_honours_a_binary_models_labels(comp, images, tmp_path, capsys):
    """A model that only ever saw tumour / no-tumour labels reports only that, as the dashboard does."""
    from fedbrain.checkpoint import load_checkpoint

    model, card = load_checkpoint(comp / "fp32.pt")
    binary = save_checkpoint(tmp_path / "binary.pt", model, card.replace(supervised_granularity="binary"))
    assert main(["predict", images["glioma"], images["no_tumor"], "-m", str(binary)]) == 0
    out = capsys.readouterr().out
    assert "tumour vs no tumour only" in out
    assert out.splitlines()[1].split() == ["image", "prediction", "tumour", "no_tumor", "ms"]
    assert not any(c in out for c in ("glioma ", "meningioma", "pituitary"))
    assert main(["predict", images["glioma"], "-m", str(binary), "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert set(res["predictions"][0]["probabilities"]) == {"tumour", "no_tumor"}


def test_models_without_a_contract_are_refused(tmp_path, comp):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_predictor(tmp_path / "nope.onnx")
    plain = tmp_path / "plain.onnx"
    model = load_predictor(comp / "fp32.pt").torch_model
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.zeros(1, 1, 128, 128),), str(plain), dynamo=False)
    with pytest.raises(CheckpointError, match="no fedbrain contract"):
        load_predictor(plain)
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="not a loadable ONNX"):
        load_predictor(junk)
