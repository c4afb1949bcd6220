"""``python -m experiments`` is the same front door as ``python -m experiments.run``."""

from __future__ import annotations

import sys

from constrained_rl import interrupts

interrupts.install(hold=True)  # a Ctrl-C during the imports waits for main() to handle it

from experiments.run import main  # noqa: E402

sys.exit(main())
