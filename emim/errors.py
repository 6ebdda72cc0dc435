"""The errors a user can fix, as opposed to bugs.

Every module raises its own kind (``ConfigError``, ``DatasetError``, ``CheckpointError``,
``ExportError``, ``WorkdirBusy``), each a ``UserError`` whose message names the fix; the
programs' command lines (``emim.cli``) print a ``UserError`` as one line and exit, and
keep the traceback of anything else. The base class lives here, apart from the modules
and from the command line, so that neither imports the other. Nothing here imports JAX.
"""


class UserError(Exception):
  """An error whose message names the fix (a missing dataset, a wrong flag value, a busy
  work directory, an unreadable checkpoint, ...)."""
