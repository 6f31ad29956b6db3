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


def test_readme_results_table_is_the_committed_reports_numbers():
    # the README's mean R@1 table must be what reports/examples/batch_sweep/report.json says
    import json

    report = json.loads((REPO / "reports/examples/batch_sweep/report.json").read_text())
    by_method = report["metrics"]["mean_r1"]
    section = README[
        README.index("## Results on this machine") : README.index("### Training noise")
    ]
    rows = re.findall(r"^\| (\w+)[^|]* \| ([\d. |]+)\|$", section, re.M)
    assert {name for name, _ in rows} == set(by_method)
    for name, cells in rows:
        values = [float(v) for v in cells.split("|")]
        batches = sorted(by_method[name]["by_batch"], key=int)
        assert values == [round(by_method[name]["by_batch"][b]["mean"], 1) for b in batches]


def test_readme_seed_table_is_the_committed_seed_sweep():
    # mean ± CI half-width across 3 seeds at batch 32 and 512, and the paired difference to clip
    import json

    report = json.loads((REPO / "reports/examples/seed_sweep/report.json").read_text())
    cells, diffs = report["metrics"]["mean_r1"], report["comparisons"]["mean_r1"]
    section = README[README.index("### Training noise") : README.index("## The sweep")]
    rows = re.findall(r"^\| (\w+)[^|]* \| ([^\n]+) \|$", section, re.M)[1:]  # not the header
    assert {name for name, _ in rows} == set(cells)
    for name, text in rows:
        shown = [float(v) for v in re.findall(r"[-+]?\d+\.\d", text)]
        expected = []
        for b in ("32", "512"):
            c = cells[name]["by_batch"][b]
            expected += [round(c["mean"], 1), round((c["high"] - c["low"]) / 2, 1)]
        for b in ("32", "512"):
            if name != "clip":
                expected.append(round(diffs[name][b]["diff"], 1))
        assert shown[: len(expected)] == expected, name
