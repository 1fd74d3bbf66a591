"""The one base class of errors a user can fix (a config key, a file, a flag, a workdir).

Every CLI reports a `UserError` as one line and exits 2, without a traceback; anything
else is a bug in flaxgpt and keeps its traceback.
"""


class UserError(ValueError):
    """Something the user can fix; its message names the file, line or key and what is expected."""
