"""``python -m benchmarks``: run every row and print the table."""

import sys

from benchmarks.run import main

sys.exit(main())
