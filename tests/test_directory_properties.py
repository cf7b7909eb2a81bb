"""Random operation sequences on DirectoryStorage agree with the model."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile

from hypothesis import HealthCheck, settings

from blobleases import DirectoryStorage
from blobleases.testing import storage_state_machine

_CHILD = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(3600)"])
_ROOT = tempfile.mkdtemp(prefix="blobleases-props-")
_COUNTER = iter(range(1_000_000))


def _fresh_store() -> DirectoryStorage:
    return DirectoryStorage(f"{_ROOT}/store-{next(_COUNTER)}")


DirectoryMachine = storage_state_machine(_fresh_store, _CHILD.pid)
DirectoryMachine.TestCase.settings = settings(
    max_examples=40,
    stateful_step_count=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestDirectoryMachine = DirectoryMachine.TestCase


def teardown_module() -> None:
    _CHILD.kill()
    _CHILD.wait()
    shutil.rmtree(_ROOT, ignore_errors=True)
