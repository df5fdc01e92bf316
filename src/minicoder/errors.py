"""One exception type for problems the user can fix (bad paths, bad files, bad settings).

The CLI prints these as a single `error: ...` line and exits with status 2; anything else is a bug
and keeps its traceback.
"""


class MinicoderError(Exception):
    """A user-facing error: the message names what is wrong and which file or setting."""
