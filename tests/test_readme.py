"""The README's two set-up commands are exactly what CI runs."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_readme_commands_are_what_ci_runs():
    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)\n```", readme, flags=re.S)
    commands = [b for b in blocks if b.startswith("python3 -m venv")]
    assert len(commands) == 2
    assert "train.py fit -c configs/demo.yaml" in commands[0] and "pytest" in commands[1]
    ci_lines = (ROOT / ".ci" / "run").read_text().splitlines()
    for command in commands:
        assert any(line.startswith(command) for line in ci_lines), f"README command not run by .ci/run: {command}"
