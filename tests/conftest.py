"""Test-session settings shared by every test module."""

import os

# As in stages/common.py: idle OpenMP threads sleep rather than spin, so tests and the stage
# processes they start do not slow each other down by orders of magnitude on 2 cores.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
