"""What a notebook needs to watch emim work: its log (the progress lines, evaluations)
printed live in the cell, without Orbax's I/O chatter.

    import emim.notebook
    emim.notebook.show_logs()
"""

from __future__ import annotations

import logging
import sys


def show_logs(level: int = logging.INFO) -> None:
  """Send emim's log at ``level`` and above to the cell's output, as it is written.

  The programs get this from absl's app.run; in a notebook nothing sets it up, and
  Python's default shows only warnings.
  """
  from absl import logging as absl_logging

  from emim.checkpoint import _OrbaxInfoFilter

  absl_logging.set_verbosity(absl_logging.INFO if level <= logging.INFO else absl_logging.WARNING)
  root = logging.getLogger()
  root.setLevel(level)
  for handler in list(root.handlers):
    # Ours from an earlier call, absl's (stderr), a basicConfig's: each would print every
    # line again, Orbax's chatter included. Files stay.
    if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
      root.removeHandler(handler)
  handler = logging.StreamHandler(sys.stdout)  # stdout: the cell shows it live
  handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
  handler.addFilter(_OrbaxInfoFilter())
  root.addHandler(handler)
