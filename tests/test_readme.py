"""README.md stays true: every parameter documented with its real default, and the commands it gives exist."""

import json
import re
import subprocess

from conftest import ROOT
from style_engine.params import describe_params

README = (ROOT / "README.md").read_text()


def test_every_parameter_is_in_the_readme_with_its_default():
    rows = dict(re.findall(r"^\| `(\w+)` \| `([^`]*)` \|", README, flags=re.MULTILINE))
    for param in describe_params():
        assert param["name"] in rows, f"README lacks parameter {param['name']}"
        assert json.loads(rows[param["name"]]) == param["default"], param["name"]


def test_ci_runs_the_readme_test_command():
    assert "\n    scripts/test.sh\n" in README and "\n    scripts/serve.sh\n" in README
    assert "exec scripts/test.sh" in (ROOT / ".ci" / "run").read_text()


def test_every_reference_to_a_readme_section_names_one():
    headings = set(re.findall(r"^#+ (?:\d+\. )?(.+?)$", README, flags=re.MULTILINE))
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    for name in tracked.split():
        path = ROOT / name
        if path.suffix in {".py", ".yaml", ".properties", ".sh", ".conf", ""} and path.is_file():
            for section in re.findall(r'README, "([A-Za-z][^"]*)"', path.read_text(errors="replace")):
                assert any(heading.startswith(section) for heading in headings), f"{name}: no README section {section}"
