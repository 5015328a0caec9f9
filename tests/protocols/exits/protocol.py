"""Test protocol: leave without a result, as crashing code does."""

import os
import sys


def run(ctx):
    sys.stderr.write("about to vanish\n")
    sys.stderr.flush()
    os._exit(3)
