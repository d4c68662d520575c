"""Real-data benchmark: a ViT from scratch on Fashion-MNIST, accuracy against wall-clock.

Trains the `fashion_mnist` preset (or another, --config) on the real idx files
and records the test accuracy at each evaluation (every run.eval_every epochs
and the last) against the training time so far (evaluation time excluded),
then writes a JSON record and a picture.
Once the clock has stopped, the final weights are scored once more with test-time
augmentation (--final-tta, default flip-shift: 10 views per image), recorded
beside the plain figure.

    python benchmarks/fashion_mnist.py --data-dir ../shared/data/fashion-mnist --seed 0
    python benchmarks/fashion_mnist.py --config fashion_mnist_60min --data-dir ... --seed 1

Anything after the known flags is passed to `vitlab train` as overrides.
"""

from __future__ import annotations

import json
import sys
import time
from datetime import date
from pathlib import Path


from vitlab.bench import machine
from vitlab.cli import Parser
from vitlab.config import build_config, parse_overrides
from vitlab.train.engine import train
from vitlab.utils import make_dir, tune_allocator, write_json


def main(argv=None) -> int:
    p = Parser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="fashion_mnist")
    p.add_argument("--data-dir", default="../shared/data/fashion-mnist")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--final-tta", choices=["none", "flip", "flip-shift"], default="flip-shift",
                   help="after training, score the final weights once more with this test-time augmentation")
    args, extra = p.parse_known_args(argv)
    make_dir(args.out)  # a bad --out is one line now, not after minutes of work
    tune_allocator()  # as every `vitlab` command does
    name = f"{args.config}-seed{args.seed}"
    overrides = parse_overrides(["--data-dir", args.data_dir, "--seed", str(args.seed), "--out", "runs/bench",
                                 "--run.name", f"{name}-{date.today():%Y%m%d}", *extra])
    cfg = build_config(args.config, overrides)
    run_dir = train(cfg)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train_min, curve = 0.0, []
    for r in rows:
        train_min += r["epoch_time"] / 60
        if "test_acc" in r:
            curve.append({"epoch": r["epoch"], "train_minutes": round(train_min, 2), "test_acc": r["test_acc"],
                          "train_acc": round(r["train_acc"], 2)})  # under augmentation, as trained
            if "test_acc_tta" in r:  # --run.tta: the same model scored with flip test-time augmentation
                curve[-1]["test_acc_tta"] = r["test_acc_tta"]
    record = {
        "benchmark": "fashion_mnist", "config": args.config, "seed": args.seed, "date": str(date.today()),
        "command": "python benchmarks/fashion_mnist.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "machine": machine(), "precision": precision_of(cfg),
        "final_test_acc": curve[-1]["test_acc"], "train_minutes": curve[-1]["train_minutes"],
        "wall_minutes": rows[-1]["wall_time"] / 60, "curve": curve, "run_dir": str(run_dir),
    }
    if "test_acc_tta" in curve[-1]:
        record["final_test_acc_tta"] = curve[-1]["test_acc_tta"]
    tta_key = f"final_test_acc_{args.final_tta.replace('-', '_')}"  # final_test_acc_flip_shift
    if args.final_tta != "none":
        t0 = time.time()
        record[tta_key] = score_final(run_dir, cfg, args.final_tta)
        record["final_tta_seconds"] = round(time.time() - t0, 1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / f"{name}.json", record)
    _plot(curve, out / f"{name}.png", record)
    tta = f" ({record['final_test_acc_tta']:.2f}% with flip TTA)" if "final_test_acc_tta" in record else ""
    if args.final_tta != "none":
        tta += f" ({record[tta_key]:.2f}% with {args.final_tta} TTA)"
    print(f"final test accuracy {record['final_test_acc']:.2f}%{tta} after {record['train_minutes']:.1f} min of training; "
          f"wrote {out / (name + '.json')}")
    return 0


def precision_of(cfg) -> str:
    """What the run trained in (auto picks bf16 only where it measures faster: the record must say)."""
    from vitlab.train.engine import resolve_device, resolve_precision

    return resolve_precision(cfg.run.precision, resolve_device(cfg.run.device))[1]


def score_final(run_dir: Path, cfg, tta: str) -> float:
    """Test accuracy of the run's final weights (last.ckpt, not the best-by-test model.safetensors,
    so no choice is made on the test set) with test-time augmentation, after the clock has stopped."""
    from vitlab.train import checkpoint as ckpt
    from vitlab.train.evaluate import score

    model, meta = ckpt.load_model(run_dir)  # the architecture; the weights are replaced by the final ones
    model.load_state_dict(ckpt.load_state(run_dir / ckpt.LAST)["model"])
    res, _, _ = score(model, meta, cfg.data, "test", device=cfg.run.device, precision=cfg.run.precision, tta=tta,
                      batch_size=500, compile=False)  # eager autocast, as the run's own evaluations
    return round(res["acc"], 2)


def _plot(curve, path, record):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.6))
    minutes = [c["train_minutes"] for c in curve]
    ax.plot(minutes, [c["test_acc"] for c in curve], marker="o", label="test accuracy")
    if "test_acc_tta" in curve[-1]:
        ax.plot(minutes, [c.get("test_acc_tta") for c in curve], marker=".", lw=1, alpha=0.7, label="with flip TTA")
    for key, name in (("final_test_acc_flip_shift", "flip-shift TTA"), ("final_test_acc_flip", "flip TTA")):
        if key in record:  # the final weights, scored after the clock stopped (--final-tta)
            ax.plot([minutes[-1]], [record[key]], marker="*", ms=11, ls="none", label=f"final, {name}")
    ax.axhline(93.0, color="gray", ls="--", lw=1, label="93.0% target")
    shown = [c["test_acc"] for c in curve] + [c["test_acc_tta"] for c in curve if "test_acc_tta" in c] + \
        [v for k, v in record.items() if k.startswith("final_test_acc_flip")]
    ax.set_ylim(top=max(93.5, max(shown) + 0.5))  # keep the target line and every point in view
    ax.set_xlabel("training time (min)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"Fashion-MNIST, {record['config']}, seed {record['seed']}")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    from vitlab.cli import run_script

    run_script(main, "fashion_mnist.py")
