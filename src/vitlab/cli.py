"""`vitlab <command>`: one entry point, one meaning per flag.

Each command lives in its own module and exposes `add_arguments(parser)` and
`run(args) -> int`; this file only dispatches. Exit status: 0 success,
2 bad input or usage (one line on stderr), 1 anything else.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import sys

from .errors import RunFailed, Terminated, UserError, VitlabWarning, stopped_by_signal

# command -> (module, one-line help). Modules are imported only when used, so
# `vitlab models` does not pay for matplotlib or the data code.
COMMANDS: dict[str, tuple[str, str]] = {
    "models": ("vitlab.cli", "list the model presets with their parameter counts"),
    "demo": ("vitlab.demo", "train a small ViT briefly to check the install"),
    "visualize": ("vitlab.viz.command", "attention maps, rollout and per-head pictures of a trained ViT"),
    "export": ("vitlab.models.export", "save a ViT checkpoint in Hugging Face format (config + safetensors)"),
    "train": ("vitlab.train.command", "train a model from a preset and dotted overrides"),
    "finetune": ("vitlab.train.finetune", "fine-tune pretrained weights (ViT-B/16 on Flowers102 by default)"),
    "eval": ("vitlab.train.evaluate", "evaluate a run: top-1/top-5, per-class accuracy, confusion matrix"),
    "predict": ("vitlab.train.predict", "top-k classes for image files"),
    "bench": ("vitlab.bench", "throughput and MFU against Hugging Face and a textbook ViT (benchmarks/throughput.py)"),
    "ablate": ("vitlab.train.ablate", "run the seed's ablation ladder and write a table and a bar chart"),
}


class Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line and exit status 2, and a flag is taken only as spelt:
    argparse's prefix matching would read `visualize --data X` (it has no --data) as --data-dir X."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message):
        sys.stderr.write(f"{self.prog}: error: {message} (see {self.prog} --help)\n")
        sys.exit(2)


def add_arguments(p: argparse.ArgumentParser) -> None:  # for `vitlab models`
    p.add_argument("--family", choices=["vit", "resnet"], help="only this family")


def run(args) -> int:  # `vitlab models`
    import torch

    from .models import PRESETS, count_params, create_model

    print(f"{'name':34s} {'params':>14s}  {'input':>9s}  notes")
    for name, preset in PRESETS.items():
        if args.family and preset.family != args.family:
            continue
        with torch.device("meta"):  # count without allocating the 300M-parameter ones
            model = create_model(name)
        size = "x".join(map(str, model.img_size))
        chans = model.in_chans
        print(f"{name:34s} {count_params(model):>14,d}  {size:>7s}x{chans}  {preset.note}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    top = Parser(prog="vitlab", description="Vision Transformers: train, evaluate, visualise, fine-tune.")
    sub = top.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    for name, (_, help_) in COMMANDS.items():
        sub.add_parser(name, help=help_, add_help=False)
    if not argv:  # a usage error: the usage on stderr, as argparse does for a missing argument
        print(f"vitlab: error: name a command: {', '.join(COMMANDS)} (see vitlab --help)", file=sys.stderr)
        return 2
    if argv[0] in ("-h", "--help"):
        top.print_help()
        return 0
    if argv[0] in ("-V", "--version"):
        from . import __version__

        print(f"vitlab {__version__}")
        return 0
    command = argv[0]
    if command not in COMMANDS:
        import difflib

        close = difflib.get_close_matches(command, COMMANDS, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else f"; commands: {', '.join(COMMANDS)}"
        sys.stderr.write(f"vitlab: error: unknown command {command!r}{hint}\n")
        return 2
    from .utils import tune_allocator

    tune_allocator()  # before the command allocates its tensors (utils.tune_allocator says why)
    _one_line_warnings(f"vitlab {command}")
    try:
        with stop_signals():
            module = importlib.import_module(COMMANDS[command][0])
            parser = Parser(prog=f"vitlab {command}", description=COMMANDS[command][1])
            module.add_arguments(parser)
            if getattr(module, "ACCEPTS_OVERRIDES", False):
                # Config-driven commands take any config field as --section.key VALUE.
                args, extra = parser.parse_known_args(argv[1:])
                args.overrides = extra
            else:
                args = parser.parse_args(argv[1:])
            args.argv = argv[1:]  # as typed, for records that cite their command
            return int(module.run(args) or 0)
    except UserError as e:
        sys.stderr.write(f"vitlab {command}: error: {e}\n")
        return 2
    except RunFailed as e:
        sys.stderr.write(f"vitlab {command}: {e}\n")
        return 1
    except KeyboardInterrupt as e:  # Ctrl-C, or SIGTERM as Terminated (stop_signals)
        return _stopped(f"vitlab {command}", e)
    except BrokenPipeError:
        # `vitlab models | head`: the reader of our stdout has gone; stop quietly, as `ls | head` does.
        # A broken pipe elsewhere (a worker process) is a failure like any other.
        if not _stdout_reader_gone():
            raise
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # the exit's own flush goes nowhere
        return 1


def _stopped(prog: str, e: KeyboardInterrupt) -> int:
    """The line a stopped command ends with (said once, by torchrun's rank 0: the others stop quietly)."""
    import os

    if os.environ.get("RANK", "0") == "0":
        said = "terminated" if isinstance(e, Terminated) else "interrupted"
        sys.stderr.write(f"{prog}: {said}{f'; {e}' if str(e) else ''}\n")
    return 143 if isinstance(e, Terminated) else 130


@contextlib.contextmanager
def stop_signals():
    """While a command runs: SIGTERM raises Terminated (a KeyboardInterrupt), so a stopped run ends as
    after Ctrl-C: its loaders' workers stopped, no temporary file left, one line said. Both handlers
    record the signal, so that torch's report of the workers' end, which can come first, is read as
    the stop (errors.stopped_by_signal), and so that a stop Python dropped inside a weakref callback
    is raised again at the next batch (errors.raise_if_stopped) without its "Exception ignored"
    print. Handlers are installed only where the signal still has its default handling and in the
    main thread (a program embedding vitlab keeps its own), and all is put back afterwards. The
    decoding workers ignore both signals (data.files._ignore_stop_signals): this process stops them."""
    import signal
    import threading

    from .errors import _STOPPED_BY

    _STOPPED_BY.clear()
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_term(signum, frame):
        _STOPPED_BY.append(signum)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second SIGTERM kills at once
        raise Terminated()

    def on_int(signum, frame):
        _STOPPED_BY.append(signum)
        raise KeyboardInterrupt

    def unraisable(u):
        if isinstance(u.exc_value, KeyboardInterrupt) and _STOPPED_BY:
            return  # raised again at the next batch
        hook(u)

    before = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    hook = sys.unraisablehook
    if before[signal.SIGTERM] is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, on_term)
    if before[signal.SIGINT] is signal.default_int_handler:
        signal.signal(signal.SIGINT, on_int)
    sys.unraisablehook = unraisable
    try:
        yield
    except RuntimeError as e:
        stop = stopped_by_signal(e)
        if stop is None:
            raise
        raise stop from None
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)
        sys.unraisablehook = hook
        _STOPPED_BY.clear()


def _stdout_reader_gone() -> bool:
    """Whether stdout is a pipe whose reader has closed it (poll reports an error on its write end)."""
    import select

    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        return any(ev & (select.POLLERR | select.POLLHUP) for _, ev in poller.poll(0))
    except (AttributeError, OSError, ValueError):  # no poll (Windows), no file descriptor: cannot tell
        return True


def _one_line_warnings(prog: str) -> None:
    """vitlab's own warnings (VitlabWarning) as one line each, `prog: warning: ...`, written so that a
    progress bar stays intact; other libraries' warnings keep Python's format."""
    import warnings

    default = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        if not issubclass(category, VitlabWarning):
            return default(message, category, filename, lineno, file, line)
        from tqdm import tqdm

        tqdm.write(f"{prog}: warning: {message}", file=sys.stderr)

    warnings.showwarning = show


def run_script(main_fn, name: str):
    """A benchmark script's entry point: exit with main_fn's status; bad input (a UserError: an
    unknown model or preset, a missing data directory) is one line on stderr and exit status 2; a run
    that cannot go on (RunFailed) one line and exit status 1; Ctrl-C or SIGTERM one line and 130 or 143,
    as for `vitlab` itself."""
    try:
        with stop_signals():
            status = main_fn()
        sys.exit(status)
    except UserError as e:
        sys.stderr.write(f"{name}: error: {e}\n")
        sys.exit(2)
    except RunFailed as e:
        sys.stderr.write(f"{name}: error: {e}\n")
        sys.exit(1)
    except KeyboardInterrupt as e:
        sys.exit(_stopped(name, e))


if __name__ == "__main__":
    sys.exit(main())
