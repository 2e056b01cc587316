"""README.md stays true: every parameter documented with its real default, and the commands it gives exist."""

import json
import re

from conftest import ROOT
from style_engine.params import describe_params

README = (ROOT / "README.md").read_text()


def test_every_parameter_is_in_the_readme_with_its_default():
    rows = dict(re.findall(r"^\| `(\w+)` \| `([^`]*)` \|", README, flags=re.MULTILINE))
    for param in describe_params():
        assert param["name"] in rows, f"README lacks parameter {param['name']}"
        assert json.loads(rows[param["name"]]) == json.loads(param["default"]), param["name"]


def test_ci_runs_the_readme_test_command():
    assert "\n    scripts/test.sh\n" in README and "\n    scripts/serve.sh\n" in README
    assert "exec scripts/test.sh" in (ROOT / ".ci" / "run").read_text()
