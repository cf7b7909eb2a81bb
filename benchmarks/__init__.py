"""blobleases benchmarks: ``python -m benchmarks`` (see :mod:`benchmarks.run`)."""

import importlib.util
import os
import sys

if importlib.util.find_spec("blobleases") is None:  # a fresh clone, not installed: use src/
    sys.path.insert(
        0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src")
    )
