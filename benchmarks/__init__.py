"""blobleases benchmarks: ``python -m benchmarks`` (see :mod:`benchmarks.run`)."""
