"""The README's commands are the ones CI runs."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _bash_blocks():
    return re.findall(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)


def test_ci_runs_the_readme_install_and_test_commands():
    blocks = [b.strip() for b in _bash_blocks()]
    install, test = blocks[0], blocks[2]
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert install in ci and test in ci
    assert "torch==2.13.0" in install  # a CPU build from the machine's disk, not a multi-GB CUDA one
