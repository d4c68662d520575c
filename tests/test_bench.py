"""The throughput benchmark's arithmetic and plumbing (its timings live in benchmarks/, not here)."""

import json

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from vitlab.bench import TextbookViT, arch_of, build, vit_flops
from vitlab.cli import main as cli_main
from vitlab.models import VisionTransformer


@pytest.mark.parametrize("preset", ["vit_tiny_patch4_32", "vit_tiny", "vit_base_patch16_224"])
def test_flop_formula_matches_torch_flop_counter(preset):
    a = arch_of(preset)
    with torch.device("meta"):
        model = VisionTransformer(**a)
        x = torch.empty(1, a["in_chans"], a["img_size"], a["img_size"])
        with FlopCounterMode(display=False) as fwd:
            model(x)
    assert vit_flops(a, training=False) == pytest.approx(fwd.get_total_flops(), rel=1e-9)


def test_textbook_and_hf_peers_are_the_same_network():
    a = arch_of("vit_mini_patch4_32")
    n = sum(p.numel() for p in VisionTransformer(**a).parameters())
    assert sum(p.numel() for p in TextbookViT(**a).parameters()) == n
    pytest.importorskip("transformers")
    hf = build("hf", a)
    n_hf = sum(p.numel() for name, p in hf.named_parameters() if "pooler" not in name)
    assert n_hf == n


def test_bench_command_writes_its_table(tmp_path, capsys):
    rc = cli_main(["bench", "--model", "vit_mini_patch4_32", "--batch-size", "4", "--steps", "1", "--warmup", "0",
                   "--impl", "vitlab", "--impl", "textbook", "--out", str(tmp_path)])
    assert rc == 0
    res = json.loads((tmp_path / "throughput.json").read_text())["compare"]
    assert {(r["impl"], r["precision"]) for r in res["rows"]} == {
        (i, p) for i in ("vitlab", "textbook") for p in ("fp32", "bf16")} | {("vitlab compiled", res["default_precision"])}
    default = next(r for r in res["rows"] if r["impl"] == "vitlab compiled")
    assert res["default_train"] == default["train"]
    assert all(r["train"] > 0 and 0 < r["train_mfu"] for r in res["rows"])
    assert "train_vs_textbook_bf16" in res["ratios"]
    out = capsys.readouterr().out
    assert "| vitlab" in out and "MFU" in out
    assert cli_main(["bench", "--markdown", "--out", str(tmp_path)]) == 0
    assert "| textbook | bf16 |" in capsys.readouterr().out


def test_bench_rejects_a_resnet_or_unknown_model_in_one_line_before_any_output(capsys):
    assert cli_main(["bench", "--model", "resnet18_cifar", "--steps", "1"]) == 2
    cap = capsys.readouterr()
    assert "resnet" in cap.err and len(cap.err.strip().splitlines()) == 1 and cap.out == ""
    assert cli_main(["bench", "--model", "vit_mini_patch4_3", "--steps", "1"]) == 2
    cap = capsys.readouterr()
    assert "did you mean 'vit_mini_patch4_32'" in cap.err and len(cap.err.strip().splitlines()) == 1
    assert cap.out == ""
