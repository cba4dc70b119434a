"""The Space's requirements.txt and pyproject.toml list the same runtime packages (a Space installs only the
former), and the README's two commands are the ones CI runs."""

import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _names(lines):
    return {re.split(r"[<>=!~\[; ]", l.strip(), maxsplit=1)[0].lower() for l in lines if l.strip() and not l.startswith("#")}


def test_space_requirements_match_pyproject():
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    reqs = (ROOT / "requirements.txt").read_text().splitlines()
    assert _names(deps) - {"gradio"} == _names(reqs) - {"gradio"}  # the Space pins gradio via sdk_version


def test_readme_has_space_front_matter_and_ci_reads_its_test_command():
    readme = (ROOT / "README.md").read_text()
    assert readme.startswith("---\n") and "app_file: app.py" in readme and "sdk: gradio" in readme
    assert "<!-- ci:test -->" in readme and "pytest" in readme.split("<!-- ci:test -->")[1].split("<!-- /ci:test -->")[0]
    assert "ci:test" in (ROOT / ".ci" / "run").read_text()
