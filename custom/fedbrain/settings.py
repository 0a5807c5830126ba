"""The settings of one federated job, with the local training config inside, and one table of algorithm defaults.

Every default lives here or in :class:`fedbrain.training.TrainConfig`: the CLI, ``jobs/*/job.py``, compare,
the benchmarks and the site script all build a :class:`JobSettings` and never restate a default.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

from fedbrain.distillation import DistillConfig
from fedbrain.dp import DPSGDConfig
from fedbrain.training import WARMUP_FRACTION, TrainConfig

ALGORITHMS = ("fedavg", "fedprox", "scaffold")

# The local training config of a federated round, for every algorithm: one plain SGD step (lr 1, no momentum) on
# the site's share of a FEDERATION_BATCH-image batch split across the sites by training-set size, so the
# sample-weighted average is the gradient of a stratified batch of the pooled data and the server's AdamW (below)
# takes the step centralised AdamW would take on that batch: exact under any label skew, which several local steps
# are not (16 local AdamW steps per round on the benchmark federation: no_tumor recall 0.24; docs/results.md). The
# 256-image batch makes the 8-epoch budget 82 rounds on the benchmark federation (631 with 32), and every site's
# gradient is one of at least 10 images. More local work (train.steps > 1, or steps 0: epochs) with plain SGD takes
# MULTI_STEP_LOCAL_LR unless the user sets train.lr. SCAFFOLD's control variates (plain SGD steps, NVFlare's
# PTScaffoldHelper) fit it as they are. What each algorithm changes on top goes in ALGORITHM_DEFAULTS.
FEDERATION_BATCH = 256
FEDERATED_TRAIN: dict = {"steps": 1, "optimizer": "sgd", "momentum": 0.0, "lr": 1.0, "batch_size": FEDERATION_BATCH}
MULTI_STEP_LOCAL_LR = 0.01  # the local SGD lr of several steps per round (lr 1 is only a gradient's scale for one)
ALGORITHM_DEFAULTS: dict[str, dict] = {
    "fedavg": {},
    "fedprox": {},
    "scaffold": {},
}
BUDGET_EPOCHS = 8  # the default training budget: passes over the federation's training data
# the most accurate federated model (issue 26): EfficientNet-Lite0 from ImageNet weights, its head trained on the
# frozen trunk's features (computed once per site: fedbrain.features); from scratch: jobs/cnn.toml (fedbrain_cnn_gn)
FEDERATED_MODEL = "efficientnet_lite0"
FEDERATED_IMAGE_SIZE = 128

# Fields the server needs but a site does not (never sent in the site's arguments).
SERVER_ONLY = ("min_clients", "wait_after_min_s", "cross_site_eval", "initial_checkpoint",
               "site_weighting", "pretrained", "extra_site_args", "threads_per_site", "user_train", "server_lr",
               "server_momentum", "server_optimizer", "server_eps", "tracking_uri",
               "server_weight_decay", "server_warmup", "validations", "plan_start_round")
TRACKING = ("", "mlflow")  # experiment tracking besides the run's own JSONL + TensorBoard
LEVER_CHOICES = {"server_optimizer": ("sgd", "adam", "adamw"), "class_balance": ("site", "federation"),
                 "missing_classes": ("keep", "restrict"),
                 "site_weighting": ("steps", "samples", "equal"),
                 "batch_split": ("site", "proportional"),
                 "distil_teacher_bn": ("site", "global")}


def legacy_overrides() -> dict:
    """fedbrain's federation before the label-skew levers (issue 11): one local epoch of AdamW per round (its
    state kept across rounds), FedAvg weighted by local steps, each site's own batches and class weights.
    ``jobs/legacy.toml`` reproduces the old numbers (with ``--model fedbrain_cnn``, the old BatchNorm model);
    ``JobSettings`` fields and ``train`` fields."""
    return {"train": {"steps": 0, "epochs": 1, "optimizer": "adamw", "lr": TrainConfig.lr,
                      "momentum": TrainConfig.momentum},
            "site_weighting": "steps", "class_balance": "site", "missing_classes": "keep",
            "reset_optimizer": False, "batch_split": "site", "validations": 0,
            "server_optimizer": "sgd", "server_lr": 1.0, "server_momentum": 0.0}


def algorithm_train_config(algorithm: str, **overrides) -> TrainConfig:
    """The local training config of ``algorithm``: TrainConfig's defaults, the algorithm's, then ``overrides``."""
    if algorithm not in ALGORITHMS:
        raise ValueError(f"unknown algorithm {algorithm!r}; choose one of {ALGORITHMS}")
    known = {f.name for f in fields(TrainConfig)}
    unknown = set(overrides) - known
    if unknown:
        raise ValueError(f"unknown training setting(s) {sorted(unknown)}")
    base = {"epochs": 1, **FEDERATED_TRAIN, **ALGORITHM_DEFAULTS[algorithm]}
    if overrides.get("steps", base["steps"]) != 1 and base.get("optimizer") == "sgd":
        base["lr"] = MULTI_STEP_LOCAL_LR
    return TrainConfig(**{**base, **overrides})


@dataclass
class JobSettings:
    """A federated job: the algorithm, the model, the rounds and each site's local training config."""

    algorithm: str = "fedavg"
    model: str = FEDERATED_MODEL
    model_kwargs: dict = field(default_factory=dict)
    image_size: int | None = FEDERATED_IMAGE_SIZE  # None: the registry model's own size
    pretrained: bool | None = None  # start from ImageNet weights (None: the registry model's default)
    # all | head | last-N (fedbrain.models.apply_finetune); None: "head" for a model that starts from ImageNet
    # weights (its trunk frozen, its features cached), "all" for one trained from scratch (see trained_layers)
    finetune: str | None = None
    rounds: int = 82  # ~BUDGET_EPOCHS on the benchmark federation; the CLI sizes it for the federation at hand
    train: TrainConfig = field(default_factory=lambda: algorithm_train_config("fedavg"))
    user_train: dict = field(default_factory=dict)  # the training settings the user chose explicitly
    fedprox_mu: float = 0.01
    # levers against label skew (issue 11): docs/federation.md; what each one bought: docs/results.md
    class_balance: str = "federation"  # class weights from the pooled counts the server sends | "site": its own
    missing_classes: str = "keep"  # "restrict": a site's softmax covers only the classes its labels can show
    reset_optimizer: bool = False  # restart the local optimiser every round (no stale moments across rounds)
    validations: int = BUDGET_EPOCHS  # global models the sites validate, evenly spread over the planned rounds, the
    # final one always (training.validation_points): as many candidates as centralised has epochs (0: every round)
    # "site": every site trains on batches of train.batch_size; "proportional": the federation's batch of
    # train.batch_size images is split across sites in proportion to their training-set sizes (at least 2 each),
    # so one round's sample-weighted average is a gradient of a stratified batch of the pooled data
    batch_split: str = "proportional"
    # how the server applies the averaged update: "adamw" (centralised's AdamW: decoupled weight decay, warm-up then
    # cosine to 0 over the planned rounds; the site lr stays fixed) | "adam" (FedAdam, constant lr) | "sgd" (FedAvg)
    server_optimizer: str = "adamw"
    # the server's peak step: centralised AdamW's lr (TrainConfig.lr) scaled by ~sqrt(8) for a batch 8 times
    # larger (FedAvg: plain SGD, lr 1); on the demo 0.003 / 0.005 / 0.01 gave tumour AUROC 0.964 / 0.952 / 0.933,
    # on the benchmark 0.005 and 0.01 the same union macro-F1 (0.819, 0.823; seed 0)
    server_lr: float = 0.005
    server_weight_decay: float = TrainConfig.weight_decay  # "adamw": decoupled decay on the server (sites: none)
    server_warmup: float = WARMUP_FRACTION  # "adamw": the share of the planned rounds the server lr warms up over
    server_momentum: float = 0.0  # FedAvgM: server momentum on the averaged update
    server_eps: float = 1e-8  # FedAdam's epsilon
    min_clients: int | None = None  # sites that must answer each round (default: all)
    wait_after_min_s: int = 60  # with min_clients < sites: how long a round waits for the others
    threads_per_site: int | None = None
    site_weighting: str = "samples"  # the average weighted by training-set size | "steps" (NVFlare's) | "equal"
    dp_clip: float = 0.0  # client-level DP of each whole update (needs hundreds of sites; docs/federation.md)
    dp_noise: float = 0.0
    # record-level DP (DP-SGD at each site, issue 13): the (ε, δ) budget of this job at each site (0: off; a
    # site's own policy may impose a stricter one), each image's gradient clip and the Poisson sampling rate
    dp_epsilon: float = 0.0
    dp_delta: float = DPSGDConfig.delta
    dp_max_grad_norm: float = DPSGDConfig.max_grad_norm
    dp_sample_rate: float = DPSGDConfig.sample_rate
    dp_count_epsilon: float = 0.1  # under DP: ε of the training-label counts a site releases once (Laplace noise)
    cross_site_eval: bool = True
    # pairwise-masked secure aggregation (fedbrain.secagg): the server sees only the sum of the sites' updates;
    # None: on with 3 or more sites where the job allows it (fedbrain.secagg.secure_aggregation_on)
    secure_aggregation: bool | None = None
    tracking: str = ""  # "mlflow": sites stream their round metrics to the server's MLflow receiver (NVFlare)
    tracking_uri: str = ""  # the MLflow tracking URI (default: a SQLite store in the run / server job folder)
    initial_checkpoint: str | None = None  # a plain {"model": state_dict} file NVFlare starts from
    # knowledge distillation (issue 12): a frozen teacher model file (e.g. a federated EfficientNet-Lite0's best.pt)
    # that the job carries to every site; each site's loss mixes in the teacher's soft labels on its own batches
    distil_from: str = ""
    distil_weight: float = DistillConfig.weight
    distil_temperature: float = DistillConfig.temperature
    # "site": a BatchNorm teacher normalises by statistics each site estimates on its own training images (they
    # never leave it; a teacher federated with site-pure batches needs them) | "global": by the teacher's own
    distil_teacher_bn: str = "site"
    start_round: int = 0  # resume: round numbering continues from here
    plan_start_round: int | None = None  # the job's first round as planned (None: start_round; a resumed run keeps it)
    extra_site_args: str = ""  # appended to every site's args (fault injection in tests)

    def __post_init__(self) -> None:
        if self.tracking not in TRACKING:
            raise ValueError(f"tracking must be one of {TRACKING}, not {self.tracking!r}")
        for name, choices in LEVER_CHOICES.items():
            if getattr(self, name) not in choices:
                raise ValueError(f"{name} must be one of {choices}, not {getattr(self, name)!r}")
        if not 0 <= self.server_warmup < 1 or self.server_weight_decay < 0 or self.validations < 0:
            raise ValueError("server_warmup must be in [0, 1), server_weight_decay and validations >= 0")
        self.distillation()  # validates weight and temperature
        self.dp_sgd()  # validates the DP-SGD settings
        if not self.dp_count_epsilon > 0:
            raise ValueError(f"dp_count_epsilon must be a positive number, not {self.dp_count_epsilon}")
        if self.dp_epsilon > 0 and self.dp_clip > 0:
            raise ValueError("choose one kind of DP: record-level (--dp-epsilon, DP-SGD at each site) or client-level "
                             "(dp_clip / dp_noise)")
        if self.dp_epsilon > 0 and self.distil_from and self.distil_teacher_bn == "site":
            raise ValueError("DP-SGD with a teacher needs distil_teacher_bn = global: statistics a site estimates on "
                             "its training images would reach every image's gradient outside the privacy accounting")
        if self.dp_epsilon > 0 and self.algorithm != "fedavg":
            raise ValueError(f"DP-SGD runs with fedavg: {self.algorithm}'s extra terms (FedProx's proximal term, "
                             "SCAFFOLD's control variates) are not privatised")
        if self.dp_clip > 0 and self.algorithm == "scaffold":
            raise ValueError("differential privacy does not cover SCAFFOLD's control variates (they are computed "
                             "from the unclipped local model): use fedavg or fedprox with dp_clip")

    def check_server_settings(self) -> None:
        """Checks of the fields only the server holds (a site rebuilds its settings without them)."""
        if self.secure_aggregation:
            if self.algorithm == "scaffold":
                raise ValueError("secure aggregation does not mask SCAFFOLD's control variates: use fedavg or fedprox")
            if self.site_weighting != "samples":
                raise ValueError("secure aggregation weights each update by its site's training images (the sites "
                                 "weight before masking): site_weighting = samples")
            if self.min_clients:
                raise ValueError("secure aggregation needs every site in every round (a missing site's masks do not "
                                 "cancel): leave min_clients unset")

    @classmethod
    def create(cls, algorithm: str = "fedavg", train: dict | None = None, **settings) -> JobSettings:
        """Settings for ``algorithm`` with the user's explicit training choices ``train`` on top of its defaults."""
        user = {k: v for k, v in (train or {}).items() if v is not None}
        return cls(algorithm=algorithm, train=algorithm_train_config(algorithm, **user), user_train=user,
                   **settings)

    def with_algorithm(self, algorithm: str, **changes) -> JobSettings:
        """The same job under another algorithm: its defaults, the user's explicit choices kept."""
        return replace(self, algorithm=algorithm, train=algorithm_train_config(algorithm, **self.user_train),
                       **changes)

    @property
    def trained_layers(self) -> str:
        """The finetune spec this job trains by: ``finetune``, or by default "head" for a model that starts from
        ImageNet weights and "all" for one trained from scratch."""
        if self.finetune is not None:
            return self.finetune
        from fedbrain.models import model_info

        pretrained = self.pretrained if self.pretrained is not None else model_info(self.model).pretrained_default
        return "head" if pretrained else "all"

    def dp_sgd(self) -> DPSGDConfig:
        """The record-level DP this job asks of every site (``enabled`` is False without a budget)."""
        return DPSGDConfig(epsilon=self.dp_epsilon, delta=self.dp_delta, max_grad_norm=self.dp_max_grad_norm,
                           sample_rate=self.dp_sample_rate)

    def distillation(self) -> DistillConfig | None:
        """The distillation settings, or None without a teacher."""
        config = DistillConfig(self.distil_weight, self.distil_temperature)
        return config if self.distil_from else None

    # shorthands for the local training config
    @property
    def local_epochs(self) -> int:
        return self.train.epochs

    @property
    def lr(self) -> float:
        return self.train.lr

    @property
    def batch_size(self) -> int:
        return self.train.batch_size

    @property
    def seed(self) -> int:
        return self.train.seed

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> JobSettings:
        d = {k: v for k, v in d.items() if k in {f.name for f in fields(cls)}}
        if isinstance(d.get("train"), dict):
            d["train"] = TrainConfig.from_dict(d["train"])
        return cls(**d)

    # -------------------------------------------------------------- what a site receives

    def site_dict(self) -> dict:
        """The settings a site trains by (no server-side fields, no paths: the teacher is named by the file the job
        carries to the site's ``custom/`` folder)."""
        d = {k: v for k, v in self.to_dict().items() if k not in SERVER_ONLY}
        if self.server_optimizer == "adamw":  # the server decays the weights (decoupled): no L2 in the gradient
            d["train"]["weight_decay"] = 0.0
        if self.distil_from:
            d["distil_from"] = Path(self.distil_from).name
        return d

    def site_json(self) -> str:
        """``site_dict`` as compact JSON for the site script's ``--job`` argument.

        NVFlare splits a task script's arguments on whitespace, so the JSON must contain none.
        """
        text = json.dumps(self.site_dict(), separators=(",", ":"), sort_keys=True)
        if any(c.isspace() for c in text):
            raise ValueError(f"job settings contain whitespace, which NVFlare's script arguments cannot carry: {text}")
        return text


__all__ = ["JobSettings", "ALGORITHMS", "ALGORITHM_DEFAULTS", "algorithm_train_config"]
