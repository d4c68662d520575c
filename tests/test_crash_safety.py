"""Nothing lost or mixed when a command is stopped: one run per folder, a full disk said in one line,
sets of files (pictures, an export) replaced whole, SIGTERM handled like Ctrl-C, the final test
step of a run finished on --resume."""

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from vitlab import cli
from vitlab.config import build_config, parse_overrides
from vitlab.errors import RunFailed, UserError
from vitlab.models import create_model
from vitlab.train.checkpoint import save_model, save_state
from vitlab.utils import RunLock, atomic_write, atomic_write_text, staged

FAST = ["--model", "vit_mini_patch4_32", "--data", "shapes", "--data.subset", "256", "--batch-size", "64",
        "--run.precision", "fp32", "--sched.warmup_epochs", "0.5"]


def one_line(text: str) -> str:
    lines = text.strip().splitlines()
    assert len(lines) == 1, text
    return lines[0]


# -- files: whole or not at all -------------------------------------------------------------------

@pytest.mark.parametrize("failure, reason", [
    (OSError(errno.ENOSPC, "No space left on device"), "No space left on device"),
    (RuntimeError("[enforce fail at inline_container.cc:778] . PytorchStreamWriter failed writing file data/0: "
                  "file write failed"), "file write failed"),
])
def test_a_full_disk_is_one_line_and_keeps_the_previous_file(tmp_path, failure, reason):
    path = tmp_path / "last.ckpt"

    def half_then_fail(tmp):
        Path(tmp).write_bytes(b"half a checkpoint")
        raise failure

    with pytest.raises(RunFailed, match=f"cannot write .*last.ckpt: .*{reason}.*; nothing was written"):
        atomic_write(path, half_then_fail)
    atomic_write_text(path, "epoch 1")
    with pytest.raises(RunFailed, match="the previous copy is kept"):
        atomic_write(path, half_then_fail)
    assert path.read_text() == "epoch 1" and [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]


def test_a_writer_bug_is_not_reported_as_the_disk(tmp_path):
    def bug(tmp):
        raise ValueError("a bug in the writer")

    with pytest.raises(ValueError, match="a bug in the writer"):
        atomic_write(tmp_path / "x.json", bug)
    assert not list(tmp_path.iterdir())


def test_a_full_disk_mid_training_is_one_line_and_exit_1(tmp_path, monkeypatch, capsys):
    real = torch.save

    def full(obj, f, *a, **k):
        if str(f).endswith(".tmp") and ".last.ckpt." in str(f):
            Path(f).write_bytes(b"PK\x03\x04 cut short")
            raise RuntimeError("PytorchStreamWriter failed writing file data/3: file write failed")
        return real(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", full)
    rc = cli.main(["train", *FAST, "--epochs", "1", "--out", str(tmp_path), "--run.name", "full"])
    err = capsys.readouterr().err
    assert rc == 1, err
    assert one_line(err).startswith(f"vitlab train: cannot write {tmp_path / 'full' / 'last.ckpt'}: ")
    assert not (tmp_path / "full" / "last.ckpt").exists()
    assert not [p for p in (tmp_path / "full").iterdir() if p.name.endswith(".tmp")]


def test_staged_files_replace_the_old_set_only_when_all_are_written(tmp_path):
    out = tmp_path / "out"
    with staged(out) as stage:
        for name in ("a", "b", "c"):
            atomic_write_text(stage / name, "old " + name)
    assert sorted(p.name for p in out.iterdir()) == ["a", "b", "c"]
    with pytest.raises(KeyboardInterrupt):
        with staged(out) as stage:
            atomic_write_text(stage / "a", "new a")
            atomic_write_text(stage / "b", "new b")
            raise KeyboardInterrupt
    assert {p.name: p.read_text() for p in out.iterdir()} == {"a": "old a", "b": "old b", "c": "old c"}
    with staged(out) as stage:
        atomic_write_text(stage / "a", "new a")
    assert {p.name: p.read_text() for p in out.iterdir()} == {"a": "new a", "b": "old b", "c": "old c"}


def test_a_killed_writers_staging_folder_is_swept_and_a_live_ones_kept(tmp_path):
    import fcntl

    out = tmp_path / "out"
    dead, live, fresh = out / ".staging.dead", out / ".staging.live", out / ".staging.fresh"
    for d in (dead, live, fresh):
        d.mkdir(parents=True)
        (d / "model.safetensors").write_bytes(b"x" * 1000)
    (dead / ".held").touch()  # its writer was SIGKILLed: the lock went with it
    holder = open(live / ".held", "a+")  # a writer still at work
    fcntl.flock(holder, fcntl.LOCK_EX | fcntl.LOCK_NB)
    # `fresh` has no lock file yet: its writer may be about to take it

    def age(d, seconds):
        t = time.time() - seconds
        os.utime(d, (t, t))

    with staged(out) as stage:  # all three under a minute old: none is swept (a writer may be between
        atomic_write_text(stage / "a", "a")  # making its folder and locking it)
    assert sorted(p.name for p in out.iterdir()) == [".staging.dead", ".staging.fresh", ".staging.live", "a"]
    for d in (dead, live, fresh):
        age(d, 120)
    with staged(out):
        pass
    assert sorted(p.name for p in out.iterdir()) == [".staging.fresh", ".staging.live", "a"]
    holder.close()  # its writer gone
    age(fresh, 2 * 3600)  # no lock file two hours on: abandoned
    with staged(out):
        pass
    assert sorted(p.name for p in out.iterdir()) == ["a"]


def test_an_interrupted_picture_save_leaves_no_empty_png(tmp_path, monkeypatch):
    import matplotlib.pyplot as plt

    from vitlab.viz import plots

    fig = plt.figure()

    def cut(path, **kw):
        Path(path).write_bytes(b"")
        raise KeyboardInterrupt

    monkeypatch.setattr(fig, "savefig", cut)
    with pytest.raises(KeyboardInterrupt):
        plots.save(fig, tmp_path / "a.png")
    assert not list(tmp_path.iterdir())
    assert not plt.fignum_exists(fig.number)  # freed all the same


def vit_file(tmp_path, seed):
    torch.manual_seed(seed)
    model = create_model("vit_tiny_patch4_32", embed_dim=32, depth=2, num_heads=2, mlp_dim=64, num_classes=6)
    from vitlab.data import SHAPES_CLASSES

    run = tmp_path / f"run{seed}"
    save_model(run / "model.safetensors", model, {"classes": list(SHAPES_CLASSES), "mean": [0.5] * 3,
                                                  "std": [0.25] * 3, "config": {"data": {"name": "shapes"}}})
    return run


def test_an_interrupted_visualize_leaves_the_earlier_pictures_as_they_were(tmp_path, monkeypatch, capsys):
    from vitlab.viz import plots

    out = tmp_path / "pics"
    assert cli.main(["visualize", "--checkpoint", str(vit_file(tmp_path, 0)), "--samples", "3", "--out", str(out)]) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert len(before) == 10
    real, calls = plots.plot_layers, []

    def stop_at_the_second(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(plots, "plot_layers", stop_at_the_second)
    assert cli.main(["visualize", "--checkpoint", str(vit_file(tmp_path, 1)), "--samples", "2", "--out", str(out)]) == 130
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # no staging folder left, nothing replaced


def test_an_interrupted_export_force_leaves_the_earlier_export_whole(tmp_path, monkeypatch, capsys):
    from vitlab.models import export

    out = tmp_path / "hf"
    assert cli.main(["export", "--checkpoint", str(vit_file(tmp_path, 0)), "--out", str(out)]) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert sorted(before) == ["config.json", "model.safetensors", "preprocessor_config.json"]

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(export, "preprocessor_config", interrupted)  # the last of the three files
    assert cli.main(["export", "--checkpoint", str(vit_file(tmp_path, 1)), "--out", str(out), "--force"]) == 130
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


# -- one run per folder ---------------------------------------------------------------------------

def test_a_second_process_in_a_run_folder_is_refused_and_stale_temporaries_cleaned(tmp_path):
    from vitlab.train import engine

    run = tmp_path / "same"
    run.mkdir()
    held = RunLock(run)  # another process training there (a lock taken through a second open file)
    assert (run / ".lock").read_text() == str(os.getpid())
    cfg = build_config(None, parse_overrides([*FAST, "--epochs", "1", "--out", str(tmp_path), "--run.name", "same"]))
    with pytest.raises(UserError, match=rf"another vitlab process \(pid {os.getpid()}\) is training in .*same; "
                                        r"wait for it to end, or write to another folder \(--run.name, --out\)"):
        engine.train(cfg)
    assert sorted(p.name for p in run.iterdir()) == [".lock"]  # the refused run wrote nothing
    held.close()
    (run / ".last.ckpt.x1y2.tmp").write_bytes(b"what SIGKILL left mid-save")
    (run / ".eval.json.a1b2.tmp").write_bytes(b"vitlab eval, writing here now")  # not the run's to remove
    engine.train(cfg)
    assert (run / "last.ckpt").is_file() and [p.name for p in run.glob(".*.tmp")] == [".eval.json.a1b2.tmp"]
    with pytest.raises(UserError, match="already holds a run"):  # the lock was released with the run
        engine.train(cfg)


def test_the_lock_ends_with_its_process_not_with_a_forked_worker(tmp_path):
    """A run's data-loading workers are forked after it takes the lock: they must not hold it, or a
    killed run would block its own --resume until each worker noticed."""
    held = RunLock(tmp_path)
    ready_r, ready_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # a worker: alive well after its parent lets go
        os.write(ready_w, b"1")
        time.sleep(5)
        os._exit(0)
    try:
        os.read(ready_r, 1)
        held.close()  # (as when the run's process dies)
        RunLock(tmp_path).close()  # not refused
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)


def test_a_file_system_without_locks_warns_and_runs(tmp_path, monkeypatch):
    import fcntl

    from vitlab.errors import VitlabWarning

    def no_locks(f, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    with pytest.warns(VitlabWarning, match="refuses file locks \\(No locks available\\); nothing stops a second run"):
        lock = RunLock(tmp_path)
    lock.close()


def test_sigterm_stops_a_run_in_one_line_and_a_second_run_in_its_folder_is_refused(tmp_path):
    common = [*FAST, "--data.subset", "2048", "--epochs", "50", "--out", str(tmp_path), "--run.name", "t"]
    proc = subprocess.Popen([sys.executable, "-m", "vitlab.cli", "train", *common],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    last = tmp_path / "t" / "last.ckpt"
    t0 = time.time()
    while not last.exists() and proc.poll() is None and time.time() - t0 < 300:
        time.sleep(0.05)
    assert proc.poll() is None, proc.stderr.read()[-2000:]
    second = subprocess.run([sys.executable, "-m", "vitlab.cli", "train", *common], capture_output=True, text=True)
    assert second.returncode == 2
    assert "another vitlab process" in one_line(second.stderr) and f"(pid {proc.pid})" in second.stderr
    proc.send_signal(signal.SIGTERM)
    err = proc.communicate(timeout=120)[1]
    assert proc.returncode == 143, err[-2000:]
    last_line = err.strip().splitlines()[-1]
    assert last_line == (f"vitlab train: terminated; every finished epoch is saved; continue with "
                         f"vitlab train --resume {tmp_path / 't'}")
    assert "Traceback" not in err
    assert not list((tmp_path / "t").glob(".*.tmp"))


# -- the final step, finished on resume -------------------------------------------------------------

def test_a_run_stopped_during_its_final_test_step_finishes_it_on_resume(tmp_path, monkeypatch, capsys):
    from vitlab.train import checkpoint, engine

    args = [*FAST, "--data.val_fraction", "0.25", "--epochs", "2", "--out", str(tmp_path)]
    engine.train(build_config(None, parse_overrides([*args, "--run.name", "whole"])))
    whole = json.loads((tmp_path / "whole" / "test.json").read_text())

    real = checkpoint.load_model
    monkeypatch.setattr(checkpoint, "load_model", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt, match=f"continue with vitlab train --resume {tmp_path / 'cut'}$"):
        engine.train(build_config(None, parse_overrides([*args, "--run.name", "cut"])))
    assert not (tmp_path / "cut" / "test.json").exists()
    monkeypatch.setattr(checkpoint, "load_model", real)
    capsys.readouterr()
    assert cli.main(["train", "--resume", str(tmp_path / "cut")]) == 0
    out = capsys.readouterr().out
    assert "the run trained all its epochs (2); what a stop cut short is its final step: scoring the best " \
           "weights on the test split" in out and "test accuracy of the best-by-val" in out
    cut = json.loads((tmp_path / "cut" / "test.json").read_text())
    assert {k: cut[k] for k in ("acc", "top5", "loss", "n")} == {k: whole[k] for k in ("acc", "top5", "loss", "n")}
    assert len((tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()) == 2  # no epoch added
    # finished now: a resume is refused again, in one line
    assert cli.main(["train", "--resume", str(tmp_path / "cut")]) == 2
    assert "has finished 2 epochs of 2" in one_line(capsys.readouterr().err)
    # trained further and stopped in that final step: the earlier test score, of weights model.safetensors
    # may no longer hold, is not kept, and the resume finishes the new final step
    monkeypatch.setattr(checkpoint, "load_model", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt()))
    assert cli.main(["train", "--resume", str(tmp_path / "cut"), "--epochs", "3"]) == 130
    assert not (tmp_path / "cut" / "test.json").exists()
    monkeypatch.setattr(checkpoint, "load_model", real)
    capsys.readouterr()
    assert cli.main(["train", "--resume", str(tmp_path / "cut")]) == 0
    assert "trained all its epochs (3)" in capsys.readouterr().out and (tmp_path / "cut" / "test.json").is_file()


def test_a_lower_epochs_does_not_turn_a_paused_run_into_a_finished_one(tmp_path, capsys):
    from vitlab.train import engine

    args = [*FAST, "--data.val_fraction", "0.25", "--epochs", "2", "--out", str(tmp_path), "--run.name", "p"]
    engine.train(build_config(None, parse_overrides([*args, "--run.stop_after", "1"])))
    assert not (tmp_path / "p" / "test.json").exists()
    capsys.readouterr()
    assert cli.main(["train", "--resume", str(tmp_path / "p"), "--epochs", "1"]) == 2
    assert "has finished 1 epochs of 1" in one_line(capsys.readouterr().err)


def test_ablate_counts_a_rung_done_by_its_saved_state_not_its_metrics(tmp_path):
    from vitlab.train.ablate import _finished

    run = tmp_path / "rung"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"epoch": 1}\n{"epoch": 2}\n')  # written before a save cut short
    save_state(run / "last.ckpt", {"epoch": 1, "history": [{"epoch": 1}]})
    assert not _finished(run, 2)
    save_state(run / "last.ckpt", {"epoch": 2, "history": [{"epoch": 1}, {"epoch": 2}]})
    assert _finished(run, 2)
    save_state(run / "last.ckpt", {"epoch": 1, "history": [{"epoch": 1, "stopped": "time_limit"}]})
    assert _finished(run, 2)  # as far as its time limit allowed


@pytest.mark.parametrize("signum, word, status", [(signal.SIGINT, "interrupted", 130), (signal.SIGTERM, "terminated", 143)])
def test_a_benchmark_script_stopped_by_a_signal_says_so_in_one_line(capsys, signum, word, status):
    """benchmarks/*.py end through run_script: Ctrl-C or SIGTERM there is one line too, not a traceback."""
    from vitlab.errors import _STOPPED_BY

    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}

    def work():
        os.kill(os.getpid(), signum)
        time.sleep(5)  # the signal arrives here
        return 0

    def workers_ended_first():  # torch's child watcher, reporting the workers' end before our handler ran
        _STOPPED_BY.append(signum)
        raise RuntimeError("DataLoader worker (pid(s) 123, 124) exited unexpectedly")

    try:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        for fn in (work, workers_ended_first):
            with pytest.raises(SystemExit) as stop:
                cli.run_script(fn, "some_benchmark.py")
            assert stop.value.code == status
            assert one_line(capsys.readouterr().err) == f"some_benchmark.py: {word}"
            # and all put back: no stop left recorded, the default handlers again
            assert not _STOPPED_BY and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
            assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
        def workers_ended():
            raise RuntimeError("DataLoader worker (pid(s) 123) exited unexpectedly")

        with pytest.raises(RuntimeError, match="exited unexpectedly"):  # without a signal it is what it says
            cli.run_script(workers_ended, "x.py")
    finally:
        _STOPPED_BY.clear()
        for s, h in before.items():
            signal.signal(s, h)


def test_a_stop_lost_in_a_weakref_callback_is_raised_at_the_next_batch_and_not_printed(capsys):
    """Python runs a signal handler between any two bytecodes; one that lands in a weakref callback
    (a plot being garbage-collected) has its KeyboardInterrupt printed and dropped. The loaders raise
    it again at their next batch, and the CLI's hook keeps the dropped one quiet."""
    import gc
    import weakref

    from vitlab.data.base import TensorSplit
    from vitlab.data.loader import make_loader
    from vitlab.errors import _STOPPED_BY, Terminated

    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    hook = sys.unraisablehook
    try:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        stops = cli.stop_signals()
        stops.__enter__()

        class Plot:
            pass

        def handler_lands_here(ref):  # what the signal handler does inside the callback
            _STOPPED_BY.append(signal.SIGTERM)
            raise Terminated()

        p = Plot()
        keep = weakref.ref(p, handler_lands_here)
        del p
        gc.collect()
        assert keep() is None and _STOPPED_BY == [signal.SIGTERM]
        assert capsys.readouterr().err == ""  # not "Exception ignored in ..."
        split = TensorSplit(torch.zeros(8, 1, 4, 4, dtype=torch.uint8), torch.zeros(8, dtype=torch.long))
        loader = make_loader(split, 4, train=False, seed=0)
        with pytest.raises(Terminated):
            next(iter(loader))
        _STOPPED_BY.clear()
        assert len(list(loader)) == 2  # no signal: the batches come
        stops.__exit__(None, None, None)
        # all put back as it was: a program that runs a command in-process keeps its own handling
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler and sys.unraisablehook is hook
    finally:
        _STOPPED_BY.clear()
        sys.unraisablehook = hook
        for s, h in before.items():
            signal.signal(s, h)


@pytest.mark.parametrize("signum, word, status", [(signal.SIGINT, "interrupted", 130), (signal.SIGTERM, "terminated", 143)])
def test_a_signal_to_the_whole_process_group_with_decoding_workers_is_one_line(tmp_path, signum, word, status):
    """Ctrl-C in a terminal (and many schedulers' SIGTERM) reaches the decoding workers too: they
    leave the stop to the main process, which says it in one line, whenever the signal lands."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in ("cat", "dog"):
        (tmp_path / "imgs" / c).mkdir(parents=True)
        for i in range(96):
            Image.fromarray(rng.integers(0, 255, (36, 36, 3), dtype=np.uint8)).save(tmp_path / "imgs" / c / f"{i}.png")
    cmd = [sys.executable, "-m", "vitlab.cli", "train", "--model", "vit_mini_patch4_32", "--data",
           f"imagefolder:{tmp_path / 'imgs'}", "--data.val_fraction", "0.2", "--epochs", "200", "--batch-size", "16",
           "--out", str(tmp_path), "--data.num_workers", "2", "--run.precision", "fp32"]
    for k, delay in enumerate((0.0, 0.35, 0.7)):  # into an epoch's batches, its evaluation, its save and plot
        proc = subprocess.Popen([*cmd, "--run.name", f"r{k}"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                text=True, start_new_session=True)
        t0 = time.time()
        while not (tmp_path / f"r{k}" / "last.ckpt").exists() and proc.poll() is None and time.time() - t0 < 300:
            time.sleep(0.02)
        time.sleep(delay)
        assert proc.poll() is None, proc.stderr.read()[-2000:]
        os.killpg(proc.pid, signum)
        err = proc.communicate(timeout=120)[1]
        assert proc.returncode == status, err[-3000:]
        assert one_line(err) == (f"vitlab train: {word}; every finished epoch is saved; continue with "
                                 f"vitlab train --resume {tmp_path / f'r{k}'}")


def test_a_decoding_worker_is_quiet_when_the_main_process_hangs_up_on_its_resource_sharer():
    """The race behind a stop's stray traceback, made certain: a worker hands each batch's shared
    memory over multiprocessing's resource-sharer thread; when the main process, stopping, hangs up
    mid-handover the thread meets a broken pipe and reports it through sys.excepthook (not
    threading.excepthook). A worker set up by the loader's worker_init_fn stays quiet about a
    hang-up, and still prints any other error."""
    script = r"""
import sys
import threading
from multiprocessing import process, resource_sharer
from multiprocessing.connection import Client
from vitlab.data.files import _ignore_stop_signals

if sys.argv[1] == "worker":
    _ignore_stop_signals(0)
sharer = resource_sharer._resource_sharer

def handover(send):
    address, key = sharer.register(send, lambda: None)
    with Client(address, authkey=process.current_process().authkey) as c:
        c.send((key, 0))

def failing(error):
    def send(conn, pid):
        raise error
    return send

handover(failing(BrokenPipeError(32, "Broken pipe")))
handover(failing(ConnectionResetError(104, "Connection reset by peer")))
handover(failing(ValueError("a real bug")))
# the thread serves one handover at a time: once it reaches this one, it has reported the others
done = threading.Event()
handover(lambda conn, pid: done.set())
assert done.wait(30)
"""
    runs = {}
    for mode in ("worker", "plain"):
        proc = subprocess.run([sys.executable, "-c", script, mode], capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr[-2000:]
        runs[mode] = proc.stderr
    # without the worker's hooks all three print (the test would otherwise pass for any reason)
    assert "BrokenPipeError" in runs["plain"] and "ConnectionResetError" in runs["plain"], runs["plain"]
    assert "BrokenPipeError" not in runs["worker"] and "ConnectionResetError" not in runs["worker"], runs["worker"]
    assert "ValueError: a real bug" in runs["worker"], runs["worker"]
