"""The README's commands are the ones CI runs."""
from pathlib import Path

ROOT = Path(__file__).parent.parent


def test_ci_runs_the_readme_test_command():
    command = ROOT.joinpath(".ci/run").read_text().strip().splitlines()[-1]
    assert command in ROOT.joinpath("README.md").read_text()
    assert "pytest" in command and "torch==2.13.0" in command


def test_the_readme_python_examples_run_as_written(tmp_path, monkeypatch):
    """The library and custom-cell snippets, in order, in one namespace (they build on each other)."""
    import re

    readme = ROOT.joinpath("README.md").read_text()
    section = readme[readme.index("## Measure the bias of your own RNN"):readme.index("## What `decompose` measures")]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    assert len(blocks) == 7  # the library, the three notebook cells, every-step losses, BPTT(K1, K2), the custom cell
    monkeypatch.chdir(tmp_path)  # report.save("audit/") writes here
    namespace = {}
    for block in blocks:
        exec(compile(block, "README.md", "exec"), namespace)
    assert (tmp_path / "audit" / "audit.nc").is_file()
    assert 0 <= float(namespace["ds"]["rel_bias"].sel(K=10)) < 1
    assert namespace["K"] == 3  # what the notebook example's comments say
    assert namespace["char_lm"].exact["kappa"].values.tolist() == [0, 2, 7]  # the output shown
    assert round(float(namespace["chunked"]["rel_bias_truncated"]), 4) == 0.0067  # BPTT(10, 5), as shown
    assert namespace["nb"].exact["rel_bias_upper"].sel(K=[2, 3]).values.round(3).tolist() == [0.147, 0.098]
