"""docs/architecture.md draws the layout as it is: its import diagrams are made from the code, its layout names
every file where it lives; what users run imports nothing from tests/; the handler stays TorchServe glue."""

import ast
import re

import pytest

from architecture import PAGE, ROOT, diagrams, folder_diagram, page_with

LISTED_FOLDERS = ("handler", "handler/style_engine", "jobs", "scripts", "tests/support", "benchmarks")
HANDLER_CLASS_LINES = 150
METHOD_LINES = 30


def test_the_page_s_import_diagrams_are_the_code_s():
    text = PAGE.read_text()
    assert page_with(text, diagrams()) == text, (
        "the layout changed: run .venv/bin/python tests/support/architecture.py to redraw docs/architecture.md")


def test_nothing_users_run_imports_from_the_tests():
    for line in folder_diagram():
        importer, _, imported = line.partition("──▶")
        if not importer.strip().startswith("tests/") and importer.strip():
            assert "tests/" not in imported, line


def layout_entries() -> dict[str, str]:
    """The layout block of the page: each top-level entry's text, by its folder."""
    block = PAGE.read_text().split("## Layout\n\n", 1)[1].split("\n\n", 1)[0]
    entries = re.split(r"^    (?=\S)", block, flags=re.MULTILINE)
    return {entry.split()[0].rstrip("/"): entry for entry in entries if entry.strip()}


@pytest.mark.parametrize("folder", LISTED_FOLDERS)
def test_the_layout_names_every_file_of_a_folder_and_no_other(folder):
    entry = layout_entries()[folder]
    files = {path.name for path in (ROOT / folder).iterdir()
             if path.is_file() and not path.name.startswith(".") and path.name != "__init__.py"}
    named = set(re.findall(r"(?<![\w/.-])([\w-]+\.(?:py|sh|yaml))\b", entry))
    assert files - named == set(), f"docs/architecture.md's layout does not say what these {folder}/ files are"
    assert {name for name in named if not any((ROOT / folder).rglob(name))} == set(), f"not in {folder}/"


def test_the_handler_class_is_glue_with_short_methods():
    tree = ast.parse((ROOT / "handler" / "style_transfer_handler.py").read_text())
    (handler,) = [node for node in tree.body if isinstance(node, ast.ClassDef)]
    assert handler.end_lineno - handler.lineno + 1 <= HANDLER_CLASS_LINES
    lengths = {node.name: node.end_lineno - node.lineno + 1
               for node in handler.body if isinstance(node, ast.FunctionDef)}
    assert max(lengths.values()) <= METHOD_LINES, lengths
