"""The one exception type that means "the user gave us something bad".

The CLI turns it into one line on stderr and exit status 2; anything else is
a bug (exit 1). Library code raises subclasses of it for bad input: a missing
file, a corrupt checkpoint, a wrong shape, an unknown option.
"""


class UserError(ValueError):
    pass


class RunFailed(RuntimeError):
    """A run that cannot go on (e.g. a non-finite loss): one clear line, exit status 1."""


class Terminated(KeyboardInterrupt):
    """SIGTERM (a scheduler's stop, `kill`, torchrun ending its workers), raised where Ctrl-C's
    KeyboardInterrupt would be, so a run stops the same tidy way: the CLI says so in one line and exits
    with status 143 (128 + SIGTERM), as a process killed by it would."""


# The signal stopping this process (SIGINT or SIGTERM), once the CLI's handler has seen it.
_STOPPED_BY: list[int] = []


def stopped_by_signal(e: BaseException) -> KeyboardInterrupt | None:
    """The stop that `e` really is, when a signal is stopping this process: Ctrl-C or a scheduler's
    SIGTERM reaches the data-loading workers too (they share the process group), and torch's child
    watcher may report their end ("DataLoader worker ... exited unexpectedly") before the main
    process's own handler runs. -> the KeyboardInterrupt (Terminated for SIGTERM) to raise instead,
    or None where `e` is not that."""
    import signal

    if not _STOPPED_BY or not isinstance(e, RuntimeError) or "DataLoader worker" not in str(e):
        return None
    return Terminated() if _STOPPED_BY[-1] == signal.SIGTERM else KeyboardInterrupt()


def raise_if_stopped() -> None:
    """Raise the stop a signal asked for, if one did and its exception was lost: Python runs a
    signal handler between any two bytecodes, and an exception it raises inside a weakref callback
    or a __del__ is printed as "Exception ignored" and dropped, so the run would train on. The
    loaders call this at every batch."""
    if _STOPPED_BY:
        import signal

        raise Terminated() if _STOPPED_BY[-1] == signal.SIGTERM else KeyboardInterrupt()


class VitlabWarning(UserWarning):
    """Something the user should hear about that does not stop the command (an unreadable image
    skipped): the CLI prints it as one line, `vitlab <command>: warning: ...`."""


def brief(e: BaseException | str, limit: int = 160) -> str:
    """A library's error message cut to fit in one line: its first line, its first sentence when the
    line is long, else cut at a word, never mid-word."""
    text = str(e).strip()
    line = text.splitlines()[0].strip() if text else type(e).__name__
    if len(line) <= limit:
        return line
    first = line.split(". ", 1)[0] + "."
    if 40 <= len(first) <= limit:  # a sentence long enough to say something ("(e.g." is not one)
        return first
    return line[:limit].rsplit(" ", 1)[0] + "..."
