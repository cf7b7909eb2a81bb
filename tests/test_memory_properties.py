"""Random operation sequences on MemoryStorage agree with the model."""

from __future__ import annotations

import subprocess
import sys

from blobleases import MemoryStorage
from state_machines import machine_test_case

_CHILD = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(3600)"])

TestMemoryMachine = machine_test_case(
    "MemoryMachine", MemoryStorage, _CHILD.pid, max_examples=60, steps=40
)


def teardown_module() -> None:
    _CHILD.kill()
    _CHILD.wait()
