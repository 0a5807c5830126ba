"""The settings of one federated job, with the local training config inside, and one table of algorithm defaults.

Every default lives here or in :class:`fedbrain.training.TrainConfig`: the CLI, ``jobs/*/job.py``, compare,
the benchmarks and the site script all build a :class:`JobSettings` and never restate a default.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields, replace

from fedbrain.training import TrainConfig

ALGORITHMS = ("fedavg", "fedprox", "scaffold")

# What each algorithm changes in the local training config; everything else is TrainConfig's default.
# SCAFFOLD's control variates assume plain SGD steps (NVFlare's PTScaffoldHelper), hence its own optimiser.
ALGORITHM_DEFAULTS: dict[str, dict] = {
    "fedavg": {},
    "fedprox": {},
    "scaffold": {"optimizer": "sgd", "lr": 0.05},
}

# Fields the server needs but a site does not (never sent in the site's arguments).
SERVER_ONLY = ("min_clients", "wait_after_min_s", "cross_site_eval", "initial_checkpoint", "start_round",
               "site_weighting", "rounds", "pretrained", "extra_site_args", "threads_per_site", "user_train")


def algorithm_train_config(algorithm: str, **overrides) -> TrainConfig:
    """The local training config of ``algorithm``: TrainConfig's defaults, the algorithm's, then ``overrides``."""
    if algorithm not in ALGORITHMS:
        raise ValueError(f"unknown algorithm {algorithm!r}; choose one of {ALGORITHMS}")
    known = {f.name for f in fields(TrainConfig)}
    unknown = set(overrides) - known
    if unknown:
        raise ValueError(f"unknown training setting(s) {sorted(unknown)}")
    base = {"epochs": 1, **ALGORITHM_DEFAULTS[algorithm]}  # one local epoch per round unless told otherwise
    return TrainConfig(**{**base, **overrides})


@dataclass
class JobSettings:
    """A federated job: the algorithm, the model, the rounds and each site's local training config."""

    algorithm: str = "fedavg"
    model: str = "fedbrain_cnn"
    model_kwargs: dict = field(default_factory=dict)
    image_size: int | None = None
    pretrained: bool | None = None  # start from ImageNet weights (None: the registry model's default)
    finetune: str = "all"  # all | head | last-N (see fedbrain.models.apply_finetune)
    rounds: int = 20
    train: TrainConfig = field(default_factory=lambda: algorithm_train_config("fedavg"))
    user_train: dict = field(default_factory=dict)  # the training settings the user chose explicitly
    fedprox_mu: float = 0.01
    min_clients: int | None = None  # sites that must answer each round (default: all)
    wait_after_min_s: int = 60  # with min_clients < sites: how long a round waits for the others
    threads_per_site: int | None = None
    site_weighting: str = "steps"  # FedAvg/FedProx average: by local steps, or every site alike ("equal")
    dp_clip: float = 0.0
    dp_noise: float = 0.0
    cross_site_eval: bool = True
    initial_checkpoint: str | None = None  # a plain {"model": state_dict} file NVFlare starts from
    start_round: int = 0  # resume: round numbering continues from here
    extra_site_args: str = ""  # appended to every site's args (fault injection in tests)

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
        """The settings a site trains by (no server-side fields, no paths)."""
        return {k: v for k, v in self.to_dict().items() if k not in SERVER_ONLY}

    def site_json(self) -> str:
        """``site_dict`` as compact JSON for the site script's ``--job`` argument.

        NVFlare splits a task script's arguments on whitespace, so the JSON must contain none.
        """
        text = json.dumps(self.site_dict(), separators=(",", ":"), sort_keys=True)
        if any(c.isspace() for c in text):
            raise ValueError(f"job settings contain whitespace, which NVFlare's script arguments cannot carry: {text}")
        return text


__all__ = ["JobSettings", "ALGORITHMS", "ALGORITHM_DEFAULTS", "algorithm_train_config"]
