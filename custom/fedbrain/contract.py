"""The I/O contract: class names, label schemes and preprocessing, written once.

Every checkpoint stores a :class:`Preprocessing` and the class list, so training, compression,
the dashboard and ``fedbrain predict`` all read the same contract from the model file.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

CLASSES: tuple[str, ...] = ("glioma", "meningioma", "pituitary", "no_tumor")
NUM_CLASSES = len(CLASSES)
NO_TUMOR = CLASSES.index("no_tumor")
TUMOUR_CLASSES: tuple[int, ...] = tuple(i for i, c in enumerate(CLASSES) if c != "no_tumor")
# Target index for "tumour, type unknown" (binary sites). Not a model output: the partial-label
# loss maps it to p(glioma) + p(meningioma) + p(pituitary).
TUMOUR_ANY = NUM_CLASSES
# What a site sends each round: its training-label counts as metric keys ``train_count_<target>`` (5 target kinds).
COUNT_PREFIX = "train_count_"

SCHEMES: dict[str, tuple[str, ...]] = {
    "multiclass": CLASSES,
    "tumour_type": ("glioma", "meningioma", "pituitary"),
    "binary": ("tumour", "no_tumor"),
}
# Granularity rank: a cluster is kept at the site with the richest labels only as a tie-break.
GRANULARITY = {"binary": 0, "tumour_type": 1, "multiclass": 2}


def target_index(label: str) -> int:
    """Map a canonical label (a class name or ``tumour``) to a training target."""
    if label == "tumour":
        return TUMOUR_ANY
    try:
        return CLASSES.index(label)
    except ValueError as exc:
        raise ValueError(f"unknown label {label!r}; expected one of {CLASSES + ('tumour',)}") from exc


def is_tumour(label: str) -> bool:
    return label != "no_tumor"


def supervised_granularity(schemes: set[str] | list[str]) -> str:
    """What a model trained on these schemes may claim to know.

    ``multiclass`` if any site gave all four classes, or tumour types plus no-tumour examples
    came from different sites; ``binary`` if only tumour/no-tumour labels were seen.
    """
    s = set(schemes)
    if "multiclass" in s or ("tumour_type" in s and "binary" in s):
        return "multiclass"
    if s == {"tumour_type"}:
        return "tumour_type"
    return "binary"


IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Preprocessing:
    """How a picture becomes a model input. Evaluation uses exactly this; augmentation is train-only."""

    image_size: int = 128
    channels: int = 1
    mean: tuple[float, ...] = (0.5,)
    std: tuple[float, ...] = (0.25,)
    resize: str = "bilinear"  # PIL resample of the whole slice to image_size x image_size
    source_mode: str = "L"  # slices are read as 8-bit greyscale, then replicated to `channels`

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Preprocessing:
        d = dict(d)
        for k in ("mean", "std"):
            if k in d:
                d[k] = tuple(d[k])
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})


@dataclass
class Augmentation:
    """Train-only augmentation settings (never applied in evaluation)."""

    hflip: bool = True
    max_rotate_deg: float = 10.0
    scale: tuple[float, float] = (0.9, 1.1)
    translate: float = 0.06
    brightness: float = 0.15
    contrast: float = 0.15
    gamma: tuple[float, float] = (1.0, 1.0)  # intensity gamma, log-uniform in this range
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def changes_images(self) -> bool:
        """False for a policy that leaves every image as it is ("none")."""
        return (self.hflip or self.max_rotate_deg > 0 or tuple(self.scale) != (1.0, 1.0) or self.translate > 0
                or self.brightness > 0 or self.contrast > 0 or tuple(self.gamma) != (1.0, 1.0) or bool(self.extra))


# Named policies (TrainConfig.augmentation), measured with `fedbrain evaluate --robustness` on the benchmark FedAvg
# model (docs/results.md, robustness). "standard"'s model lost most macro-F1 under a brighter gamma, a wider or
# tighter field of view and lower contrast. "intensity" (the policy for a trunk that trains: jobs/cnn.toml) adds a
# random gamma and a wider contrast range; "robust" widens the scale range as well, which bought field-of-view
# robustness at a cost in clean accuracy and calibration. The default, "none", lets a frozen trunk's features be
# computed once (fedbrain.features): the default model trains only its head.
AUGMENTATIONS: dict[str, Augmentation] = {
    "standard": Augmentation(),
    "intensity": Augmentation(contrast=0.3, gamma=(0.67, 1.5)),
    "robust": Augmentation(scale=(0.8, 1.25), contrast=0.3, gamma=(0.6, 1.6)),
    # every image as it is: a frozen backbone's linear probe, and DP-SGD's privacy-utility curve (issue 13)
    "none": Augmentation(hflip=False, max_rotate_deg=0.0, scale=(1.0, 1.0), translate=0.0, brightness=0.0,
                         contrast=0.0),
}
DEFAULT_AUGMENTATION = "none"


def augmentation_policy(name: str) -> Augmentation:
    try:
        return AUGMENTATIONS[name]
    except KeyError as exc:
        raise ValueError(f"unknown augmentation policy {name!r}; choose one of {sorted(AUGMENTATIONS)}") from exc
