"""The seed's ablation ladder on real data: `vitlab ablate`, recorded with its command, machine and date.

    python benchmarks/ablation.py --data-dir ../shared/data/fashion-mnist -- --model vit_mini_convstem_patch8_32 --epochs 5

Runs `vitlab ablate --data fashion-mnist --data-dir DIR [overrides after --]` (each rung a full training
run, rungs already finished are reused), then copies its ablation.md / .png / .json into
benchmarks/results/ablation-<data>/ with the record's provenance added to the JSON.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

from vitlab.bench import machine
from vitlab.cli import Parser
from vitlab.utils import make_dir, write_json


def main(argv=None) -> int:
    p = Parser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default="fashion-mnist")
    p.add_argument("--data-dir", default="../shared/data/fashion-mnist")
    p.add_argument("--runs", default="runs/ablation", help="where the rungs' run directories go")
    p.add_argument("--out", default=None, help="default: benchmarks/results/ablation-<data>")
    p.add_argument("overrides", nargs="*", help="`vitlab ablate` overrides, after --")
    args = p.parse_args(argv)
    # made now: a bad --out is one line before the hour of rungs, not after it
    out = make_dir(args.out or f"benchmarks/results/ablation-{args.data.replace(':', '-').replace('/', '_')}")
    cmd = [sys.executable, "-m", "vitlab", "ablate", "--data", args.data, "--data-dir", args.data_dir,
           "--out", args.runs, *args.overrides]
    print(" ".join(cmd), flush=True)
    t0 = time.time()
    r = subprocess.run(cmd)
    if r.returncode != 0:
        print(f"vitlab ablate failed with exit status {r.returncode}", file=sys.stderr)
        return r.returncode
    wrote = [d for d in Path(args.runs).glob("ablation-*") if (d / "ablation.json").is_file()]
    src = max(wrote, key=lambda d: (d / "ablation.json").stat().st_mtime)
    for name in ("ablation.md", "ablation.png"):
        shutil.copyfile(src / name, out / name)
    record = json.loads((src / "ablation.json").read_text())
    record.update(date=str(date.today()), machine=machine(), wall_minutes=round((time.time() - t0) / 60, 1),
                  command="python benchmarks/ablation.py " + " ".join(sys.argv[1:] if argv is None else argv))
    write_json(out / "ablation.json", record)
    print((out / "ablation.md").read_text())
    print(f"wrote {out}/ablation.md, ablation.png, ablation.json")
    return 0


if __name__ == "__main__":
    from vitlab.cli import run_script

    run_script(main, "ablation.py")
