"""Knowledge distillation from a frozen teacher model file into a student. Knows nothing of NVFlare.

The teacher is any fedbrain checkpoint (e.g. the global model of a federated EfficientNet-Lite0). It scores the
student's own training batch, after augmentation, so teacher and student see the same view. Both models read the
same greyscale slice in [0, 1]; only the normalisation, the channel count and the input size differ, and
:meth:`Teacher.logits` converts the student's batch exactly (the size by bilinear interpolation).

The loss (Hinton et al. 2015) is ``(1 - weight) * label loss + weight * T^2 * KL(teacher_T || student_T)``: the
teacher's soft labels carry every class at every site, including the classes a site has no label for (a hospital
without healthy scans still learns what the teacher thinks of ``no_tumor`` for its slices).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from fedbrain.contract import Preprocessing


@dataclass(frozen=True)
class DistillConfig:
    weight: float = 0.5  # the share of the distillation term in the loss (0: labels only, 1: teacher only)
    temperature: float = 2.0  # both models' logits are divided by it inside the KL term

    def __post_init__(self) -> None:
        if not 0.0 <= self.weight <= 1.0:
            raise ValueError(f"distillation weight must be in [0, 1], not {self.weight}")
        if not self.temperature > 0:
            raise ValueError(f"distillation temperature must be positive, not {self.temperature}")

    def to_dict(self) -> dict:
        return asdict(self)


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """``T^2 * KL(softmax(teacher / T) || softmax(student / T))``, averaged over the batch."""
    t = temperature
    log_student = F.log_softmax(student_logits.float() / t, dim=1)
    log_teacher = F.log_softmax(teacher_logits.float() / t, dim=1)
    return F.kl_div(log_student, log_teacher, reduction="batchmean", log_target=True) * (t * t)


@dataclass
class Distiller:
    """What the training core mixes in: ``distiller(student_logits, x)`` is the distillation term against
    ``teacher(x)``, and ``weight`` its share of the loss."""

    teacher: Callable[[torch.Tensor], torch.Tensor]
    config: DistillConfig = field(default_factory=DistillConfig)

    @property
    def weight(self) -> float:
        return self.config.weight

    def __call__(self, student_logits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return distillation_loss(student_logits, self.teacher(x), self.config.temperature)


class Teacher:
    """A frozen model file that gives logits for a student's (normalised) batch."""

    def __init__(self, path: str | Path, student: Preprocessing, device: torch.device | str = "cpu"):
        from fedbrain.checkpoint import load_checkpoint

        self.path = Path(path)
        self.model, self.card = load_checkpoint(self.path)
        self.model.to(device).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.student, self.pre = student, self.card.preprocessing
        self.device = torch.device(device)

    def describe(self) -> dict:
        """What the student's card records of its teacher (never a path)."""
        return {"model": self.card.model, "file": self.path.name, "image_size": self.pre.image_size,
                "training": {k: self.card.training.get(k) for k in ("mode", "algorithm", "rounds", "best_round")
                             if k in self.card.training}}

    def to_teacher_input(self, x: torch.Tensor) -> torch.Tensor:
        """The student's normalised batch ``(N, C, H, W)`` as the teacher's input (on ``x``'s device)."""
        s, t = self.student, self.pre
        x01 = x[:, :1].float() * s.std[0] + s.mean[0]  # every channel holds the same slice
        if t.image_size != s.image_size:
            x01 = F.interpolate(x01, size=(t.image_size,) * 2, mode="bilinear", align_corners=False,
                                antialias=t.image_size < s.image_size)
        mean = torch.tensor(t.mean, dtype=torch.float32, device=x.device).view(1, -1, 1, 1)
        std = torch.tensor(t.std, dtype=torch.float32, device=x.device).view(1, -1, 1, 1)
        return (x01.clamp(0, 1).expand(-1, t.channels, -1, -1) - mean) / std

    @torch.no_grad()
    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(self.to_teacher_input(x.to(self.device))).float()

    def adapt_batchnorm(self, loader, max_images: int | None = None) -> int:
        """Re-estimate the teacher's BatchNorm statistics on this site's own (student-preprocessed) images, e.g.
        for a teacher federated with site-pure batches. The statistics stay at the site. Returns images used
        (0 for a teacher without BatchNorm)."""
        from fedbrain.models import batchnorms
        from fedbrain.training import estimate_bn_statistics

        if not batchnorms(self.model):
            return 0
        for p in self.model.parameters():  # estimate_bn_statistics leaves frozen layers alone
            p.requires_grad_(True)
        try:
            n = estimate_bn_statistics(self.model, ((self.to_teacher_input(x), y) for x, y in loader), max_images)
        finally:
            for p in self.model.parameters():
                p.requires_grad_(False)
            self.model.eval()
        return n


def resolve_teacher_file(name: str, folders: list[Path]) -> Path:
    """The teacher file a job names: ``name`` in one of ``folders`` (the job's ``custom/`` folder at this site,
    where NVFlare deploys the file with the job), else ``name`` as a path."""
    for folder in folders:
        if (Path(folder) / Path(name).name).is_file():
            return Path(folder) / Path(name).name
    if Path(name).is_file():
        return Path(name)
    raise FileNotFoundError(f"teacher model {name!r} not found in {[str(f) for f in folders]} (the job's custom/ "
                            "folder) nor as a path")


def teacher_checkpoint(path: str | Path) -> Path:
    """``--distil-from``: a model file, or a run folder (its best checkpoint)."""
    from fedbrain.runs import RunDir

    p = Path(path)
    if p.is_dir():
        p = RunDir(p).best
    if not p.is_file():
        raise FileNotFoundError(f"teacher {str(path)!r}: neither a model file nor a run folder with "
                                "checkpoints/best.pt")
    return p


__all__ = ["DistillConfig", "Distiller", "Teacher", "distillation_loss", "resolve_teacher_file", "teacher_checkpoint"]
