"""The diagrams of docs/architecture.md that are made from the code, so that they cannot drift: which folder's
Python imports which folder's, and which module of the handler imports which. tests/test_architecture.py
compares the page with them;

    .venv/bin/python tests/support/architecture.py

writes them into the page (between their markers) after a change of the layout.
"""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PAGE = ROOT / "docs" / "architecture.md"
# Where a top-level import is found, in the order Python searches: pytest.ini's pythonpath, the folders scripts
# and benchmarks put on their path (each also finds its own folder's modules), and the tests' own folder.
SEARCH = ("", "handler", "scripts", "tests/support", "docs", "proto/gen", "benchmarks", "tests")
# The folders with Python of their own, most specific first: a file belongs to the first that holds it.
AREAS = ("handler/style_engine", "handler", "jobs", "scripts", "tests/support", "tests", "benchmarks", "deploy",
         "docs", "proto/gen")
ARROW = " ──▶ "
MARKERS = {"folders": "<!-- imports between folders: made by tests/support/architecture.py -->",
           "handler": "<!-- imports between the handler's modules: made by tests/support/architecture.py -->"}
END = "<!-- end of what tests/support/architecture.py made -->"


def python_files() -> list[Path]:
    """The repository's own Python (not the virtual environment's or the generated stubs')."""
    return sorted(path for area in AREAS if area != "proto/gen" for path in (ROOT / area).glob("*.py"))


def area_of(path: Path) -> str:
    relative = path.relative_to(ROOT).as_posix()
    return next(area for area in AREAS if relative.startswith(area + "/"))


def imported_files(path: Path) -> set[Path]:
    """The repository's files that `path` imports (at any depth of its code: imports inside functions too)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names = [node.module]
        elif isinstance(node, ast.ImportFrom):  # relative: within the package
            names = [f"{path.parent.name}.{node.module}" if node.module else path.parent.name]
        else:
            continue
        found.update(filter(None, (_resolve(name, path) for name in names)))
    return found


def _resolve(name: str, importer: Path) -> Path | None:
    parts = name.split(".")
    for base in (importer.parent.relative_to(ROOT).as_posix(), *SEARCH):
        folder = ROOT / base
        for candidate in (folder.joinpath(*parts).with_suffix(".py"), folder.joinpath(*parts, "__init__.py"),
                          folder / f"{parts[0]}.py", folder / parts[0] / "__init__.py"):
            if candidate.is_file() and candidate != importer:
                return candidate
    return None


def folder_diagram() -> list[str]:
    """One line per folder with Python: the folders whose modules it imports."""
    edges: dict[str, set[str]] = {}
    for path in python_files():
        edges.setdefault(area_of(path), set()).update(
            area_of(target) for target in imported_files(path) if area_of(target) != area_of(path))
    return _lines({f"{area}/": sorted(f"{target}/" for target in targets) for area, targets in edges.items()},
                  order=[f"{area}/" for area in AREAS])


def handler_diagram() -> list[str]:
    """One line per module of handler/ (the TorchServe side): the modules of handler/ it imports."""
    modules = sorted((ROOT / "handler").glob("*.py"))
    edges = {path.stem: sorted(target.stem for target in imported_files(path) if target.parent == path.parent)
             for path in modules}
    order = ["style_transfer_handler", *sorted(name for name in edges if name != "style_transfer_handler")]
    return _lines(edges, order)


def _lines(edges: dict[str, list[str]], order: list[str], wrap: int = 100) -> list[str]:
    """`name ──▶ a, b, c` per name in `order`, the names aligned and long lists wrapped under the arrow's end."""
    width = max(len(name) for name in edges)
    lines = []
    for name in (name for name in order if name in edges):
        line = name
        for position, target in enumerate(edges[name]):
            piece = f"{ARROW}{target}" if position == 0 else f", {target}"
            if len(line) + len(piece) > wrap:
                lines.append(line.rstrip() + ",")
                line, piece = " " * (width + len(ARROW)), target
            elif position == 0:
                line = f"{name:<{width}}"
            line += piece
        lines.append(line)
    return lines


def diagrams() -> dict[str, list[str]]:
    return {"folders": folder_diagram(), "handler": handler_diagram()}


def page_with(text: str, made: dict[str, list[str]]) -> str:
    """`text` (the page) with each diagram, as an indented block, between its marker and END."""
    for key, marker in MARKERS.items():
        before, found, rest = text.partition(marker + "\n")
        if not found:
            raise ValueError(f"{PAGE.name} lacks the line {marker}")
        _, found, after = rest.partition(END)
        if not found:
            raise ValueError(f"{PAGE.name} lacks {END} after {marker}")
        text = before + marker + "\n\n" + "".join(f"    {line}\n" for line in made[key]) + "\n" + END + after
    return text


if __name__ == "__main__":
    PAGE.write_text(page_with(PAGE.read_text(), diagrams()))
