"""The ```python blocks of Markdown pages, and how test_readme and
test_docs_examples run them: each as pasted into a new file, in a fresh
interpreter, in an empty temporary directory, with this checkout's src on
the path and no ``$BLOBLEASES_STORE``."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
_FENCE = re.compile(r"^```python\n(.*?)^```", re.S | re.M)


def python_blocks(page: Path) -> list[str]:
    """The code of every ```python block of ``page``, in order."""
    return _FENCE.findall(page.read_text(encoding="utf-8"))


def run_block(name: str, code: str, directory: Path, cannot_run: dict[str, str]) -> None:
    """Run block ``name`` in ``directory``; it must exit 0. A block holding
    a text of ``cannot_run`` is skipped with the reason given for it."""
    for text, why in cannot_run.items():
        if text in code:
            print(f"{name}: not run: {why}")
            pytest.skip(why)
    script = directory / "block.py"
    script.write_text(code)
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
    env.pop("BLOBLEASES_STORE", None)
    proc = subprocess.run(
        [sys.executable, str(script)],
        cwd=directory,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, f"{name}:\n{code}\n{proc.stderr[-3000:]}"
