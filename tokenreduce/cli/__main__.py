"""``python -m tokenreduce.cli``: the ``tokenreduce`` command."""

import sys

from tokenreduce.cli import main

sys.exit(main())
