"""``python -m reckpt.cli`` (what torchrun runs: ``torchrun ... -m reckpt.cli train``)."""

import sys

from reckpt.cli import main

sys.exit(main())
