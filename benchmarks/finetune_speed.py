"""How long does `vitlab finetune` of a ViT-B/16 on Flowers102 take? (time only)

Neither the real Flowers102 images nor the pretrained weights can be downloaded
where this project is developed, so this times the whole command on stand-ins
of the real shape: 8,189 JPEGs of Flowers102's typical size (500 px on the long
side, varied aspect) in the official layout (jpg/, imagelabels.mat, setid.mat;
1,020 train / 1,020 val / 6,149 test), and a randomly initialised Hugging Face
ViT-B/16 directory in place of google/vit-base-patch16-224. JPEG decoding,
resizing, augmentation, the training steps, validation, checkpoints and the
final test pass are all real; the accuracy is meaningless and not reported.

    python benchmarks/finetune_speed.py --epochs 3 --out benchmarks/results/finetune_speed   # one H200: ~3 min
    python benchmarks/finetune_speed.py --scale 0.05 --epochs 1 --out /tmp/ft                 # a CPU smoke run

Writes finetune_speed.json: the start-up ("ready in N s"), seconds per epoch
(metrics.jsonl), the test pass (test.json), the whole command's wall time, and
the machine.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from datetime import date
from pathlib import Path

import numpy as np

from vitlab.cli import Parser
from vitlab.utils import make_dir, write_json

SPLITS = {"trnid": 1020, "valid": 1020, "tstid": 6149}  # Flowers102's official split sizes
CLASSES = 102


def _write_jpegs(args) -> None:
    from PIL import Image

    d, first, last = args
    rng = np.random.default_rng(first)
    for i in range(first, last):
        short = int(rng.integers(300, 500))
        h, w = (500, short) if i % 3 else (short, 500)
        # smooth colour fields with a little noise: about the file size and decode cost of a photo
        base = rng.integers(0, 256, (h // 25 + 1, w // 25 + 1, 3), dtype=np.uint8)
        img = Image.fromarray(base).resize((w, h), Image.BILINEAR)
        noise = rng.integers(-12, 13, (h, w, 3))
        a = np.clip(np.asarray(img, dtype=np.int16) + noise, 0, 255).astype(np.uint8)
        Image.fromarray(a).save(d / f"image_{i:05d}.jpg", quality=90)


def write_flowers_like(root: Path, scale: float) -> dict:
    import scipy.io as sio

    sizes = {k: max(CLASSES // 34, round(v * scale)) for k, v in SPLITS.items()}
    n = sum(sizes.values())
    d = root / "flowers-102"
    if d.exists():
        raise SystemExit(f"{d} already exists: give --work an empty or new directory")
    (d / "jpg").mkdir(parents=True)
    chunks = [(d / "jpg", a, min(a + 200, n + 1)) for a in range(1, n + 1, 200)]
    with ProcessPoolExecutor(max_workers=os.cpu_count()) as pool:
        list(pool.map(_write_jpegs, chunks))
    labels = (np.arange(n) % CLASSES + 1).astype(np.float64)[None]  # 1-based (1, N), as in the real file
    sio.savemat(d / "imagelabels.mat", {"labels": labels})
    ids = np.random.default_rng(0).permutation(np.arange(1, n + 1))
    a, b = sizes["trnid"], sizes["trnid"] + sizes["valid"]
    sio.savemat(d / "setid.mat", {"trnid": np.sort(ids[:a])[None].astype(np.uint16),
                                  "valid": np.sort(ids[a:b])[None].astype(np.uint16),
                                  "tstid": np.sort(ids[b:])[None].astype(np.uint16)}, do_compression=True)
    return sizes


def write_vit_b16(d: Path) -> None:
    """A Hugging Face ViT-B/16 directory (config, weights, preprocessor) with random weights."""
    import torch
    import transformers

    torch.manual_seed(0)
    model = transformers.ViTForImageClassification(transformers.ViTConfig(num_labels=1000))
    model.save_pretrained(d)
    (d / "preprocessor_config.json").write_text(json.dumps({"image_mean": [0.5] * 3, "image_std": [0.5] * 3}))


def main(argv=None) -> int:
    p = Parser(description=__doc__.split("\n\n")[0])
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--scale", type=float, default=1.0, help="fraction of Flowers102's split sizes")
    p.add_argument("--out", default="benchmarks/results/finetune_speed")
    p.add_argument("--work", default=None, help="where the stand-in data and run go (default: a temporary dir)")
    p.add_argument("extra", nargs="*", help="more `vitlab finetune` overrides, after --")
    args = p.parse_args(argv)
    make_dir(args.out)  # a bad --out is one line now, not after minutes of work
    with tempfile.TemporaryDirectory() as t:
        work = Path(args.work or t)
        t0 = time.time()
        sizes = write_flowers_like(work / "data", args.scale)
        write_vit_b16(work / "vit-b16")
        setup = time.time() - t0
        print(f"stand-ins written in {setup:.0f} s: {sizes}", flush=True)
        cmd = [sys.executable, "-m", "vitlab", "finetune", "--pretrained", str(work / "vit-b16"), "--data", "flowers102",
               "--data-dir", str(work / "data"), "--epochs", str(args.epochs), "--out", str(work / "runs"),
               "--run.name", "ft", *args.extra]
        print(" ".join(cmd), flush=True)
        t0 = time.time()
        r = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
        wall = time.time() - t0
        print(r.stdout, end="")
        ready = re.search(r"^ready in (\d+) s", r.stdout, re.M)  # the engine's start-up, as it logs it
        if r.returncode != 0:
            print(f"vitlab finetune failed with exit status {r.returncode}", file=sys.stderr)
            return 1
        rows = [json.loads(line) for line in (work / "runs" / "ft" / "metrics.jsonl").read_text().splitlines()]
        test = json.loads((work / "runs" / "ft" / "test.json").read_text())
        cfg = (work / "runs" / "ft" / "config.yaml").read_text()
    import torch

    dev = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU, {torch.get_num_threads()} threads"
    res = dict(date=str(date.today()), machine=f"{dev}, {os.cpu_count()} CPU cores, torch {torch.__version__}",
               command="python benchmarks/finetune_speed.py " + " ".join(argv if argv is not None else sys.argv[1:]),
               splits=sizes, epochs=args.epochs, setup_s=setup, wall_s=wall,
               epoch_train_s=[r["epoch_time"] for r in rows], train_images_per_s=[r["images_per_s"] for r in rows],
               epoch_wall_s=[b["wall_time"] - a["wall_time"] for a, b in zip(rows, rows[1:])],
               ready_s=int(ready.group(1)) if ready else None, first_epoch_wall_s=rows[0]["wall_time"],
               test_images=test["n"], test_pass_s=test.get("seconds"),
               batch_size=next((int(line.split(":")[1]) for line in cfg.splitlines()
                                if line.strip().startswith("batch_size:")), None))
    write_json(Path(args.out) / "finetune_speed.json", res)
    print(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    from vitlab.cli import run_script

    run_script(main, "finetune_speed.py")
