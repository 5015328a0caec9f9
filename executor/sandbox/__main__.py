"""Entry point: ``python3 -m executor.sandbox --socket PATH --token-file PATH``."""

import sys

from executor.sandbox.runtime import main

sys.exit(main())
