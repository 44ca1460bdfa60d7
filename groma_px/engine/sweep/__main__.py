"""A trial's process, started by ``Sweep``: ``python -m groma_px.engine.sweep TRIAL_DIR``."""

import sys

from .trial import execute_trial

sys.exit(0 if execute_trial(sys.argv[1])["status"] == "ok" else 1)
