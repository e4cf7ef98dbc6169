"""The one exception type a user of sidp can cause and should read."""


class SidpError(Exception):
    """A problem the user can fix: the message says what happened and what to do."""
