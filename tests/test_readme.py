"""Every ```python block of README.md runs as pasted into a new file: each in
a fresh interpreter, in an empty temporary directory, and exits 0."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BLOCKS = re.findall(r"^```python\n(.*?)^```", (ROOT / "README.md").read_text(), re.S | re.M)
#: Blocks that name hosts this machine does not have, and why they cannot run.
NEEDS_HOSTS = {
    "cache.internal": "the Redis example connects to servers named cache.internal",
    "db.internal": "the PostgreSQL example connects to servers named db.internal",
}


def test_readme_has_python_blocks() -> None:
    assert len(BLOCKS) >= 3


@pytest.mark.parametrize("number", range(len(BLOCKS)))
def test_readme_block_runs(number: int, tmp_path: Path) -> None:
    code = BLOCKS[number]
    for host, why in NEEDS_HOSTS.items():
        if host in code:
            print(f"README block {number}: not run: {why}")
            pytest.skip(why)
    script = tmp_path / f"block{number}.py"
    script.write_text(code)
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
    proc = subprocess.run(
        [sys.executable, str(script)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, f"block {number}:\n{code}\n{proc.stderr[-3000:]}"
