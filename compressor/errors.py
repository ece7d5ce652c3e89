"""The one exception type that means "the user asked for something we cannot do".

The CLI turns it into a single line on stderr and exit status 2; anything else is a bug
and is allowed to show a traceback.
"""


class UserError(Exception):
    """A mistake in the user's input (a path, a spec, a budget, a name): say what and what to do."""
