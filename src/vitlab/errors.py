"""The one exception type that means "the user gave us something bad".

The CLI turns it into one line on stderr and exit status 2; anything else is
a bug (exit 1). Library code raises subclasses of it for bad input: a missing
file, a corrupt checkpoint, a wrong shape, an unknown option.
"""


class UserError(ValueError):
    pass


class RunFailed(RuntimeError):
    """A run that cannot go on (e.g. a non-finite loss): one clear line, exit status 1."""
