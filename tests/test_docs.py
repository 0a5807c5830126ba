"""The documentation: a short README that leads to docs/, links that resolve, and results tables that are
generated from their committed files (so a table cannot drift from the measurement it shows)."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

from fedbrain.experiments.report import TABLES, ReportError, render_document, render_table

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
RESULTS_DOC = ROOT / "docs" / "results.md"
MARKDOWN = [README, *sorted((ROOT / "docs").glob("*.md")), ROOT / "jobs" / "README.md",
            ROOT / "workspace" / "README.md"]


def _sections(text: str) -> dict[str, str]:
    parts = re.split(r"(?m)^## (.+)$", text)
    return dict(zip(parts[1::2], parts[2::2], strict=True))


def _slug(heading: str) -> str:
    return re.sub(r"[^a-z0-9 _-]", "", heading.strip().lower()).replace(" ", "-")


# ---------------------------------------------------------------- the README


def test_the_readme_is_at_most_200_lines():
    assert len(README.read_text().splitlines()) <= 200


def test_the_readme_leads_with_the_quickstart_then_one_section_per_role():
    headings = re.findall(r"(?m)^## (.+)$", README.read_text())
    assert headings[:4] == ["Quickstart", "For researchers", "For hospital IT", "For clinicians"]


@pytest.mark.parametrize("role,doc", [("For researchers", "docs/researchers.md"),
                                      ("For hospital IT", "docs/hospital-it.md"),
                                      ("For clinicians", "docs/clinicians.md")])
def test_each_role_section_ends_with_a_link_to_its_guide(role, doc):
    last_line = _sections(README.read_text())[role].strip().splitlines()[-1]
    assert f"]({doc})" in last_line
    assert (ROOT / doc).is_file()


def test_the_quickstart_shows_make_demo_and_the_test_lanes_then_what_simulate_prints():
    quick = _sections(README.read_text())["Quickstart"]
    commands, expected = re.findall(r"```[a-z]*\n(.*?)```", quick, flags=re.S)[:2]
    assert len(commands.strip().splitlines()) <= 6
    for make_target in ("make demo", "make test-fast", "make test "):
        assert make_target in commands
    assert expected.startswith("run: workspace/")
    assert "best global model on each site's test split and their union:" in expected
    assert "simulator wall time" in expected


def test_the_quickstart_targets_exist_in_the_makefile():
    makefile = (ROOT / "Makefile").read_text()
    for target in ("demo", "test", "test-fast"):
        assert re.search(rf"(?m)^{re.escape(target)}:", makefile), target


def test_the_readme_states_at_most_three_result_numbers_each_from_the_generated_results():
    intro = README.read_text().split("## Quickstart")[0]
    numbers = re.findall(r"\*\*(\d+\.\d+)(?: ms)?\*\*", intro)
    assert 1 <= len(numbers) <= 3
    assert len(re.findall(r"\d+\.\d+", intro)) == len(numbers), "every number of the intro is a marked result"
    results = RESULTS_DOC.read_text()
    for n in numbers:
        assert f"| {n} |" in results, f"{n} is not a cell of a generated table in docs/results.md"


# ---------------------------------------------------------------- links


def _links(doc: Path) -> list[str]:
    text = re.sub(r"```.*?```", "", doc.read_text(), flags=re.S)
    return [t for t in re.findall(r"\]\(([^)\s]+)\)", text) if not t.startswith(("http://", "https://", "mailto:"))]


@pytest.mark.parametrize("doc", MARKDOWN, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_and_anchor_resolves(doc):
    broken = []
    for target in _links(doc):
        path, _, anchor = target.partition("#")
        file = (doc.parent / path).resolve() if path else doc
        if not file.exists():
            broken.append(target)
        elif anchor and file.suffix == ".md":
            headings = {_slug(h) for h in re.findall(r"(?m)^#{1,6} (.+)$", re.sub(r"```.*?```", "", file.read_text(),
                                                                                    flags=re.S))}
            if anchor not in headings:
                broken.append(target)
    assert broken == []


# ---------------------------------------------------------------- generated results


def test_the_committed_results_tables_equal_their_files():
    text = RESULTS_DOC.read_text()
    assert render_document(text, RESULTS_DOC.parent / "results") == text, "run `fedbrain results render`"


def test_every_generated_table_is_placed_in_the_results_document():
    text = RESULTS_DOC.read_text()
    assert [n for n in TABLES if f"<!-- results:{n} -->" not in text] == []


def test_the_results_document_has_no_table_outside_the_generated_blocks():
    text = re.sub(r"<!-- results:(\w+) -->.*?<!-- /results:\1 -->", "", RESULTS_DOC.read_text(), flags=re.S)
    assert [line for line in text.splitlines() if line.startswith("|")] == []


@pytest.mark.parametrize("name", sorted(TABLES))
def test_each_table_names_its_source_files(name):
    caption = render_table(name, RESULTS_DOC.parent / "results").splitlines()[0]
    for source in TABLES[name].sources:
        assert f"(results/{source})" in caption
        assert (RESULTS_DOC.parent / "results" / source).is_file()


def test_a_changed_source_file_changes_its_table(tmp_path):
    results = tmp_path / "results"
    shutil.copytree(RESULTS_DOC.parent / "results", results)
    before = render_table("compression", results)
    report = results / "compression_report.csv"
    report.write_text(report.read_text().replace("0.6174078854245296", "0.1234"))
    after = render_table("compression", results)
    assert before != after and "| 0.123 |" in after


def test_a_metric_resting_on_few_images_is_flagged_and_the_caption_says_why():
    text = render_table("compare_sites", RESULTS_DOC.parent / "results")
    navoneel = [line for line in text.splitlines() if "| navoneel |" in line]
    assert navoneel and all("*" in line for line in navoneel)
    assert "fewer than 10 images of a class" in text.splitlines()[0]


def test_intervals_are_shown_where_the_file_has_them():
    assert re.search(r"0\.806 \[0\.77, 0\.84\]", render_table("compare_union", RESULTS_DOC.parent / "results"))


def test_an_unknown_table_or_a_missing_file_is_a_one_line_error(tmp_path):
    with pytest.raises(ReportError, match="unknown results table 'nope'"):
        render_document("<!-- results:nope -->\n<!-- /results:nope -->\n", tmp_path)
    with pytest.raises(ReportError, match="compression_report.csv: no such results file"):
        render_table("compression", tmp_path)


def test_results_render_check_reports_a_stale_document_through_the_entry_point(tmp_path, capsys):
    from fedbrain.cli.main import main

    shutil.copytree(RESULTS_DOC.parent / "results", tmp_path / "results")
    doc = tmp_path / "results.md"
    doc.write_text("intro\n<!-- results:bench_infer -->\nstale\n<!-- /results:bench_infer -->\n")
    assert main(["results", "render", "--check", "--doc", str(doc)]) == 1
    assert "stale" in doc.read_text()
    assert main(["results", "render", "--doc", str(doc)]) == 0
    assert main(["results", "render", "--check", "--doc", str(doc)]) == 0
    assert "| fedbrain_cnn int8 | 208 |" in doc.read_text()
    assert main(["results", "render", "--doc", str(tmp_path / "missing.md")]) == 2
    assert "no such document" in capsys.readouterr().err
