"""Random operation sequences on DirectoryStorage agree with the model."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile

from blobleases import DirectoryStorage
from state_machines import machine_test_case

_CHILD = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(3600)"])
_ROOT = tempfile.mkdtemp(prefix="blobleases-props-")
_COUNTER = iter(range(1_000_000))


def _fresh_store() -> DirectoryStorage:
    return DirectoryStorage(f"{_ROOT}/store-{next(_COUNTER)}")


TestDirectoryMachine = machine_test_case(
    "DirectoryMachine", _fresh_store, _CHILD.pid, max_examples=40, steps=30
)


def teardown_module() -> None:
    _CHILD.kill()
    _CHILD.wait()
    shutil.rmtree(_ROOT, ignore_errors=True)
