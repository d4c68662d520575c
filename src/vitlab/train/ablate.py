"""`vitlab ablate`: the seed project's ablation ladder, run for real.

Each rung adds one ingredient to the previous one, all else equal:
SGD baseline -> +AdamW -> +warmup/cosine -> +label smoothing -> +Mixup -> +DropPath (= all).
Writes ablation.md (a table with each rung's gain) and ablation.png (a bar chart).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..config import (TrainConfig, all_keys, apply_debug, build_config, from_dict, get_key, load_yaml,
                      parse_overrides, set_key, to_dict)
from ..errors import UserError
from ..utils import atomic_write, atomic_write_text, make_dir

ACCEPTS_OVERRIDES = True

EPILOG = """\
Every training flag and the preset set the base all rungs share (--data, --data-dir, --epochs,
--batch-size, --seed, --model, ...), except for the ladder's own keys: the optimizer and schedule
it compares, and its ingredients' strengths, which it sets (a preset's values for them are
replaced, and the run says which). A flag for an ingredient (--lr, --weight-decay,
--warmup-epochs, --label-smoothing, --mixup-alpha, --cutmix-alpha, --drop-path) sets its strength
from the rung that switches it on; the rungs before run the baseline's own (SGD at lr 0.05, weight
decay 5e-4, constant lr, no warmup, smoothing, Mixup, CutMix or DropPath). Rungs already
finished in the output folder are reused and a half-done one resumes, so an interrupted ladder
picks up where it stopped; a rung run with other settings is refused.
Examples:
  vitlab ablate --debug                                             # a quick pass through every rung (2 epochs each)
  vitlab ablate --data fashion-mnist --data-dir ../shared/data/fashion-mnist --epochs 10
  vitlab ablate --config shapes --rungs 3 --print-config            # what each rung would run
"""

# Settings that change where a rung is written, how fast it runs or what else it records, not the
# accuracy the table reports (the plain weights' final score): a finished rung is reused whatever they are.
NOT_RESULTS = {"run.out", "run.name", "run.threads", "run.log_every", "run.tensorboard", "run.device",
               "run.stop_after", "data.dir", "data.num_workers", "data.download", "run.compile", "run.ema",
               "run.ema_decay", "run.tta", "run.eval_every"}

# (label, settings added at this rung). Rung 0 switches every ingredient off.
LADDER: list[tuple[str, dict]] = [
    ("Baseline (SGD)", {"optim.name": "sgd", "optim.lr": 0.05, "sched.name": "constant", "sched.warmup_epochs": 0,
                        "optim.label_smoothing": 0.0, "aug.mixup_alpha": 0.0, "aug.cutmix_alpha": 0.0,
                        "model.drop_path_rate": 0.0, "optim.weight_decay": 5e-4}),
    ("+ AdamW", {"optim.name": "adamw", "optim.lr": 3e-4, "optim.weight_decay": 0.05}),
    ("+ Cosine + warmup", {"sched.name": "cosine", "sched.warmup_epochs": 5}),
    ("+ Label smoothing", {"optim.label_smoothing": 0.1}),
    ("+ Mixup", {"aug.mixup_alpha": 0.2}),
    ("+ DropPath (all combined)", {"model.drop_path_rate": 0.1}),
]


def add_arguments(p):
    p.description = __doc__.splitlines()[0]
    p.add_argument("--config", metavar="PRESET_OR_FILE",
                   help="base preset (the ladder sets its own optimizer, schedule and ingredients; see below)")
    p.add_argument("--rungs", type=int, default=len(LADDER), help="run only the first N rungs")
    p.add_argument("--print-config", action="store_true",
                   help="print each rung's resolved config (YAML, one document per rung) and exit")
    p.epilog = EPILOG
    p.formatter_class = argparse.RawDescriptionHelpFormatter


def run(args) -> int:
    from tqdm.auto import tqdm

    from ..data import build_data
    from ..models import get_preset
    from .engine import train

    if not 1 <= args.rungs <= len(LADDER):
        raise UserError(f"--rungs must be 1 to {len(LADDER)} (the ladder's length), got {args.rungs}")
    overrides = parse_overrides(args.overrides)
    base = build_config(args.config, overrides)
    out = Path(base.run.out) / f"ablation-{base.model.name}-{base.data.name.replace(':', '-').replace('/', '_')}"
    rungs = rung_configs(args.config, overrides, args.rungs, out)
    replaced = preset_values_replaced(base, overrides)
    if replaced and not args.print_config:
        tqdm.write(f"note: the ladder replaces the preset's {', '.join(replaced)} with its own (a value given "
                   f"as a flag is used from the rung that switches it on)")
    if args.print_config:
        import yaml

        for k, (label, cfg) in enumerate(rungs):
            print(f"--- # rung {k}: {label}")
            print(yaml.safe_dump(to_dict(cfg), sort_keys=False), end="")
        return 0
    # the model's name and the data (its name, files, folders) before any folder is made or rung printed;
    # a ladder whose rungs are all done only rewrites its report, wherever the data is now
    if not base.model.pretrained:
        get_preset(base.model.name)
    n_train = None  # the training images the rungs see (data.subset may ask for more than the split has)
    if not all(_finished(out / cfg.run.name, cfg.run.epochs) for _, cfg in rungs):
        debug = from_dict(to_dict(base))
        apply_debug(debug)  # --debug's cap, as the rungs run
        n_train = len(build_data(debug.data).train.labels)
    for _, cfg in rungs:  # all before the first trains: a mismatch in rung 5 must not wait hours
        if (out / cfg.run.name / "last.ckpt").is_file():  # (without it the rung starts afresh)
            check_same_rung(out / cfg.run.name, cfg)
    make_dir(out)
    rows = []
    for k, (label, cfg) in enumerate(rungs):
        run_dir = out / cfg.run.name
        if _finished(run_dir, cfg.run.epochs):
            tqdm.write(f"[{k}] {label}: already done, reusing {run_dir}")
        else:
            tqdm.write(f"[{k}] {label}")
            train(cfg, resume=str(run_dir) if (run_dir / "last.ckpt").is_file() else None,
                  go_on="the same vitlab ablate command (finished rungs are reused, this one resumes)")
        last = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()][-1]
        acc_key = "val_acc" if "val_acc" in last else "test_acc"
        rows.append({"rung": label, "acc": last[acc_key], "minutes": last["wall_time"] / 60, "split": acc_key[:-4],
                     "settings": {key: get_key(cfg, key) for key in LADDER[0][1]}})  # as this rung ran them
    _write_report(rows, out, base, n_train)
    print(f"wrote {out / 'ablation.md'}, {out / 'ablation.png'} and {out / 'ablation.json'}")
    return 0


# The rung that switches each ingredient on: a user's value for its keys (--lr, --label-smoothing,
# --mixup-alpha ...) is that ingredient's strength, used from there on; the rungs before keep it off,
# so no rung's gain includes another ingredient. CutMix has no rung of its own: it joins Mixup's.
SWITCHED_ON = {key: k for k in reversed(range(1, len(LADDER))) for key in LADDER[k][1]}
SWITCHED_ON["aug.cutmix_alpha"] = SWITCHED_ON["aug.mixup_alpha"]
CHOSEN_BY_LADDER = ("optim.name", "sched.name")  # the ladder's own comparison: SGD vs AdamW, constant vs cosine


def rung_configs(config: str | None, overrides: dict, n: int, out: Path) -> list[tuple[str, object]]:
    """The first `n` rungs' full configs: the base (preset + the user's flags), then the ladder's
    settings so far, a user's value for an ingredient replacing the ladder's once it is switched on."""
    for key in CHOSEN_BY_LADDER:
        if key in overrides:
            raise UserError(f"--{key} is what the ladder compares (sgd -> adamw, constant -> cosine), so "
                            f"ablate sets it; train one setting alone with vitlab train")
    settings: dict = {}
    rungs = []
    for k, (label, delta) in enumerate(LADDER[:n]):
        settings.update(delta)
        cfg = build_config(config, overrides)
        for key, value in settings.items():
            if key in overrides and k >= SWITCHED_ON[key]:
                continue
            set_key(cfg, key, value)
        if cfg.sched.warmup_epochs > cfg.run.epochs / 3:
            set_key(cfg, "sched.warmup_epochs", cfg.run.epochs / 3)
        cfg.run.out = str(out)
        cfg.run.name = f"rung{k}"
        rungs.append((label, cfg))
    return rungs


def preset_values_replaced(base, overrides: dict) -> list[str]:
    """The ladder's keys the preset set to something other than the defaults, and no flag repeats:
    'key value' each. A preset's 0 for Mixup or DropPath would empty that ingredient's rung, so the
    ladder's values stand unless the user asks for another on the command line."""
    default = TrainConfig()
    return [f"{key} {get_key(base, key)!r}" for key in LADDER[0][1]
            if key not in overrides and get_key(base, key) != get_key(default, key)]


def check_same_rung(run_dir: Path, cfg) -> None:
    """A rung already in the output folder counts only if it ran with these settings: reusing one
    trained with others would put its accuracy under this ladder's label."""
    try:
        saved = from_dict(load_yaml(run_dir / "config.yaml"))
    except UserError as e:  # unreadable, or another vitlab version's keys
        raise UserError(f"{run_dir} cannot be reused ({e}); use another --out, or delete that rung's "
                        f"folder to run it again") from None
    cfg = from_dict(to_dict(cfg))  # as the engine saves it: a debug run's subset capped
    apply_debug(cfg)
    differ = [key for key in all_keys(cfg) if key not in NOT_RESULTS and get_key(saved, key) != get_key(cfg, key)]
    if differ:
        what = (f"{differ[0]} {get_key(saved, differ[0])!r} there, {get_key(cfg, differ[0])!r} now"
                + (f", and {len(differ) - 1} more" if len(differ) > 1 else ""))
        raise UserError(f"{run_dir} was run with other settings ({what}); use another --out, or delete "
                        f"that rung's folder to run it again")


def _finished(run_dir: Path, epochs: int) -> bool:
    return (run_dir / "metrics.jsonl").is_file() and (run_dir / "last.ckpt").is_file() and _done(run_dir, epochs)


def _done(run_dir: Path, epochs: int) -> bool:
    """All its epochs, or as many as its time limit allowed (resuming would add one past the limit),
    as its last.ckpt holds them: metrics.jsonl is written first, so a save cut short leaves it an
    epoch ahead."""
    from .command import _saved_progress

    done, clock = _saved_progress(run_dir)
    return done >= epochs or clock


def _write_report(rows: list[dict], out: Path, base, n_train: int | None = None) -> None:
    """ablation.md, .json and .png. n_train: the training images counted when the data was loaded; None
    when every rung was done already, and the count comes from the report before (or the subset asked)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    base = from_dict(to_dict(base))
    apply_debug(base)  # --debug's cap on the training images, as the rungs ran
    if n_train is None:
        try:
            n_train = json.loads((out / "ablation.json").read_text()).get("train_images")
        except (OSError, ValueError, AttributeError):
            n_train = None
    if n_train is not None:
        subset = f" ({n_train:,} training images)"
    else:
        subset = f" (data.subset {base.data.subset:,})" if base.data.subset else ""
    epochs = f"{base.run.epochs} epoch{'s' if base.run.epochs != 1 else ''}"
    lines = [f"Ablation ladder: {base.model.name} on {base.data.name}{subset}, {epochs}, "
             f"batch {base.run.batch_size}, seed {base.run.seed} (final-epoch {rows[0]['split']} accuracy)", "",
             "| rung | accuracy (%) | change (points) | time (min) |", "|---|---:|---:|---:|"]
    prev = None
    for r in rows:
        delta = "" if prev is None else f"{r['acc'] - prev:+.2f}"
        lines.append(f"| {r['rung']} | {r['acc']:.2f} | {delta} | {r['minutes']:.1f} |")
        prev = r["acc"]
    atomic_write_text(out / "ablation.md", "\n".join(lines) + "\n")
    atomic_write_text(out / "ablation.json", json.dumps({
        "model": base.model.name, "data": base.data.name, "subset": base.data.subset, "train_images": n_train,
        "epochs": base.run.epochs,
        "batch_size": base.run.batch_size,
        "seed": base.run.seed, "rungs": rows},
        indent=1) + "\n")
    fig, ax = plt.subplots(figsize=(9, 3.8))
    accs = [r["acc"] for r in rows]
    bars = ax.bar(range(len(rows)), accs, color=["#999"] + ["#3b7dd8"] * (len(rows) - 1))
    for b, a in zip(bars, accs):
        ax.text(b.get_x() + b.get_width() / 2, a, f"{a:.1f}", ha="center", va="bottom", fontsize=9)
    ax.set_xticks(range(len(rows)), [r["rung"] for r in rows], rotation=20, ha="right", fontsize=8)
    lo = min(accs)
    ax.set_ylim(max(0, lo - 10), min(100, max(accs) + 3))
    ax.set_ylabel(f"{rows[0]['split']} accuracy (%)")
    ax.set_title(f"Ablation ladder: {base.model.name} on {base.data.name}")
    fig.tight_layout()
    atomic_write(out / "ablation.png", lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)
