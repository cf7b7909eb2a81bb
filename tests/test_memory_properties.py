"""Random operation sequences on MemoryStorage agree with the model."""

from __future__ import annotations

import subprocess
import sys

from hypothesis import HealthCheck, settings

from blobleases import MemoryStorage
from blobleases.testing import storage_state_machine

_CHILD = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(3600)"])

MemoryMachine = storage_state_machine(MemoryStorage, _CHILD.pid)
MemoryMachine.TestCase.settings = settings(
    max_examples=60,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestMemoryMachine = MemoryMachine.TestCase


def teardown_module() -> None:
    _CHILD.kill()
    _CHILD.wait()
