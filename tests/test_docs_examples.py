"""Every ```python block of the documentation site (docs/*.md) runs as
pasted into a new file: each in a fresh interpreter, in an empty temporary
directory, and exits 0 (as tests/test_readme.py does for the README)."""

from __future__ import annotations

from pathlib import Path

import pytest

from code_blocks import ROOT, python_blocks, run_block

BLOCKS = [
    (f"{page.relative_to(ROOT / 'docs')}#{i}", code)
    for page in sorted((ROOT / "docs").rglob("*.md"))
    for i, code in enumerate(python_blocks(page))
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
    run_block(f"docs block {name}", dict(BLOCKS)[name], tmp_path, CANNOT_RUN)
