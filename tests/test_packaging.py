"""The wheel: built from a copy of the source tree by pip with the project's
own build backend (pyproject.toml), then opened and read as an installer
would. It must carry the LICENSE, py.typed and the Lua script, and metadata
that says what the package is (license, classifiers, keywords, urls)."""

from __future__ import annotations

import email.parser
import os
import shutil
import subprocess
import sys
import zipfile
from email.message import Message
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> zipfile.ZipFile:
    work = tmp_path_factory.mktemp("wheel")
    tree = work / "tree"
    tree.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy2(ROOT / name, tree / name)
    shutil.copytree(
        ROOT / "src", tree / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info")
    )
    out = work / "dist"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--disable-pip-version-check",
            "--quiet",
            "-w",
            str(out),
            str(tree),
        ],
        capture_output=True,
        text=True,
        timeout=240,
    )
    if proc.returncode != 0:
        reason = f"pip wheel failed (is the package index reachable?):\n{proc.stderr[-3000:]}"
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    wheels = list(out.glob("blobleases-*.whl"))
    assert len(wheels) == 1, wheels
    return zipfile.ZipFile(wheels[0])


def _metadata(wheel: zipfile.ZipFile) -> Message:
    [name] = [n for n in wheel.namelist() if n.endswith(".dist-info/METADATA")]
    return email.parser.Parser().parsestr(wheel.read(name).decode("utf-8"))


def test_wheel_carries_the_license(wheel: zipfile.ZipFile) -> None:
    licenses = [n for n in wheel.namelist() if n.endswith(".dist-info/licenses/LICENSE")]
    assert licenses, wheel.namelist()
    text = wheel.read(licenses[0]).decode("utf-8")
    assert text == (ROOT / "LICENSE").read_text(encoding="utf-8")
    assert text.startswith("MIT License")
    assert "Copyright (c) 2026 the blobleases developers" in text


def test_wheel_carries_the_package_data(wheel: zipfile.ZipFile) -> None:
    names = set(wheel.namelist())
    assert "blobleases/py.typed" in names
    assert "blobleases/redis/scripts.lua" in names
    assert "blobleases/__init__.py" in names


def test_wheel_metadata_is_complete(wheel: zipfile.ZipFile) -> None:
    meta = _metadata(wheel)
    assert meta["Name"] == "blobleases"
    assert meta["License-Expression"] == "MIT"
    assert meta.get_all("License-File") == ["LICENSE"]
    classifiers = set(meta.get_all("Classifier") or [])
    for wanted in (
        "Programming Language :: Python :: 3.11",
        "Programming Language :: Python :: 3.12",
        "Programming Language :: Python :: 3.13",
        "Operating System :: POSIX :: Linux",
        "Typing :: Typed",
    ):
        assert wanted in classifiers, sorted(classifiers)
    assert any(c.startswith("Topic :: ") for c in classifiers)
    keywords = (meta["Keywords"] or "").split(",")
    assert "content-addressed" in keywords and "leases" in keywords
    urls = dict(u.split(", ", 1) for u in meta.get_all("Project-URL") or [])
    assert set(urls) >= {"Homepage", "Documentation", "Issues", "Changelog"}
    assert all(u.startswith("https://") for u in urls.values())
    assert meta["Requires-Python"] == ">=3.11"
    entry_points = [n for n in wheel.namelist() if n.endswith(".dist-info/entry_points.txt")]
    assert "blobleases = blobleases.cli:main" in wheel.read(entry_points[0]).decode()
