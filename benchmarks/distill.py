"""Distillation benchmark: a CNN teacher, then ViT students with none / soft / hard distillation.

On real Fashion-MNIST, at one budget for every student:
  1. trains the teacher: ResNet-18 (CIFAR stem) for --teacher-epochs;
  2. trains the same distilled student (a [CLS] and a [DIST] token, two heads) three
     times, for --epochs each: distill.kind none (both heads learn the labels), soft
     (the [DIST] head matches the teacher's softened distribution) and hard (the
     [DIST] head learns the teacher's argmax, DeiT's choice);
  3. writes distill.json, distill.md (the README table) and distill.png.

    python benchmarks/distill.py --data-dir ../shared/data/fashion-mnist
    python benchmarks/distill.py --teacher-epochs 1 --epochs 2 --subset 2000     # a quick look
    python benchmarks/distill.py --subset 0                                       # all 60,000 images (hours)

Runs that already finished are reused (delete benchmarks/runs/distill to start over).
"""

from __future__ import annotations

import json
import sys
from datetime import date
from pathlib import Path


from vitlab.bench import machine
from vitlab.cli import Parser
from vitlab.config import build_config, parse_overrides
from vitlab.train.engine import train
from vitlab.utils import atomic_write_text, make_dir, tune_allocator, write_json


def finished(run: Path, epochs: int) -> bool:
    m = run / "metrics.jsonl"
    return m.is_file() and len(m.read_text().splitlines()) >= epochs and (run / "model.safetensors").is_file()


def last_metrics(run: Path) -> dict:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {**rows[-1], "minutes": rows[-1]["wall_time"] / 60, "train_minutes": sum(r["epoch_time"] for r in rows) / 60}


def main(argv=None) -> int:
    p = Parser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", default="../shared/data/fashion-mnist")
    p.add_argument("--teacher", default="resnet18_cifar")
    p.add_argument("--student", default="deit_mini_distilled_patch7_28")
    p.add_argument("--teacher-epochs", type=int, default=3)
    p.add_argument("--epochs", type=int, default=5, help="epochs for every student (the shared budget)")
    # A ResNet-18 trains at about 75 images/s on the 2-core dev CPU and its forward pass (the teacher's
    # cost in every student step) runs at about 260: a 10,000-image subset keeps the benchmark near 20 minutes.
    p.add_argument("--subset", type=int, default=10000, help="train on this many images (0: all 60,000)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--runs", default="benchmarks/runs/distill")
    p.add_argument("--out", default="benchmarks/results")
    args = p.parse_args(argv)
    make_dir(args.out)  # a bad --out is one line now, not after minutes of work
    tune_allocator()  # as every `vitlab` command does
    runs = Path(args.runs)
    # Every run starts from the plain-ViT Fashion-MNIST preset (configs/fashion_mnist_plain.yaml) with these changes.
    # Budgets here are epochs, not the preset's 15-minute clock: every student gets the same number of updates.
    common = ["--data-dir", args.data_dir, "--seed", str(args.seed), "--out", str(runs),
              "--sched.by_time", "false", "--run.time_limit", "none", "--sched.warmup_epochs", "0.5"]
    if args.subset:
        common += ["--data.subset", str(args.subset)]
    else:
        args.subset = None

    def run(name: str, extra: list[str], epochs: int) -> Path:
        d = runs / name
        if finished(d, epochs):
            print(f"{name}: already finished, reusing {d}")
            return d
        cfg = build_config("fashion_mnist_plain", parse_overrides(common + ["--epochs", str(epochs), "--run.name", name]
                                                             + extra))
        return train(cfg, resume=str(d) if (d / "last.ckpt").is_file() else None)

    # The teacher: a CNN trained with the same preset (AdamW, light augmentation) as the students.
    teacher = run("teacher", ["--model", args.teacher], args.teacher_epochs)
    rows = [{"model": f"teacher: {args.teacher}", "kind": "-", **_pick(last_metrics(teacher))}]
    for kind in ("none", "soft", "hard"):
        extra = ["--model", args.student, "--distill.kind", kind]
        if kind != "none":
            extra += ["--distill.teacher", str(teacher)]
        d = run(f"student-{kind}", extra, args.epochs)
        rows.append({"model": f"student: {args.student}", "kind": kind, **_pick(last_metrics(d))})

    record = {"benchmark": "distill", "date": str(date.today()), "seed": args.seed,
              "command": "python benchmarks/distill.py " + " ".join(sys.argv[1:] if argv is None else argv),
              "machine": machine(),
              "teacher_epochs": args.teacher_epochs, "student_epochs": args.epochs, "subset": args.subset,
              "rows": rows}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "distill.json", record)
    md = _markdown(record)
    atomic_write_text(out / "distill.md", md + "\n")
    _plot(record, out / "distill.png")
    print(md)
    print(f"wrote {out / 'distill.json'}, {out / 'distill.md'}, {out / 'distill.png'}")
    return 0


def _pick(m: dict) -> dict:
    keep = {"test_acc": m.get("test_acc"), "minutes": round(m["minutes"], 2),
            "train_minutes": round(m["train_minutes"], 2), "epochs": m["epoch"]}
    for k in ("test_acc_cls_head", "test_acc_dist_head"):
        if k in m:
            keep[k] = m[k]
    return keep


def _markdown(r: dict) -> str:
    budget = f" on {r['subset']} training images" if r["subset"] else ""
    lines = [f"Fashion-MNIST test accuracy; teacher {r['teacher_epochs']} epochs, each student {r['student_epochs']} "
             f"epochs{budget}; seed {r['seed']}; {r['date']}, {r['machine']}",
             "", "| model | distillation | test acc (%) | [CLS] head | [DIST] head | time (min) |",
             "|---|---|---:|---:|---:|---:|"]
    for row in r["rows"]:
        cls = f"{row['test_acc_cls_head']:.2f}" if "test_acc_cls_head" in row else ""
        dst = f"{row['test_acc_dist_head']:.2f}" if "test_acc_dist_head" in row else ""
        lines.append(f"| {row['model']} | {row['kind']} | {row['test_acc']:.2f} | {cls} | {dst} | {row['minutes']:.1f} |")
    return "\n".join(lines)


def _plot(r: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.6))
    labels = ["teacher"] + [f"student\n{row['kind']}" for row in r["rows"][1:]]
    accs = [row["test_acc"] for row in r["rows"]]
    bars = ax.bar(labels, accs, color=["#888"] + ["#3b7dd8"] * (len(accs) - 1))
    for b, a in zip(bars, accs):
        ax.text(b.get_x() + b.get_width() / 2, a, f"{a:.2f}", ha="center", va="bottom", fontsize=9)
    ax.set_ylim(max(0, min(accs) - 5), min(100, max(accs) + 2))
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"Distillation on Fashion-MNIST ({r['student_epochs']} student epochs)")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    from vitlab.cli import run_script

    run_script(main, "distill.py")
