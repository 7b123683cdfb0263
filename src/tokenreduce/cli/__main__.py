"""``python -m tokenreduce.cli ...`` (e.g. under torchrun)."""

import sys

from . import main

sys.exit(main())
