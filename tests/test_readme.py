"""The README's promises: its first commands, its API example, and CI running its test command."""

import re
from pathlib import Path

from mixbits.quant import fused_enabled, set_fused

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def test_first_lines_are_the_setup_and_test_commands():
    block = re.search(r"```bash\n(.*?)```", README, re.S).group(1)
    commands = [line.split("#")[0].strip() for line in block.splitlines() if line.strip()]
    assert commands == ["make demo", "make test"]
    assert README.index("make demo") < 200
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^demo: setup\n\t.*mixbits demo$", makefile, re.M)
    assert re.search(r"^test: setup\n\t.*pytest", makefile, re.M)


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text()
    assert [line for line in ci.splitlines() if line and not line.startswith(("#", "set ", "cd "))] == ["make test"]


def test_api_example_runs(capsys):
    code = re.search(r"```python\n(.*?)```", README, re.S).group(1)
    exec(compile(code, "README.md", "exec"), {})
    out = capsys.readouterr().out
    assert "G BitOPs" in out and "KB" in out


def your_own_model_example() -> str:
    section = README.split("## Your own model", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_the_readme_example_searches_finetunes_evaluates_and_exports(tmp_path, monkeypatch, capsys):
    code = your_own_model_example()
    assert len(code.strip().splitlines()) <= 16
    monkeypatch.chdir(tmp_path)
    was_fused = fused_enabled()
    set_fused(False)  # the eager quantizers: no kernel compilation inside a test
    try:
        exec(compile(code, "README.md", "exec"), {"__name__": "readme_example"})
    finally:
        set_fused(was_fused)
    printed = capsys.readouterr().out
    assert "'samples': 256" in printed
    assert {p.name for p in (tmp_path / "exported").iterdir()} >= {"model.onnx", "model.mxb", "policy.json"}


def test_the_command_table_names_every_command_and_search_method():
    from mixbits import list_methods
    from mixbits.__main__ import COMMANDS

    rows = {re.match(r"\| `mixbits (\w+)", line).group(1): line for line in README.splitlines()
            if re.match(r"\| `mixbits \w+", line)}
    assert set(rows) == set(COMMANDS)
    methods = rows["search"].split("--method", 1)[1].split(";", 1)[0]  # (`uniform`, `hawq`, ...; `mixbits list ...`)
    assert sorted(re.findall(r"`(\w+)`", methods)) == sorted(list_methods())
