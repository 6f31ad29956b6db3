"""The README's set-up commands stay true: CI runs the test command verbatim, files exist."""

import re

from tests.conftest import REPO

README = (REPO / "README.md").read_text()


def setup_commands():
    block = re.search(r"```bash\n(.*?)```", README, re.S).group(1)
    return [line for line in block.splitlines() if line.strip()]


def test_readme_opens_with_exactly_two_setup_commands():
    assert README.index("```bash") < 200
    install_and_run, install_and_test = setup_commands()
    assert (
        "pip install" in install_and_run
        and "harness.run configs/batch_sweep.gin" in install_and_run
    )
    assert "pip install" in install_and_test and "pytest" in install_and_test


def test_ci_runs_the_readme_test_command():
    ci = (REPO / ".ci" / "run").read_text()
    assert setup_commands()[1] in ci.splitlines()


def test_every_config_named_in_the_readme_exists():
    for path in set(re.findall(r"configs/[\w/.-]+\.(?:gin|json)", README)):
        assert (REPO / path).exists(), path
