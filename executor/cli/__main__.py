"""``python -m executor.cli``: the same as the ``sandbox-executor`` command."""

from __future__ import annotations

import sys

from executor.cli import main

sys.exit(main())
