"""Issue 12: the fast product model, distillation from a teacher inside the federation, and the device rule."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from fedbrain.checkpoint import ModelCard, deployable, load_checkpoint, save_checkpoint
from fedbrain.contract import Preprocessing
from fedbrain.data.dataset import normalise
from fedbrain.distillation import DistillConfig, Distiller, Teacher, distillation_loss, resolve_teacher_file
from fedbrain.models import GREY, WSConv2d, create_model
from fedbrain.settings import JobSettings
from fedbrain.training import (
    TrainConfig,
    autocast_dtype,
    estimate_bn_statistics,
    place,
    resolve_device,
    train_epochs,
)


def _save(folder: Path, name: str, pre: Preprocessing, **kwargs) -> Path:
    torch.manual_seed(0)
    model = create_model(name, pretrained=False, **kwargs)
    card = ModelCard(model=name, model_kwargs=kwargs, preprocessing=pre, supervised_granularity="multiclass",
                     training={"mode": "federated", "rounds": 3})
    return save_checkpoint(folder / f"{name}.pt", model, card)


# ---------------------------------------------------------------- the fast architecture


def test_v2_exports_as_convolutions_only(tmp_path):
    """Weight standardisation folds away: the ONNX graph has no normalisation arithmetic, and the folded model is
    the same function."""
    import onnx

    from fedbrain.compression.onnx_export import export_onnx

    model = create_model("fedbrain_cnn_v2").eval()
    card = ModelCard(model="fedbrain_cnn_v2", preprocessing=GREY, supervised_granularity="multiclass")
    folded, folded_card = deployable(model, card)
    assert not any(isinstance(m, WSConv2d) for m in folded.modules())
    assert folded_card.model_kwargs["norm"] == "none"
    x = torch.randn(3, 1, 128, 128)
    with torch.no_grad():
        assert torch.allclose(model(x), folded(x), atol=1e-5)
    path = export_onnx(model, card, tmp_path / "v2.onnx")
    ops = {n.op_type for n in onnx.load(str(path)).graph.node}
    assert ops <= {"Conv", "Relu", "GlobalAveragePool", "Flatten", "Gemm", "Identity"}, ops
    # the folded card rebuilds the exported architecture
    again = folded_card.build_model()
    again.load_state_dict(folded.state_dict())


def test_v2_budget_and_patchify_stem():
    """Under 0.5 M parameters (int8 under 0.5 MB), and the first layer takes the slice to 1/8 of its size."""
    from fedbrain.models import count_parameters

    v2 = create_model("fedbrain_cnn_v2")
    assert count_parameters(v2) <= 500_000
    x = torch.zeros(1, 1, 128, 128)
    assert v2.features[0](x).shape[-1] == 16


def test_compress_handles_a_weight_standardised_checkpoint(tmp_path, compression_synthetic_run, one_torch_thread):
    """Pruning, fine-tune and int8 run on the folded model; its pruned checkpoint loads back."""
    import shutil

    from fedbrain.compression.data import LocalData
    from fedbrain.compression.pipeline import CompressConfig, compress
    from fedbrain.runs import RunDir

    run = tmp_path / "run"
    shutil.copytree(compression_synthetic_run / "splits", run / "splits")
    src = _save(run / "checkpoints", "fedbrain_cnn_v2", GREY)
    report = compress(src, LocalData.of_run(RunDir(run)), tmp_path / "out",
                      CompressConfig(finetune_epochs=1, repeats=5, warmup=1, threads=(1,), calib_images=16),
                      log=lambda _m: None)
    assert {r["variant"] for r in report["rows"]} == {"fp32", "pruned", "int8", "pruned+int8"}
    pruned, card = load_checkpoint(tmp_path / "out" / "pruned.pt")
    assert card.model_kwargs["norm"] == "none" and not any(isinstance(m, WSConv2d) for m in pruned.modules())


# ---------------------------------------------------------------- distillation


def test_distillation_loss_is_zero_at_the_teacher_and_scaled_by_t_squared():
    t = torch.randn(5, 4)
    assert distillation_loss(t.clone(), t, 2.0).item() == pytest.approx(0.0, abs=1e-6)
    s = torch.randn(5, 4, requires_grad=True)
    loss = distillation_loss(s, t, 1.0)
    loss.backward()
    assert loss.item() > 0 and s.grad is not None and s.grad.abs().sum() > 0
    # at a high temperature the KL shrinks like 1/T^2; the T^2 factor keeps the gradient scale comparable
    hot = distillation_loss(s.detach(), t, 8.0).item()
    assert 0 < hot < 64 * loss.item()
    with pytest.raises(ValueError, match="weight"):
        DistillConfig(weight=1.5)
    with pytest.raises(ValueError, match="temperature"):
        DistillConfig(temperature=0)


def test_teacher_converts_the_students_batch_exactly(tmp_path):
    """A 3-channel ImageNet-normalised teacher at another size sees the student's slice as its own pipeline
    would make it (same [0, 1] slice, its channels, its normalisation, its size)."""
    teacher_pre = Preprocessing(image_size=64, channels=3, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
    path = _save(tmp_path, "fedbrain_cnn", teacher_pre, in_channels=3)
    student_pre = Preprocessing(image_size=48)
    teacher = Teacher(path, student_pre)
    x01 = torch.rand(2, 1, 48, 48)
    got = teacher.to_teacher_input(normalise(x01, student_pre))
    resized = torch.nn.functional.interpolate(x01, size=(64, 64), mode="bilinear", align_corners=False)
    assert got.shape == (2, 3, 64, 64)
    assert torch.allclose(got, normalise(resized, teacher_pre), atol=1e-5)
    assert not any(p.requires_grad for p in teacher.model.parameters())
    assert teacher.describe() == {"model": "fedbrain_cnn", "file": path.name, "image_size": 64,
                                  "training": {"mode": "federated", "rounds": 3}}


def test_teacher_adapts_batchnorm_to_the_site(tmp_path):
    path = _save(tmp_path, "fedbrain_cnn", GREY)
    teacher = Teacher(path, GREY)
    before = [m.running_mean.clone() for m in teacher.model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    site = [(torch.randn(8, 1, 128, 128) * 0.3 + 1.0, torch.zeros(8, dtype=torch.long)) for _ in range(2)]
    assert teacher.adapt_batchnorm(site) == 16
    after = [m.running_mean for m in teacher.model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert not torch.allclose(before[0], after[0])
    assert not teacher.model.training and not any(p.requires_grad for p in teacher.model.parameters())
    gn = Teacher(_save(tmp_path, "fedbrain_cnn_gn", GREY), GREY)
    assert gn.adapt_batchnorm(site) == 0  # nothing to adapt


def test_training_with_only_the_teacher_moves_the_student_to_it(one_torch_thread):
    torch.manual_seed(0)
    teacher_model = create_model("fedbrain_cnn_v2").eval()
    student = create_model("fedbrain_cnn_v2")
    batches = [(torch.randn(16, 1, 32, 32), torch.randint(0, 5, (16,))) for _ in range(4)]

    def gap() -> float:
        student.eval()
        with torch.no_grad():
            return sum(distillation_loss(student(x), teacher_model(x), 1.0).item() for x, _ in batches)

    start = gap()
    stats = train_epochs(student, batches, TrainConfig(epochs=5, lr=3e-3, class_weighting=False),
                         distiller=Distiller(teacher_model, DistillConfig(weight=1.0, temperature=1.0)))
    assert "distil_loss" in stats and stats["distil_loss"] > 0
    assert gap() < 0.5 * start


def test_job_settings_send_sites_only_the_teachers_file_name():
    s = JobSettings(distil_from="/srv/runs/lite0/checkpoints/best.pt", distil_weight=0.7)
    site = json.loads(s.site_json())
    assert site["distil_from"] == "best.pt" and site["distil_weight"] == 0.7
    assert s.distillation() == DistillConfig(0.7, DistillConfig.temperature)
    assert JobSettings().distillation() is None
    with pytest.raises(ValueError, match="distil_teacher_bn"):
        JobSettings(distil_teacher_bn="pooled")


def test_the_site_finds_the_teacher_the_job_carried(tmp_path):
    custom = tmp_path / "app_site-1" / "custom"
    custom.mkdir(parents=True)
    (custom / "teacher.pt").write_bytes(b"x")
    assert resolve_teacher_file("teacher.pt", [custom]) == custom / "teacher.pt"
    assert resolve_teacher_file(str(custom / "teacher.pt"), []) == custom / "teacher.pt"
    with pytest.raises(FileNotFoundError, match="custom/"):
        resolve_teacher_file("other.pt", [custom])


def test_a_missing_teacher_is_one_line_before_any_run_folder(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "fedbrain.cli.main", "simulate", "--rounds", "1",
                           "--set", "data.max_images_per_site=10", "--set", f"distil_from={tmp_path / 'nope'}",
                           "--workspace", str(tmp_path / "ws")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert "teacher" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "ws").exists() or not any((tmp_path / "ws").iterdir())


@pytest.mark.slow
def test_a_distilled_federation_carries_the_teacher_to_every_site(tmp_path):
    """The real simulator: the job ships the teacher into each site's custom/ folder, every site trains against
    it, the run keeps the teacher it learned from, and nothing new leaves a site."""
    from fedbrain.cli.main import main

    teacher = _save(tmp_path, "fedbrain_cnn", GREY)
    ws = tmp_path / "ws"
    rc = main(["simulate", "--model", "fedbrain_cnn_v2", "--set", "data.max_images_per_site=20", "--rounds", "2",
               "--set", "cross_site_eval=false", "--set", f"distil_from={teacher}", "--set", "distil_weight=0.7",
               "--workspace", str(ws)])
    assert rc == 0
    run = next(d for d in ws.iterdir() if (d / "config.json").is_file())
    assert (run / "checkpoints" / "teacher.pt").read_bytes() == teacher.read_bytes()
    shipped = sorted(run.joinpath("nvflare").rglob("custom/teacher.pt"))
    assert len(shipped) == 3, shipped
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r.get("split") == "train"]
    assert len(train) == 6 and all(r["distil_loss"] > 0 for r in train)
    _model, card = load_checkpoint(run / "checkpoints" / "best.pt")
    assert card.training["distil_weight"] == 0.7 and card.training["distil_from"].endswith("teacher.pt")
    audit = [json.loads(line) for line in (run / "server_audit.jsonl").read_text().splitlines()]
    assert audit and not any("distil" in k for row in audit for k in [*row["metrics"], *row["meta"]])


# ---------------------------------------------------------------- one device rule


def test_device_rule():
    assert resolve_device("auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("cpu") == torch.device("cpu")
    assert autocast_dtype(torch.device("cpu")) is None
    with pytest.raises(ValueError, match="device must be"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no usable CUDA device"):
            resolve_device("cuda")
    model = place(create_model("fedbrain_cnn_v2"), torch.device("cpu"))
    assert next(model.parameters()).device.type == "cpu"


def test_device_flag_is_checked_by_the_parser():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the refusal is for machines without it")
    proc = subprocess.run([sys.executable, "-m", "fedbrain.cli.main", "train", "--device", "cuda"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "no usable CUDA device" in proc.stderr


def test_checkpoints_stay_device_free(tmp_path):
    model = create_model("fedbrain_cnn_v2")
    batches = [(torch.randn(4, 1, 64, 64), torch.randint(0, 4, (4,)))]
    train_epochs(model, batches, TrainConfig(epochs=1, device="auto", class_weighting=False))
    path = save_checkpoint(tmp_path / "m.pt", model, ModelCard(model="fedbrain_cnn_v2", preprocessing=GREY,
                                                               supervised_granularity="multiclass"))
    state = torch.load(path, map_location="meta", weights_only=True)["state_dict"]
    raw = torch.load(path, weights_only=True)["state_dict"]
    assert state and all(v.device.type == "cpu" for v in raw.values())
    assert np.isfinite(np.concatenate([v.float().numpy().ravel() for v in raw.values()])).all()
    estimate_bn_statistics(create_model("fedbrain_cnn"), batches)  # the CPU path of the BN estimate still runs


def test_model_kwargs_are_checked_and_cards_carry_the_whole_architecture(tmp_path, capsys):
    from fedbrain.cli.main import main

    assert main(["train", "--model", "fedbrain_cnn_v2", "--model-kwargs", '{"foo": 1}',
                 "--workspace", str(tmp_path)]) == 2
    assert "takes" in capsys.readouterr().err and not any(tmp_path.iterdir())
    card = ModelCard(model="fedbrain_cnn_v2", model_kwargs={"stem": 4}, preprocessing=GREY,
                     supervised_granularity="multiclass")
    assert card.model_kwargs == {"in_channels": 1, "widths": [32, 64, 128], "depths": [2, 2, 2], "stem": 4,
                                 "norm": "ws"}
    assert card.build_model().features[0](torch.zeros(1, 1, 128, 128)).shape[-1] == 32
