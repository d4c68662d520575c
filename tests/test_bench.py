"""The throughput benchmark's arithmetic and plumbing (its timings live in benchmarks/, not here)."""

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from vitlab.bench import TextbookViT, arch_of, build, vit_flops
from vitlab.cli import main as cli_main
from vitlab.models import VisionTransformer


@pytest.mark.parametrize("prefix_only", [True, False])
@pytest.mark.parametrize("preset", ["vit_tiny_patch4_32", "vit_tiny", "vit_base_patch16_224"])
def test_flop_formula_matches_torch_flop_counter(preset, prefix_only):
    a = arch_of(preset)
    with torch.device("meta"):
        model = VisionTransformer(**a)
        model.prefix_only_last_block = prefix_only
        x = torch.empty(1, a["in_chans"], a["img_size"], a["img_size"])
        with FlopCounterMode(display=False) as fwd:
            model(x)
    assert vit_flops(a, training=False, prefix_only=prefix_only) == pytest.approx(fwd.get_total_flops(), rel=1e-9)
    # the last block for [CLS] alone saves most of one block in depth: ViT-Tiny/CIFAR's is 13.8%
    saved = 1 - vit_flops(a, False, prefix_only=True) / vit_flops(a, False)
    assert 0.7 / a["depth"] < saved < 1 / a["depth"]


class _Products(TorchDispatchMode):
    """Records each matmul a piece of code runs: (op, [(shape, innermost-stride-1?) per operand])."""

    OPS = {torch.ops.aten.mm.default: "mm", torch.ops.aten.addmm.default: "mm", torch.ops.aten.bmm.default: "bmm"}

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in self.OPS:  # addmm's bias is left out: mm and addmm are the same product
            mats = args[1:] if func is torch.ops.aten.addmm.default else args
            self.seen.append((self.OPS[func], tuple((tuple(m.shape), m.stride(-1) == 1) for m in mats)))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("preset", ["vit_mini_patch4_32", "vit_tiny"])
def test_matmuls_alone_replay_a_real_steps_products_layouts_included(preset):
    """The "matmuls alone" units replay what a real training step multiplies: product for product
    the same operand shapes and row- or column-major layouts, and all the step's matmul FLOPs
    (everything but the patch projection, a convolution)."""
    from collections import Counter

    from vitlab.bench import _matmul_alone_steps

    a = arch_of(preset)
    torch.manual_seed(1)
    model = VisionTransformer(**a)
    x = torch.randn(2, a["in_chans"], a["img_size"], a["img_size"])
    y = torch.randint(0, a["num_classes"], (2,))
    with _Products() as real:
        F.cross_entropy(model(x), y).backward()
    train, infer = _matmul_alone_steps(a, 2, None, torch.device("cpu"))
    with FlopCounterMode(display=False) as train_flops, _Products() as replayed:
        train()
    assert Counter(replayed.seen) == Counter(real.seen) and len(real.seen) > 10 * a["depth"]
    patch = 2 * (a["img_size"] // a["patch_size"]) ** 2 * a["in_chans"] * a["patch_size"] ** 2 * a["embed_dim"]
    assert train_flops.get_total_flops() == 2 * (vit_flops(a, training=True, prefix_only=True) - 3 * patch)
    with FlopCounterMode(display=False) as infer_flops:
        infer()
    assert infer_flops.get_total_flops() == 2 * (vit_flops(a, training=False, prefix_only=True) - patch)
    # full=True: the products of a model that computes every token's output in its last block (the peers')
    train_full, _ = _matmul_alone_steps(a, 2, None, torch.device("cpu"), full=True)
    with FlopCounterMode(display=False) as full_flops:
        train_full()
    assert full_flops.get_total_flops() == 2 * (vit_flops(a, training=True) - 3 * patch)
    # in the step's dtype: under bf16 autocast every product is bf16
    train_bf16, _ = _matmul_alone_steps(a, 2, torch.bfloat16, torch.device("cpu"))
    with _DtypesOf() as seen:
        train_bf16()
    assert seen.dtypes == {torch.bfloat16}


class _DtypesOf(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.dtypes = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in _Products.OPS:
            self.dtypes |= {t.dtype for t in args if isinstance(t, torch.Tensor)}
        return func(*args, **(kwargs or {}))


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
        (i, p) for i in ("vitlab", "textbook") for p in ("fp32", "bf16")} | {
        (i, res["default_precision"]) for i in ("vitlab compiled", "vitlab compiled, foreach AdamW", "vitlab frozen")}
    default = next(r for r in res["rows"] if r["impl"] == "vitlab compiled")
    assert res["default_train"] == default["train"]
    trains = [r for r in res["rows"] if r["impl"] != "vitlab frozen"]
    assert all(r["train"] > 0 and 0 < r["train_mfu"] for r in trains)
    # on a CPU the default inference is the frozen copy (`vitlab eval` on a long job); it cannot train
    frozen = res["rows"][-1]
    assert frozen["impl"] == "vitlab frozen" and frozen["train"] is None and frozen["infer"] > 0
    assert res["default_infer_impl"] == "vitlab frozen" and res["default_infer"] == frozen["infer"]
    assert res["frozen_first_call_s"] > 0  # the compile time a user pays once
    textbook = max(r["infer"] for r in res["rows"] if r["impl"] == "textbook")
    assert res["ratios"]["infer_vs_best_peer"] == pytest.approx(frozen["infer"] / textbook)
    assert "train_vs_textbook_bf16" in res["ratios"]
    # the textbook target sized against the default step's matmuls alone
    need, alone = res["target_needs"]["train_vs_textbook_bf16"], res["matmuls_alone"][res["default_precision"]]
    textbook_bf16 = next(r["train"] for r in res["rows"] if (r["impl"], r["precision"]) == ("textbook", "bf16"))
    assert need["images_per_s"] == pytest.approx(1.3 * textbook_bf16)
    assert need["of_matmuls"] == pytest.approx(need["images_per_s"] / alone["train"])
    assert default["train_of_matmuls"] == pytest.approx(default["train"] / alone["train"])
    # a peer computes its last block for every token: its share is of the full block's matmuls alone
    full = res["matmuls_alone_full_last_block"][res["default_precision"]]
    textbook_row = next(r for r in res["rows"] if (r["impl"], r["precision"]) == ("textbook", res["default_precision"]))
    assert textbook_row["train_of_matmuls"] == pytest.approx(textbook_row["train"] / full["train"])
    ceiling = res["ceilings_gflops"][res["default_precision"]]
    assert textbook_row["train_mfu"] == pytest.approx(textbook_row["train"] * res["flops_train"] / 1e9 / ceiling)
    assert default["train_mfu"] == pytest.approx(default["train"] * res["flops_train_vitlab"] / 1e9 / ceiling)
    out = capsys.readouterr().out
    assert "| vitlab" in out and "MFU" in out
    assert cli_main(["bench", "--markdown", "--out", str(tmp_path)]) == 0
    table = capsys.readouterr().out
    assert "| textbook | bf16 |" in table
    assert f"| vitlab frozen (default inference) | {res['default_precision']} | - | - |" in table
    assert f"| vitlab compiled (default training) | {res['default_precision']} |" in table
    from vitlab.models import native

    # which kernels the compiled rows trained with is on record, in the JSON and under the table
    kernels = json.loads((tmp_path / "throughput.json").read_text())["native_kernels"]
    assert kernels.startswith("vitlab's" if native.library() is not None else "ATen's")
    assert f"compiled training's native kernels: {kernels}" in table
    assert "the step's own matmuls alone" in table and "1.3x textbook bf16 = " in table
    peer_mfu = default["train"] * res["flops_train"] / 1e9 / max(res["ceilings_gflops"].values())
    assert f"| the same, counting the peers' FLOPs per image (full last block) | {100 * peer_mfu:.0f}% |" in table


def test_an_interrupted_bench_keeps_its_finished_sections_beside_the_whole_result(tmp_path, capsys, monkeypatch):
    from vitlab import bench

    (tmp_path / "throughput.json").write_text('{"an earlier": "whole result"}')
    monkeypatch.setattr(bench, "compare", lambda *a, **k: {"rows": [], "measured": True})
    monkeypatch.setattr(bench, "print_table", lambda compare: None)
    monkeypatch.setattr(bench, "scaling", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt()))
    rc = cli_main(["bench", "--model", "vit_mini_patch4_32", "--scaling", "--out", str(tmp_path)])
    assert rc == 130
    partial = tmp_path / "throughput-partial.json"
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"vitlab bench: interrupted; the sections measured so far (compare) are in {partial}"]
    kept = json.loads(partial.read_text())
    assert kept["compare"] == {"rows": [], "measured": True} and kept["partial"] == "stopped after: compare"
    assert json.loads((tmp_path / "throughput.json").read_text()) == {"an earlier": "whole result"}


def test_bench_rejects_a_resnet_or_unknown_model_in_one_line_before_any_output(capsys):
    assert cli_main(["bench", "--model", "resnet18_cifar", "--steps", "1"]) == 2
    cap = capsys.readouterr()
    assert "resnet" in cap.err and len(cap.err.strip().splitlines()) == 1 and cap.out == ""
    assert cli_main(["bench", "--model", "vit_mini_patch4_3", "--steps", "1"]) == 2
    cap = capsys.readouterr()
    assert "did you mean 'vit_mini_patch4_32'" in cap.err and len(cap.err.strip().splitlines()) == 1
    assert cap.out == ""
    assert cli_main(["bench", "--warmup", "-1"]) == 2
    cap = capsys.readouterr()
    assert "--warmup must be 0 or more" in cap.err and cap.out == ""


def test_bench_writes_outside_the_committed_results_by_default():
    from vitlab.bench import add_arguments
    from vitlab.cli import Parser

    p = Parser()
    add_arguments(p)
    assert p.parse_args([]).out == "runs/bench"  # git-ignored: a quick run cannot replace a README record


def test_default_row_times_the_engines_fused_adamw_and_the_peers_foreach(monkeypatch):
    import vitlab.bench as bench

    built = []
    real = torch.optim.AdamW

    def spy(params, *args, **kw):  # records which AdamW kernel each timed step was given
        built.append("fused" if kw.get("fused") else "foreach" if kw.get("foreach") else "loop")
        return real(params, *args, **kw)

    monkeypatch.setattr(torch.optim, "AdamW", spy)
    monkeypatch.setattr(bench, "_matmul_step", lambda dtype, device=None: lambda: None)  # no 2048^2 matmuls in a test
    monkeypatch.setattr(bench, "_matmul_alone_steps", lambda *a, **kw: (lambda: None, lambda: None))
    monkeypatch.setattr(torch, "compile", lambda m, **kw: m)  # plumbing only: compiling is not what's tested
    res = bench.compare("vit_mini_patch4_32", batch=2, steps=1, warmup=0, impls=["vitlab", "textbook"],
                        log=lambda *a: None)
    # rows: vitlab fp32, vitlab bf16, textbook fp32, textbook bf16, the compiled step with foreach
    # AdamW (to tell compile's gain from the fused kernel's), then the default: compiled, fused
    assert [r["impl"] for r in res["rows"]][-3:] == ["vitlab compiled, foreach AdamW", "vitlab compiled",
                                                    "vitlab frozen"]  # (inference only: no optimizer)
    assert built == ["foreach"] * 5 + ["fused"]


def test_timed_calls_are_interleaved_across_setups_so_a_drift_hits_all_alike(monkeypatch):
    import vitlab.bench as bench

    calls = []
    monkeypatch.setattr(bench, "_matmul_step", lambda dtype, device=None: lambda: calls.append(("matmul", str(dtype), False)))
    monkeypatch.setattr(bench, "_matmul_alone_steps", lambda a, batch, dtype, device, full=False: tuple(
        (lambda kind=kind: calls.append(("matmuls alone", (str(dtype), kind, full), False))) for kind in ("train", "infer")))
    monkeypatch.setattr(torch, "compile", lambda m, **kw: m)
    monkeypatch.setattr(bench, "_train_step", lambda model, x, y, dtype, opt="foreach": lambda: calls.append(("train", id(model), model.training)))
    monkeypatch.setattr(bench, "_infer_step", lambda model, x, dtype: lambda: calls.append(("infer", id(model), model.training)))
    res = bench.compare("vit_mini_patch4_32", batch=2, steps=5, warmup=1, impls=["vitlab", "textbook"],
                        log=lambda *a: None)
    # a training and an inference unit per setup, the frozen copy's inference, a matmul per dtype,
    # the step's matmuls alone per dtype for training and for inference, vitlab's and the peers'
    n_units = 2 * (len(res["rows"]) - 1) + 1 + 2 + 8
    assert res["rounds"] == 5 and len(res["rows"]) == 7
    # warm-up: one call per unit, but two for each of the two compiled setups' two units and the frozen one
    n_warm = n_units + 5
    timed = [(k, m) for k, m, _ in calls[n_warm:]]
    assert len(timed) == 5 * n_units
    rounds = [timed[r * n_units:(r + 1) * n_units] for r in range(5)]
    # every round runs every unit once before the next round starts, each round rotated by a fifth
    shift = n_units // 5
    assert all(len(set(r)) == n_units for r in rounds)
    assert all(rounds[r] == rounds[0][r * shift:] + rounds[0][:r * shift] for r in range(5))
    assert all(tr == (k == "train") for k, _, tr in calls)  # train steps in train mode, inference in eval mode
    assert sum(k == "matmul" for k, _ in timed) == 2 * 5  # the ceilings are timed in the same rounds
    assert sum(k == "matmuls alone" for k, _ in timed) == 8 * 5  # and the step's matmuls alone


def test_each_figure_is_the_median_over_rounds_and_the_ceiling_the_best_matmul(monkeypatch):
    from types import SimpleNamespace

    import vitlab.bench as bench

    clock = [0.0]  # a fake perf_counter that each unit advances by a scripted duration

    def unit(seconds):
        def fn():
            clock[0] += seconds() if callable(seconds) else seconds
        return fn

    fp32_mm = iter([9.0, 2.0, 4.0, 3.0, 5.0, 6.0, 7.0, 8.0])  # the first is the warm-up call
    train_times = iter([0.5, 0.1, 0.2, 0.4, 0.2, 0.3, 0.2, 0.8])  # the first setup's: warm-up, then 7 timed
    built = []

    def train_step(model, x, y, dtype, opt="foreach"):
        built.append(model)
        return unit((lambda: next(train_times)) if len(built) == 1 else 1.0)

    monkeypatch.setattr(bench, "time", SimpleNamespace(perf_counter=lambda: clock[0]))
    monkeypatch.setattr(bench, "_matmul_step", lambda dtype, device=None: unit((lambda: next(fp32_mm)) if dtype == torch.float32 else 1.0))
    # the matmuls alone: 0.1 s per training step in fp32, 0.05 s inference; bf16 twice as fast;
    # with the full last block (the peers' products) 0.125 s and 0.0625 s
    monkeypatch.setattr(bench, "_matmul_alone_steps", lambda a, batch, dtype, device, full=False: tuple(
        unit(seconds * (1.25 if full else 1) / (2 if dtype == torch.bfloat16 else 1)) for seconds in (0.1, 0.05)))
    monkeypatch.setattr(torch, "compile", lambda m, **kw: m)
    monkeypatch.setattr(bench, "_train_step", train_step)
    monkeypatch.setattr(bench, "_infer_step", lambda model, x, dtype: unit(0.5))
    res = bench.compare("vit_mini_patch4_32", batch=4, steps=7, warmup=1, impls=["vitlab"], log=lambda *a: None)
    assert res["rounds"] == 5
    # 7 steps over 5 rounds: 2, 2, 1, 1, 1 timed calls per unit; the fp32 ceiling is the fastest of them
    assert res["ceilings_gflops"]["fp32"] == pytest.approx(2 * bench.MATMUL_SIZE["cpu"]**3 / 2.0 / 1e9)
    assert res["ceilings_gflops"]["bf16"] == pytest.approx(2 * bench.MATMUL_SIZE["cpu"]**3 / 1.0 / 1e9)
    row = res["rows"][0]
    assert (row["impl"], row["precision"]) == ("vitlab", "fp32")
    assert row["train"] == pytest.approx(4 / 0.2)  # median of 0.1, 0.2, 0.4, 0.2, 0.3, 0.2, 0.8
    assert row["infer"] == pytest.approx(4 / 0.5)
    assert res["matmuls_alone"]["fp32"] == pytest.approx({"train": 40.0, "infer": 80.0})
    assert res["matmuls_alone"]["bf16"] == pytest.approx({"train": 80.0, "infer": 160.0})
    assert res["matmuls_alone_full_last_block"]["fp32"] == pytest.approx({"train": 32.0, "infer": 64.0})
    assert row["train_of_matmuls"] == pytest.approx(20 / 40) and row["infer_of_matmuls"] == pytest.approx(8 / 80)
    # vitlab's MFU counts the FLOPs its forward does (the last block for [CLS] alone)
    a = bench.arch_of("vit_mini_patch4_32")
    assert res["flops_train_vitlab"] == bench.vit_flops(a, True, prefix_only=True) < res["flops_train"]
    assert row["train_mfu"] == pytest.approx(20 * res["flops_train_vitlab"] / 1e9 / res["ceilings_gflops"]["fp32"])
    # no peers here, so no training target to size; with the default's own rows only, none is asked
    assert res["target_needs"] == {}


def test_rate_from_the_median_call_or_from_the_total_time(monkeypatch):
    from types import SimpleNamespace

    import vitlab.bench as bench

    clock, durations = [0.0], iter([9.0, 1.0, 1.0, 4.0] * 2)  # a warm-up call, then three timed

    def fn():
        clock[0] += next(durations)

    monkeypatch.setattr(bench, "time", SimpleNamespace(perf_counter=lambda: clock[0]))
    assert bench._median_rate(fn, batch=6, steps=3, warmup=1) == pytest.approx(6 / 1.0)
    assert bench._median_rate(fn, batch=6, steps=3, warmup=1, mean=True) == pytest.approx(6 * 3 / 6.0)


def test_loop_vs_step_alternates_and_counts_one_epochs_bookkeeping(monkeypatch, tmp_path):
    """The loop's rate is epoch 3's images over the wall time since epoch 2's record (its writes
    included); step and loop timings alternate and the ratio is mean over mean."""
    from vitlab import bench
    from vitlab.train import engine

    calls = []
    step_rates = iter([100.0, 180.0, 110.0])  # mean 130; median 110, last 110

    def fake_time_train(model, x, y, dtype, steps, warmup, opt, mean=False):
        # an epoch's worth of steps, timed in total as an epoch is
        assert (opt, mean) == ("engine", True) and steps >= 30
        calls.append("step")
        return next(step_rates)

    def fake_train(cfg):
        calls.append("loop")
        assert (cfg.run.epochs, cfg.run.eval_every, cfg.run.compile) == (4, 4, False)
        run = tmp_path / f"loop{len(calls)}"
        run.mkdir()
        since = 2.0 if len(calls) == 2 else 4.0  # the first loop run 50 img/s, the second 25
        rows = [{"epoch": 1, "images_per_s": 10.0, "epoch_time": 9.0, "wall_time": 12.0},
                {"epoch": 2, "images_per_s": 50.0, "epoch_time": 2.0, "wall_time": 15.0},
                # epoch 3: 100 images trained in 1.0 s, but `since` s since epoch 2's record
                {"epoch": 3, "images_per_s": 100.0, "epoch_time": 1.0, "wall_time": 15.0 + since},
                {"epoch": 4, "images_per_s": 100.0, "epoch_time": 1.0, "wall_time": 30.0}]
        (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        return run

    monkeypatch.setattr(bench, "time_train", fake_time_train)
    monkeypatch.setattr(engine, "train", fake_train)
    res = bench.loop_vs_step("vit_mini_patch4_32", batch=2, steps=1, warmup=0, log=lambda *a: None)
    assert calls == ["step", "loop", "step", "loop", "step"]
    assert res["loop_runs"] == [pytest.approx(50.0), pytest.approx(25.0)] and res["step"] == pytest.approx(130.0)
    assert res["ratio"] == pytest.approx(37.5 / 130.0)


def test_machine_names_the_cpus_bf16_units_on_x86_and_arm():
    from vitlab.bench import describe_cpu, machine

    amx = "processor\t: 0\nmodel name\t: Intel(R) Xeon(R) Processor\nflags\t\t: fpu avx512f avx512_bf16 amx_bf16 amx_tile\n"
    assert describe_cpu(amx, "x86_64") == "Intel(R) Xeon(R) Processor (AVX-512 BF16, AMX)"
    # two cores' records: the first core's family and model name the generation
    zen5 = ("processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 26\nmodel\t\t: 2\nmodel name\t: AMD EPYC\n"
            "flags\t\t: fpu avx512f avx512_bf16\n\nprocessor\t: 1\ncpu family\t: 25\nmodel\t\t: 17\n")
    assert describe_cpu(zen5, "x86_64") == "AMD EPYC (family 26 model 2; AVX-512 BF16)"
    plain = "model name\t: Intel(R) Core(TM) i7\nflags\t\t: fpu avx2\n"
    assert describe_cpu(plain, "x86_64") == "Intel(R) Core(TM) i7 (no bf16 matmul units)"
    arm = "processor\t: 0\nBogoMIPS\t: 2000.00\nFeatures\t: fp asimd sve bf16 i8mm\nCPU part\t: 0xd4f\n"
    assert describe_cpu(arm, "aarch64") == "aarch64 (Arm BF16)"
    assert describe_cpu("Features\t: fp asimd\n", "aarch64") == "aarch64 (no bf16 matmul units)"
    assert describe_cpu("", "arm64") == "arm64"  # nothing to read: the platform's own name
    assert "threads, torch" in machine()  # this host: its /proc/cpuinfo, whichever kind


ALLOC_CHILD = """
import ctypes, resource, sys, torch
from vitlab.utils import _M_MMAP_THRESHOLD, tune_allocator
took = tune_allocator()
# glibc before about 2.35 caps the mmap threshold at 32 MiB: then tune_allocator settles for that,
# and re-asking for 512 MiB (what it set where allowed: a no-op) is refused
big = took and ctypes.CDLL("libc.so.6").mallopt(_M_MMAP_THRESHOLD, 512 << 20) == 1
sizes = [int(mib) for mib in sys.argv[1].split(",")]
def step():  # a step's worth of activation-sized buffers, each written, all freed at the end
    bufs = [torch.ones(i << 20, dtype=torch.uint8) for i in sizes]
    del bufs
for _ in range(3):
    step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    step()
print(took, big, (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 5)
"""


def test_tuned_allocator_reuses_freed_buffers_instead_of_faulting_them_in_again():
    def faults(tune: str, sizes):  # MiB
        env = dict(os.environ, VITLAB_TUNE_MALLOC=tune)
        out = subprocess.run([sys.executable, "-c", ALLOC_CHILD, ",".join(map(str, sizes))], env=env,
                             capture_output=True, text=True, check=True)
        took, big, per_step = out.stdout.split()
        return took == "True", big == "True", float(per_step)

    sizes = (*range(1, 9), 40, 48)
    took, big, tuned = faults("1", sizes)
    if took and not big:
        sizes = tuple(range(1, 9))
        took, big, tuned = faults("1", sizes)
    untouched, _, untuned = faults("0", sizes)
    if not (sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"):
        assert not took  # the thresholds are glibc's: elsewhere it changes nothing and says so
        return
    assert took and not untouched  # VITLAB_TUNE_MALLOC=0 leaves glibc's defaults alone
    if not big:  # an old glibc: only buffers under 32 MiB can stay in the heap
        assert tuned <= untuned
        return
    # glibc's adaptive threshold stops at 32 MiB, so by default the 40 and 48 MiB buffers (the size of
    # ViT-B's MLP activations at batch 32) are fresh pages every step: 88 MiB, about 22.5k 4 KiB page
    # faults (44 where transparent huge pages are always on); smaller ones fault too whenever the
    # heap's top is trimmed. Tuned, they come back from the heap: 0 faults per step in most runs here,
    # about 2.3k (9 MiB) in some 1 of 8, against 22.5-28k untuned in every run.
    thp = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    huge = thp.is_file() and "[always]" in thp.read_text()
    assert untuned > (40 if huge else 10_000)
    assert tuned < untuned / 5


def test_step_anatomy_packed_linear_gives_the_linear_s_output_and_gradients():
    # benchmarks/step_anatomy.py section 6 times the training step with qkv, fc1 and fc2 through
    # oneDNN's packed-weight kernels; the comparison means something only if they compute the same
    import importlib.util

    spec = importlib.util.spec_from_file_location("step_anatomy", Path(__file__).parents[1] / "benchmarks" / "step_anatomy.py")
    sa = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sa)
    assert sa.packed_linear_available()  # torch's CPU wheels are built with oneDNN
    torch.manual_seed(0)
    x, w, b = (torch.randn(*s, dtype=torch.bfloat16, requires_grad=True) for s in ((2, 65, 192), (576, 192), (576,)))
    g = torch.randn(2, 65, 576, dtype=torch.bfloat16)
    want = F.linear(x, w, b)
    want_grads = torch.autograd.grad(want, (x, w, b), g)
    # section 6's op (forward and input gradient packed) and section 7's forward-only one
    for op in (sa.packed_linear, sa.packed_linear_fwd):
        got = op(x, w, b)
        got_grads = torch.autograd.grad(got, (x, w, b), g)
        torch.testing.assert_close(got, want, rtol=1.6e-2, atol=1e-2)
        for a, e in zip(got_grads, want_grads):
            assert a.shape == e.shape
            torch.testing.assert_close(a.float(), e.float(), rtol=1.6e-2, atol=2e-2 * e.abs().max().item())
    # and a compiled, autocast training forward of either Linear does go through its op (else
    # sections 6 and 7 would time the default step twice); eager keeps F.linear
    for cls, name in ((sa.PackedLinear, "packed_linear.default("), (sa.PackedForwardLinear, "packed_linear_fwd.default(")):
        graphs = []

        def capture(gm, example_inputs):
            graphs.append(gm.code)
            return gm.forward

        lin = cls(192, 576)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = torch.compile(lin, backend=capture)(torch.randn(2, 65, 192, requires_grad=True))
        assert out.dtype == torch.bfloat16 and graphs and name in graphs[0]
        torch.testing.assert_close(lin(x.detach().float()), F.linear(x.detach().float(), lin.weight, lin.bias))
