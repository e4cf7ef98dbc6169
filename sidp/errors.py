"""The one exception type a user of sidp can cause and should read."""


class SidpError(Exception):
    """A problem the user can fix: the message says what happened and what to do."""


class DoesNotFit(SidpError):
    """The memory budget is too small for the model or for the requests (a benchmark sweep goes on)."""
