"""The ``fedbrain`` entry point: one parser built from an explicit list of command modules."""

from __future__ import annotations

import argparse
import sys

from fedbrain.cli import (
    compression,
    configuration,
    dashboard,
    data,
    deployment,
    federation,
    privacy,
    results,
    runs,
    training,
)
from fedbrain.cli.options import Parser, UsageError

# Each module has ``register(groups)``; a module that fails to import fails the CLI loudly.
COMMAND_MODULES = (data, training, federation, configuration, deployment, compression, privacy, dashboard, runs,
                   results)
GROUPS = {"data": "inspect, fetch and split data", "bench": "benchmarks", "config": "the job configuration"}


class CommandGroups:
    """The top-level sub-commands and the shared groups (``fedbrain data ...``, ``fedbrain bench ...``)."""

    def __init__(self, sub: argparse._SubParsersAction):
        self.top = sub
        self._groups: dict[str, argparse._SubParsersAction] = {}
        for name, help_text in GROUPS.items():
            parser = sub.add_parser(name, help=help_text)
            self._groups[name] = parser.add_subparsers(dest=f"{name}_command", required=True)

    def group(self, name: str) -> argparse._SubParsersAction:
        return self._groups[name]


def build_parser() -> argparse.ArgumentParser:
    from fedbrain import __version__

    parser = Parser(
        prog="fedbrain", description="Privacy-preserving federated learning for brain-tumour MRI on NVIDIA FLARE.")
    parser.add_argument("--version", action="version", version=f"fedbrain {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    groups = CommandGroups(sub)
    for module in COMMAND_MODULES:
        module.register(groups)
    return parser


def main(argv: list[str] | None = None) -> int:
    from fedbrain.checkpoint import CheckpointError
    from fedbrain.data.images import ImageError
    from fedbrain.data.readers import DataLayoutError

    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (UsageError, DataLayoutError, CheckpointError, ImageError, KeyError, FileNotFoundError) as exc:
        msg = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        print(f"fedbrain: error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fedbrain: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
