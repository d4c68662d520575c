"""`vitlab ablate`: the seed project's ablation ladder, run for real.

Each rung adds one ingredient to the previous one, all else equal:
SGD baseline -> +AdamW -> +warmup/cosine -> +label smoothing -> +Mixup -> +DropPath (= all).
Writes ablation.md (a table with each rung's gain) and ablation.png (a bar chart).
"""

from __future__ import annotations

import json
from pathlib import Path

from ..config import build_config, parse_overrides, set_key
from ..errors import UserError
from ..utils import atomic_write, atomic_write_text, make_dir

ACCEPTS_OVERRIDES = True

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
    p.add_argument("--config", metavar="PRESET_OR_FILE", help="base preset; the ladder overrides the rest")
    p.add_argument("--rungs", type=int, default=len(LADDER), help="run only the first N rungs")


def run(args) -> int:
    from tqdm.auto import tqdm

    from .engine import train

    if not 1 <= args.rungs <= len(LADDER):
        raise UserError(f"--rungs must be 1 to {len(LADDER)} (the ladder's length), got {args.rungs}")
    overrides = parse_overrides(args.overrides)
    base = build_config(args.config, overrides)
    out = Path(base.run.out) / f"ablation-{base.model.name}-{base.data.name.replace(':', '-').replace('/', '_')}"
    make_dir(out)
    settings: dict = {}
    rows = []
    for k, (label, delta) in enumerate(LADDER[: args.rungs]):
        settings.update(delta)
        cfg = build_config(args.config, overrides)
        for key, value in settings.items():
            if key in overrides and k > 0 and key not in delta:
                continue  # the user's explicit choice wins except where this rung is about that key
            set_key(cfg, key, value)
        if cfg.sched.warmup_epochs > cfg.run.epochs / 3:
            set_key(cfg, "sched.warmup_epochs", cfg.run.epochs / 3)
        cfg.run.out = str(out)
        cfg.run.name = f"rung{k}"
        run_dir = out / cfg.run.name
        if (run_dir / "metrics.jsonl").is_file() and (run_dir / "last.ckpt").is_file() and _done(run_dir, cfg.run.epochs):
            tqdm.write(f"[{k}] {label}: already done, reusing {run_dir}")
        else:
            tqdm.write(f"[{k}] {label}")
            train(cfg, resume=str(run_dir) if (run_dir / "last.ckpt").is_file() else None)
        last = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()][-1]
        acc_key = "val_acc" if "val_acc" in last else "test_acc"
        rows.append({"rung": label, "acc": last[acc_key], "minutes": last["wall_time"] / 60, "split": acc_key[:-4],
                     "settings": dict(settings)})  # the ladder's settings at this rung, before the user's overrides
    _write_report(rows, out, base)
    print(f"wrote {out / 'ablation.md'} and {out / 'ablation.png'}")
    return 0


def _done(run_dir: Path, epochs: int) -> bool:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return len(lines) >= epochs


def _write_report(rows: list[dict], out: Path, base) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines = [f"Ablation ladder: {base.model.name} on {base.data.name}, {base.run.epochs} epochs, "
             f"batch {base.run.batch_size}, seed {base.run.seed} (final-epoch {rows[0]['split']} accuracy)", "",
             "| rung | accuracy (%) | change (points) | time (min) |", "|---|---:|---:|---:|"]
    prev = None
    for r in rows:
        delta = "" if prev is None else f"{r['acc'] - prev:+.2f}"
        lines.append(f"| {r['rung']} | {r['acc']:.2f} | {delta} | {r['minutes']:.1f} |")
        prev = r["acc"]
    atomic_write_text(out / "ablation.md", "\n".join(lines) + "\n")
    atomic_write_text(out / "ablation.json", json.dumps({
        "model": base.model.name, "data": base.data.name, "epochs": base.run.epochs, "batch_size": base.run.batch_size,
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
