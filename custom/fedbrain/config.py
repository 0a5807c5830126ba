"""The job configuration: every setting of a run in one TOML file, with where each value came from.

A file holds the :class:`~fedbrain.settings.JobSettings` fields at the top level, each site's round of local
training in ``[local]`` (a :class:`~fedbrain.training.TrainConfig`), centralised / local-only training in ``[train]``
and the data in ``[data]`` (:class:`DataSettings`)::

    algorithm = "fedavg"
    server_lr = 0.001
    [local]
    lr = 1.0            # the site's step (the server's is server_lr)
    [data]
    root = "../shared/data"

Values come, lowest first, from the defaults, the ``--config`` file, the command's flags and ``--set key=value``
(dotted keys: ``local.batch_size=64``). A run writes its effective configuration to ``config.toml`` in its folder,
and ``--config RUN/config.toml`` runs it again.
"""

from __future__ import annotations

import difflib
import math
import sys
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from fedbrain.settings import BUDGET_EPOCHS, JobSettings
from fedbrain.training import TrainConfig

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

CONFIG_FILE = "config.toml"  # a run's effective configuration
DEFAULT = "default"
# JobSettings fields a configuration file never holds: derived, internal or test-only
NOT_CONFIGURED = ("train", "user_train", "start_round", "plan_start_round", "extra_site_args", "initial_checkpoint")


class ConfigError(ValueError):
    """A configuration the user can fix (unknown key, wrong type, unreadable file): one line."""


@dataclass
class DataSettings:
    """The data a job runs on: a benchmark folder, a site file, or the embedded Br35H set split into hospitals."""

    root: str = ""  # benchmark federation: the folder holding figshare_cheng/, sartaj/, navoneel/
    site_config: str = ""  # a TOML file declaring the hospitals (jobs/sites.example.toml)
    sites: list = field(default_factory=list)  # a subset of the declared hospitals
    num_sites: int = 3  # simulated hospitals of the embedded set
    alpha: float = 1.0  # Dirichlet label skew of the simulated hospitals (smaller: more skew)
    max_images_per_site: int = 0  # subsample each site (0: all), for quick runs
    seed: int = 0  # the splits' and the simulated hospitals' seed
    cache_dir: str = ""  # decoded-image cache ("" : ~/.cache/fedbrain)
    exclude_twins_of: str = ""  # a run whose images' near-duplicates are left out


@dataclass
class RunConfig:
    """One run's settings: the federated job, centralised training, the data and the training budget."""

    job: JobSettings = field(default_factory=JobSettings)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataSettings = field(default_factory=DataSettings)
    budget_epochs: float = BUDGET_EPOCHS  # without `rounds`: passes over the federation's training data
    sources: dict = field(default_factory=dict)  # key -> where its value came from (absent: the default)

    def source(self, key: str) -> str:
        return self.sources.get(key, DEFAULT)

    def given(self, key: str) -> bool:
        """Was ``key`` set by a file, a flag or ``--set`` (not left at its default)?"""
        return key in self.sources

    # ------------------------------------------------------------------ file form

    def to_table(self) -> dict:
        """The configuration as a TOML-ready mapping (None values, which TOML cannot hold, left out)."""
        top = {k: v for k, v in asdict(self.job).items() if k not in NOT_CONFIGURED}
        if not self.given("rounds"):
            del top["rounds"]  # sized from budget_epochs on the federation at run time
        top["budget_epochs"] = self.budget_epochs
        table = {**top, "local": asdict(self.job.train), "train": asdict(self.train), "data": asdict(self.data)}
        return _drop_none(table)

    def to_toml(self) -> str:
        return dumps_toml(self.to_table())

    def write(self, path: Path) -> Path:
        path.write_text("# fedbrain run configuration: `--config` this file to run it again\n" + self.to_toml())
        return path

    def rows(self) -> list[tuple[str, object, str]]:
        """(key, value, source) for every setting, for ``fedbrain config show``."""
        return [(k, v, self.source(k)) for k, v in _flatten(self.to_table())]


def keys() -> dict[str, object]:
    """Every settable key with its default value (``local.lr``: the default algorithm's)."""
    defaults = RunConfig(sources={"rounds": DEFAULT})
    return dict(_flatten(defaults.to_table())) | {k: None for k, _ in _nullable()}


def _nullable() -> list[tuple[str, object]]:
    """Keys whose default is None (left out of files until set)."""
    out = [(f.name, None) for f in fields(JobSettings) if f.name not in NOT_CONFIGURED
           and getattr(JobSettings(), f.name) is None]
    for prefix in ("local", "train"):
        out += [(f"{prefix}.{f.name}", None) for f in fields(TrainConfig) if getattr(TrainConfig(), f.name) is None]
    return out


def load(files: list[str] | tuple = (), sets: list[str] | tuple = (), flags: dict | None = None) -> RunConfig:
    """The configuration from the defaults, then each file, then ``flags`` ({key: (value, flag name)}), then each
    ``--set key=value``. Every key is checked against the settings' fields and types."""
    values: dict[str, object] = {}
    sources: dict[str, str] = {}
    for name in files:
        for k, v in _flatten(read_file(name)):
            values[k], sources[k] = v, f"file {name}"
    for k, (v, flag) in (flags or {}).items():
        if v is not None:
            values[k], sources[k] = v, flag
    for item in sets:
        k, v = parse_set(item)
        values[k], sources[k] = v, f"--set {k}"
    return build(values, sources)


def read_file(name: str | Path) -> dict:
    path = Path(name)
    if not path.is_file():
        raise ConfigError(f"--config {name}: no such file")
    try:
        return tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"--config {name}: not a TOML file ({exc})") from None


def parse_set(item: str) -> tuple[str, object]:
    """``key=value``: the value read as TOML (``0.5``, ``true``, ``"text"``, ``[1, 2]``), else as plain text."""
    key, sep, text = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. --set server_lr=0.001")
    try:
        value = tomllib.loads(f"v = {text.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = text.strip()
    return key, value


def build(values: dict[str, object], sources: dict[str, str]) -> RunConfig:
    """A checked :class:`RunConfig` from flat dotted ``values``."""
    known = keys()
    for k in values:
        if k not in known:
            close = difflib.get_close_matches(k, list(known), n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else " (`fedbrain config show` lists the keys)"
            raise ConfigError(f"unknown setting {k!r}{hint}")
    checked = {k: _coerce(k, v, known[k]) for k, v in values.items()}
    for k, v in checked.items():
        _check_range(k, v)
    groups: dict[str, dict] = {"": {}, "local": {}, "train": {}, "data": {}}
    for k, v in checked.items():
        prefix, _, name = k.rpartition(".")
        groups[prefix][name] = v
    top = groups[""]
    budget = top.pop("budget_epochs", BUDGET_EPOCHS)
    algorithm = top.pop("algorithm", JobSettings.algorithm)
    try:
        job = JobSettings.create(algorithm, train=groups["local"], **top)
        train = TrainConfig(**groups["train"])
    except (TypeError, ValueError) as exc:
        raise ConfigError(str(exc)) from None
    return RunConfig(job=job, train=train, data=DataSettings(**groups["data"]), budget_epochs=budget,
                     sources=sources)


def _coerce(key: str, value: object, default: object) -> object:
    """``value`` checked against the type of the key's default (ints accepted where numbers are)."""
    if default is None or value is None:
        return value
    want = type(default)
    if want is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if want is float and isinstance(value, str) and value.lower() in ("inf", "infinity"):
        value = math.inf
    if not isinstance(value, want) or (want is int and isinstance(value, bool)):
        raise ConfigError(f"setting {key}: expected {want.__name__}, not {value!r}")
    return value


# key (or ".name" for that name in any section) -> (lowest, highest, lowest excluded, highest excluded)
RANGES: dict[str, tuple] = {
    "rounds": (1, None, False, False), "budget_epochs": (0, None, True, False),
    "data.num_sites": (1, None, False, False), "data.alpha": (0, None, True, False),
    "data.max_images_per_site": (0, None, False, False), "min_clients": (1, None, False, False),
    "validations": (0, None, False, False), "server_lr": (0, None, True, False),
    "server_momentum": (0, 1, False, True), "fedprox_mu": (0, None, False, False),
    "dp_clip": (0, None, False, False), "dp_noise": (0, None, False, False), "dp_epsilon": (0, None, False, False),
    "dp_delta": (0, 1, True, True), "dp_max_grad_norm": (0, None, True, False), "dp_sample_rate": (0, 1, True, False),
    "distil_weight": (0, 1, False, False), "distil_temperature": (0, None, True, False),
    "threads_per_site": (1, None, False, False), ".lr": (0, None, True, False), ".epochs": (1, None, False, False),
    ".batch_size": (1, None, False, False), ".steps": (0, None, False, False), ".momentum": (0, 1, False, True),
    ".weight_decay": (0, None, False, False), ".threads": (1, None, False, False),
}


def _check_range(key: str, value: object) -> None:
    rule = RANGES.get(key) or (RANGES.get("." + key.rpartition(".")[2]) if "." in key else None)
    if rule is None or not isinstance(value, (int, float)) or isinstance(value, bool):
        return
    lo, hi, lo_open, hi_open = rule
    bad_lo = value <= lo if lo_open else value < lo
    bad_hi = hi is not None and (value >= hi if hi_open else value > hi)
    if bad_lo or bad_hi or (isinstance(value, float) and math.isnan(value)):
        rng = (">" if lo_open else ">=") + f" {lo:g}" + (f" and {'<' if hi_open else '<='} {hi:g}" if hi is not None
                                                       else "")
        raise ConfigError(f"setting {key} must be {rng}, not {value!r}")


def _flatten(table: dict, prefix: str = "") -> list[tuple[str, object]]:
    out = []
    for k, v in table.items():
        if isinstance(v, dict) and k in ("local", "train", "data") and not prefix:
            out += _flatten(v, f"{k}.")
        else:
            out.append((prefix + k, v))
    return out


def _drop_none(d: dict) -> dict:
    return {k: _drop_none(v) if isinstance(v, dict) and k in ("local", "train", "data") else v
            for k, v in d.items() if v is not None}


# ---------------------------------------------------------------------- TOML writing (tomllib only reads)


def toml_value(v: object) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return "inf" if v == math.inf else repr(v)
    if isinstance(v, int):
        return str(v)
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k} = {toml_value(x)}" for k, x in v.items()) + "}"
    raise ConfigError(f"cannot write {v!r} to TOML")


def dumps_toml(table: dict) -> str:
    """A flat TOML document: scalars first, then one ``[section]`` per nested table."""
    lines = [f"{k} = {toml_value(v)}" for k, v in table.items() if not isinstance(v, dict) or k not in
             ("local", "train", "data")]
    for section in ("local", "train", "data"):
        if section in table:
            lines += ["", f"[{section}]"] + [f"{k} = {toml_value(v)}" for k, v in table[section].items()]
    return "\n".join(lines) + "\n"


__all__ = ["RunConfig", "DataSettings", "ConfigError", "load", "CONFIG_FILE"]
