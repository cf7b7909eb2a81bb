"""Every ```python block of the documentation site (docs/*.md) runs as
pasted into a new file: each in a fresh interpreter, in an empty temporary
directory, and exits 0 (as tests/test_readme.py does for the README)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
_FENCE = re.compile(r"^```python\n(.*?)^```", re.S | re.M)
BLOCKS = [
    (f"{page.relative_to(ROOT / 'docs')}#{i}", code)
    for page in sorted((ROOT / "docs").rglob("*.md"))
    for i, code in enumerate(_FENCE.findall(page.read_text(encoding="utf-8")))
]
#: Blocks that cannot run here, by a text they hold, and why.
CANNOT_RUN = {
    "cache.internal": "the Redis example connects to servers named cache.internal",
    "open_mystore": "a fragment: open_mystore is the reader's own backend factory",
}


def test_the_docs_have_python_blocks() -> None:
    pages = {name.split("#")[0] for name, _ in BLOCKS}
    assert len(BLOCKS) >= 8
    assert {"getting-started.md", "backends/memory.md", "backends/directory.md"} <= pages


@pytest.mark.parametrize("name", [name for name, _ in BLOCKS])
def test_docs_block_runs(name: str, tmp_path: Path) -> None:
    code = dict(BLOCKS)[name]
    for text, why in CANNOT_RUN.items():
        if text in code:
            print(f"docs block {name}: not run: {why}")
            pytest.skip(why)
    script = tmp_path / "block.py"
    script.write_text(code)
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
    env.pop("BLOBLEASES_STORE", None)
    proc = subprocess.run(
        [sys.executable, str(script)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, f"{name}:\n{code}\n{proc.stderr[-3000:]}"
