"""``python -m tokenreduce`` (and ``torchrun -m tokenreduce``): the ``tokenreduce`` command."""

import sys

from tokenreduce.cli import main

sys.exit(main())
