"""The README's promises: its Python runs, its model table is complete, CI runs its command."""

import re
from pathlib import Path

import cnnkit

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def test_readme_python_example_runs(tmp_path, monkeypatch, capsys):
    code = re.findall(r"```python\n(.*?)```", README, re.S)
    assert code, "README has no python example"
    code = [c.replace("/tmp/cnnkit-readme", str(tmp_path)) for c in code]
    for block in code:
        exec(compile(block, "README.md", "exec"), {})
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "torch.Size([2, 10])"
    assert out[1] == "['mobilenet_v1', 'mobilenet_v2']"
    assert int(out[2]) == 1_816_557_056
    assert float(out[3]) >= 0.93, "the README's training example must learn (0.966 measured)"
    assert out[4] == "0 0", "the reloaded run must read the first digit as a 0"


def test_readme_lists_every_model():
    missing = [m for m in cnnkit.list_models() if f"`{m}`" not in README]
    assert not missing, f"README's model table lacks {missing}"


def test_ci_runs_the_readme_test_command():
    commands = re.findall(r"```bash\n(.*?)\n\s*```", README, re.S)
    assert len(commands) == 2
    test_command = commands[1].strip()
    assert test_command in (ROOT / ".ci" / "run").read_text()
