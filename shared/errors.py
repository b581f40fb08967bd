"""The one error type for user mistakes (bad file, column, config value, budget).

The CLI prints its message on one line, without a traceback, and exits 2.
"""


class UserError(Exception):
    """A mistake in the user's input: the message names the input and the fix."""
