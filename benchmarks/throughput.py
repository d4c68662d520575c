"""Throughput benchmark: vitlab vs Hugging Face ViT vs a textbook ViT, fp32 and bf16, train and inference.

The implementation lives in `vitlab.bench` so the installed command `vitlab bench`
runs the same code; this script is the entry point the README cites.

    python benchmarks/throughput.py                  # the comparison table (ViT-Tiny, CIFAR config, batch 128)
    python benchmarks/throughput.py --all            # + scaling plot, memory, full-loop check
    python benchmarks/throughput.py --markdown       # the README table from runs/bench/throughput.json (--out)
"""

import sys

from vitlab.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
