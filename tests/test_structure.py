"""The package's shape: every documented command exists (through the real entry point), no import loops,
nothing outside ``fedbrain.cli`` imports the CLI, and the run-folder schema is written down once."""

from __future__ import annotations

import ast
import importlib.metadata
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE_DIRS = {"fedbrain": ROOT / "custom" / "fedbrain", "fedbrain.compression": ROOT / "compression",
                "fedbrain.dashboard": ROOT / "dashboard"}
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "jobs" / "README.md",
        ROOT / "workspace" / "README.md"]


# ---------------------------------------------------------------- documented commands


def _code_texts(md: str) -> tuple[list[str], list[str]]:
    """(fenced code blocks, inline code spans) of a Markdown text."""
    blocks = re.findall(r"```[^\n]*\n(.*?)```", md, flags=re.S)
    rest = re.sub(r"```[^\n]*\n.*?```", "", md, flags=re.S)
    return blocks, re.findall(r"`([^`\n]+)`", rest)


def _commands(text: str) -> list[str]:
    """Every ``fedbrain ...`` command in a code text (continuation lines joined, comments dropped)."""
    text = re.sub(r"\\\n\s*", " ", text)
    out = []
    for line in text.splitlines():
        for m in re.finditer(r"(?:^|[\s:$])(fedbrain\s+[a-z].*)$", line):
            out.append(m.group(1).split(" #")[0].strip())
    return out


def documented_commands() -> list[tuple[str, str, bool]]:
    """(file, command, complete): complete = from a fenced block (meant to be run as written)."""
    found = []
    for doc in DOCS:
        blocks, spans = _code_texts(doc.read_text())
        for b in blocks:
            found += [(doc.name, c, True) for c in _commands(b)]
        for s in spans:
            found += [(doc.name, c, False) for c in _commands(s)]
    return found


def _tokens(command: str) -> list[str]:
    """The command's arguments with placeholders filled in and optional ``[...]`` parts dropped."""
    command = re.sub(r"<[^>]*>", "X", command)
    command = re.sub(r"\[[^\]]*\]", " ", command)
    toks = shlex.split(command.replace("\\|", "|"))[1:]
    toks = [t.split("|")[0] for t in toks if t not in ("...", "…")]
    return [t[:-3] if t.endswith("...") else t for t in toks]


def _entry_point():
    """``fedbrain`` as installed: the console script's target, resolved from the package metadata."""
    (ep,) = [e for e in importlib.metadata.entry_points(group="console_scripts") if e.name == "fedbrain"]
    return ep.load()


def _command_parser(tokens: list[str]):
    """(the sub-command words at the start of ``tokens``, the real parser of that sub-command)."""
    import argparse

    from fedbrain.cli.main import build_parser

    parser, path = build_parser(), []
    for tok in tokens:
        subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        if not subs or tok not in subs[0].choices:
            break
        parser = subs[0].choices[tok]
        path.append(tok)
    return path, parser


def _command_path(tokens: list[str]) -> list[str]:
    """The sub-command words at the start of ``tokens`` (as the real parser knows them)."""
    return _command_parser(tokens)[0]


DOCUMENTED = documented_commands()


def test_the_docs_show_the_deployment_commands():
    shown = {" ".join(_command_path(_tokens(c))) for _, c, _ in DOCUMENTED}
    assert {"provision", "submit", "data split", "simulate", "compare", "compress", "dashboard"} <= shown


@pytest.mark.parametrize("path", sorted({" ".join(_tokens(c)[:3]) for _, c, _ in DOCUMENTED}))
def test_every_documented_command_answers_help_through_the_entry_point(path, capsys):
    main = _entry_point()
    words = _command_path(path.split())
    assert words, f"`fedbrain {path}` (documented) is not a fedbrain command"
    with pytest.raises(SystemExit) as exc:
        main([*words, "--help"])
    assert exc.value.code == 0
    assert "usage: fedbrain " + " ".join(words) in capsys.readouterr().out


@pytest.mark.parametrize("doc,command", [(d, c) for d, c, complete in DOCUMENTED if complete])
def test_every_documented_command_line_parses(doc, command):
    """Each command of a code block parses with the real parser: its flags and choices exist."""
    from fedbrain.cli.main import build_parser

    try:
        build_parser().parse_args(_tokens(command))
    except SystemExit as exc:
        pytest.fail(f"{doc}: `{command}` does not parse (exit {exc.code})")


@pytest.mark.parametrize("doc,command", [(d, c) for d, c, complete in DOCUMENTED if not complete])
def test_every_flag_of_a_command_quoted_in_prose_exists(doc, command):
    """Commands in running text need not be complete, but each flag they name is one of that sub-command."""
    path, parser = _command_parser(_tokens(command))
    flags = [t.split("=")[0].rstrip(",.;:)") for t in _tokens(command) if t.startswith("--")]
    unknown = [f for f in flags if f not in parser._option_string_actions]
    assert not unknown, f"{doc}: `{command}`: fedbrain {' '.join(path)} has no {unknown}"


def test_the_installed_console_script_runs():
    exe = Path(sys.executable).with_name("fedbrain")
    proc = subprocess.run([str(exe), "provision", "--help"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "--server-host" in proc.stdout


def test_a_broken_command_module_fails_loudly(monkeypatch):
    """The parser is built from an explicit module list: an import error is not swallowed."""
    import fedbrain.cli.main as cli_main

    class Broken:
        @staticmethod
        def register(groups):
            raise ImportError("broken on purpose")

    monkeypatch.setattr(cli_main, "COMMAND_MODULES", (*cli_main.COMMAND_MODULES, Broken))
    with pytest.raises(ImportError, match="broken on purpose"):
        cli_main.build_parser()


# ---------------------------------------------------------------- imports


def _modules() -> dict[str, Path]:
    out = {}
    for pkg, folder in PACKAGE_DIRS.items():
        for f in folder.rglob("*.py"):
            rel = f.relative_to(folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            if pkg == "fedbrain" and parts[:1] in (["compression"], ["dashboard"]):
                continue
            out[".".join([pkg, *parts])] = f
    return out


MODULES = _modules()


def _imports(name: str, path: Path) -> set[str]:
    """fedbrain modules ``name`` imports anywhere (module level or inside functions)."""
    tree = ast.parse(path.read_text())
    is_pkg = path.name == "__init__.py"
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = name.split(".") if is_pkg else name.split(".")[:-1]
                anchor = anchor[:len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in MODULES:
                t = t.rpartition(".")[0]
            if t and t != name and t.startswith("fedbrain"):
                found.add(t)
    return found


GRAPH = {name: _imports(name, path) for name, path in MODULES.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_import_graph_is_seen():
    assert "fedbrain.cli.main" in GRAPH and "fedbrain.fl.site" in GRAPH and "fedbrain.compression.pipeline" in GRAPH
    assert "fedbrain.training" in GRAPH["fedbrain.fl.site"]
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_loop_anywhere_in_the_package():
    assert _cycles(GRAPH) == []


def test_nothing_outside_the_cli_imports_it():
    offenders = {m: sorted(t for t in deps if t.startswith("fedbrain.cli"))
                 for m, deps in GRAPH.items() if not m.startswith("fedbrain.cli")}
    assert {m: d for m, d in offenders.items() if d} == {}


def test_run_folder_paths_are_assembled_only_by_runs_py():
    """Schema names ("splits", "checkpoints", ...) are joined onto paths in fedbrain.runs alone."""
    pattern = re.compile(r'/\s*"(splits|checkpoints|sites|metrics\.jsonl|results\.json|config\.json|'
                         r'data_summary\.json|cross_site\.json|server_audit\.jsonl|best\.pt|last\.pt)"')
    offenders = [f"{name}: {line.strip()}" for name, path in MODULES.items() if name != "fedbrain.runs"
                 for line in path.read_text().splitlines() if pattern.search(line) and "torch.hub" not in line]
    assert offenders == []


def _run_paths() -> set[str]:
    """Every path a RunDir names, relative to the run (site-specific ones with ``<site>``)."""
    from fedbrain.runs import RunDir

    run = RunDir("/r")
    out = {str(getattr(run, a).relative_to("/r")) for a in dir(RunDir)
           if isinstance(getattr(RunDir, a, None), property) and isinstance(getattr(run, a), Path)}
    out |= {str(run.site_policy("<site>").relative_to("/r")), str(run.site_keys("<site>").relative_to("/r")),
            str(run.site_privacy_ledger("<site>").relative_to("/r"))}
    out |= {str(run.split_file("<site>").relative_to("/r")), str(run.site_metrics("<site>").relative_to("/r")),
            str(run.round_model(0).relative_to("/r")).replace("0000", "NNNN"),
            str(run.evaluation_file("robustness", "<model>").relative_to("/r")),
            str(run.evaluation_file("robustness", "<model>").with_suffix(".csv").relative_to("/r")),
            str(run.evaluation_file("external-<folder>", "<model>").relative_to("/r"))}
    return out


def test_the_workspace_schema_and_the_run_folder_object_agree():
    """workspace/README.md documents exactly the paths RunDir names (plus the workspace-level table)."""
    text = (ROOT / "workspace" / "README.md").read_text()
    first_cells = re.findall(r"^\| ([^|]+) \|", text, flags=re.M)
    documented = {p for cell in first_cells for p in re.findall(r"`([^`]+)`", cell)}
    documented = {re.sub(r"^[a-z-]+-<stamp>/", "", p).rstrip("/") for p in documented}
    produced = _run_paths()
    undocumented = {p for p in produced if p not in documented and not any(d.startswith(p + "/") for d in documented)}
    assert undocumented == set(), "RunDir paths missing from workspace/README.md"
    workspace_level = {"bench_models.csv", "compression/report.json", "compression/report.csv",
                       "compression/<variant>.onnx", "compression/<variant>.pt"}
    assert documented - produced - workspace_level == set(), "documented paths RunDir does not name"


def test_one_default_learning_rate():
    """The default lr is written once (TrainConfig); everything else refers to it."""
    hits = [f"{name}" for name, path in MODULES.items() for _ in re.finditer(r"\b2e-3\b|0\.002\b", path.read_text())]
    assert hits == ["fedbrain.training"], hits


UPPER = ("fedbrain.fl", "fedbrain.experiments", "fedbrain.cli", "fedbrain.compression", "fedbrain.dashboard")


def _layer(module: str) -> int:
    """0: the core (fedbrain.<module>, fedbrain.data); 1: the federation (fl); 2: everything that uses both."""
    if module.startswith("fedbrain.fl"):
        return 1
    return 2 if module.startswith(UPPER) else 0


def test_imports_only_run_down_the_layers():
    """The core imports neither the federation nor compression, experiments, the CLI or the dashboard; the
    federation imports none of those above it."""
    up = {m: sorted(t for t in deps if _layer(t) > _layer(m)) for m, deps in GRAPH.items()}
    assert {m: d for m, d in up.items() if d} == {}


def test_the_layer_check_sees_an_upward_import():
    assert _layer("fedbrain.privacy_audit") == 0 and _layer("fedbrain.fl.metrics") == 1
    assert _layer("fedbrain.compression.data") == 2 and _layer("fedbrain.data.arrays") == 0


def test_no_function_in_the_federation_package_is_over_100_lines():
    """The site script and the server side stay readable: every function of fedbrain/fl/ fits 100 lines."""
    long = [f"{path.name}:{node.name} ({node.end_lineno - node.lineno + 1} lines)"
            for path in sorted((PACKAGE_DIRS["fedbrain"] / "fl").glob("*.py"))
            for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 100]
    assert long == []


def test_a_trained_models_card_is_built_in_one_place():
    """checkpoint.training_card builds the card of every model fedbrain trains (pooled, simulated, deployed)."""
    builders = sorted(name for name, path in MODULES.items() if "ModelCard(" in path.read_text())
    # checkpoint: the class and its builder; throughput: a stand-in model file for a timing, trained by nobody
    assert builders == ["fedbrain.checkpoint", "fedbrain.experiments.throughput"]
