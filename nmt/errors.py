"""The one exception type the command line turns into a one-line message.

Library code raises `NmtError` for every problem a user can fix (bad input, bad
option, unreadable file); anything else is a bug and keeps its traceback.
"""


class NmtError(Exception):
    """A user-facing error: its message alone must say what is wrong."""
