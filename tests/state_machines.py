"""The scaffolding of the ``test_*_properties`` modules: each runs
:func:`blobleases.testing.storage_state_machine` on one backend (or one
configuration of it) with its own number of examples."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from hypothesis import HealthCheck, settings

from blobleases.storage import BlobStorage
from blobleases.testing import storage_state_machine


def machine_test_case(
    name: str,
    make_storage: Callable[[], BlobStorage],
    foreign_pid: int,
    *,
    max_examples: int,
    steps: int,
) -> type[Any]:
    """The unittest TestCase of ``storage_state_machine(make_storage,
    foreign_pid)``: ``max_examples`` random runs of up to ``steps`` steps,
    with no deadline (a step may wait on a loaded machine).

    ``name`` names the machine's class. Hypothesis keys a machine's saved
    examples by the source of its class, or by its name when the class has
    no source (as this one, made here): a name per backend keeps each
    backend's examples apart."""
    base = storage_state_machine(make_storage, foreign_pid)
    machine = type(name, (base,), {"__module__": __name__, "__qualname__": name})
    case: type[Any] = machine.TestCase
    case.settings = settings(
        max_examples=max_examples,
        stateful_step_count=steps,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow],
    )
    return case
