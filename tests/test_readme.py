"""README.md is generated from nbs/index.ipynb, and CI runs exactly the test command the README gives."""
import re

from conftest import ROOT
from make_readme import readme_text


def test_readme_is_current():
    assert (ROOT / "README.md").read_text() == readme_text(), "README.md is stale: run `python tests/make_readme.py`"


def readme_commands():
    "The fenced `sh` one-liners that set up a fresh machine."
    blocks = re.findall(r"```sh\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    return [b.strip() for b in blocks if b.strip().startswith("python -m venv")]


def test_ci_runs_the_readme_test_command():
    main, tests = readme_commands()
    assert "giblet-" in main and "pytest" in tests
    test_cmd = tests.split("&& ", 4)[-1]          # the part after the venv and the setup steps
    # .ci/run runs it in two lanes, one line each, to time them: the fast lane, then the slow lane
    lanes = [l for l in (ROOT / ".ci" / "run").read_text().splitlines() if l.startswith(("nbdev_test", "pytest"))]
    assert " && ".join(lanes) == test_cmd, (lanes, test_cmd)
    assert lanes == ['nbdev_test && pytest tests -m "not slow"', "pytest tests -m slow"], lanes   # together: every test
    for setup in ("pip install torch==2.13.0", 'pip install -e ".[dev]"'):
        assert setup in tests
