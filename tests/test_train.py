"""The training engine: schedule, decay groups, a real run, resume, SIGKILL, NaN guard, DDP, eval/predict."""

import io
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from vitlab.config import ScheduleConfig, build_config, parse_overrides
from vitlab.data.loader import TensorLoader
from vitlab.errors import RunFailed, UserError
from vitlab.models import create_model
from vitlab.train.optim import lr_at, param_groups

# A small, fast configuration used by most tests: 1,024 shapes images, no augmentation
# randomness beyond what the recipe needs, fp32 so results are bit-comparable.
FAST = ["--model", "vit_mini_patch4_32", "--data", "shapes", "--data.subset", "1024", "--batch-size", "64",
        "--run.precision", "fp32", "--run.log_every", "4", "--sched.warmup_epochs", "0.5"]


# The same with the hybrid ViT (two convs, then 16 tokens): about 3x faster per image, for the tests
# that train several times over; its BatchNorm statistics are buffers a resumed run must restore too.
# (Not for the two-process test: BatchNorm normalises each process's half-batch on its own.)
FAST_HYBRID = ["--model", "vit_mini_convstem_patch8_32", *FAST[2:]]


def cli(*args, timeout=600, env=None):
    return subprocess.run([sys.executable, "-m", "vitlab.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


def metrics(run_dir):
    return [json.loads(line) for line in Path(run_dir, "metrics.jsonl").read_text().splitlines()]


def comparable(rows):
    drop = {"images_per_s", "epoch_time", "wall_time", "eval_time"}
    return [{k: v for k, v in r.items() if k not in drop} for r in rows]


# -- pure pieces ------------------------------------------------------------------------

def test_lr_schedule_at_key_steps():
    cfg = ScheduleConfig(name="cosine", warmup_epochs=5, warmup_lr=1e-6, min_lr=1e-5)
    kw = dict(base_lr=1e-3, total_steps=1000, warmup_steps=100, cfg=cfg)
    assert lr_at(0, **kw) == pytest.approx(1e-6)
    assert lr_at(50, **kw) == pytest.approx(1e-6 + (1e-3 - 1e-6) * 0.5)
    assert lr_at(100, **kw) == pytest.approx(1e-3)  # peak right after warmup
    assert lr_at(550, **kw) == pytest.approx(1e-5 + 0.5 * (1e-3 - 1e-5))  # half-way down the cosine
    assert lr_at(1000, **kw) == pytest.approx(1e-5)  # the floor
    assert lr_at(5000, **kw) == pytest.approx(1e-5)  # stays there
    values = [lr_at(s, **kw) for s in range(100, 1001)]
    assert all(b <= a for a, b in zip(values, values[1:]))  # monotone decay


def test_weight_decay_groups_skip_biases_norms_tokens_and_positions():
    model = create_model("deit_tiny_distilled_patch4_32")
    decay, no_decay = param_groups(model, 0.05)
    name_of = {id(p): n for n, p in model.named_parameters()}
    d = {name_of[id(p)] for p in decay["params"]}
    nd = {name_of[id(p)] for p in no_decay["params"]}
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    assert {"pos_embed", "cls_token", "dist_token", "norm.weight", "blocks.0.attn.qkv.bias"} <= nd
    assert {"blocks.0.attn.qkv.weight", "patch_embed.proj.weight", "head.weight"} <= d
    assert not d & nd and len(d) + len(nd) == len(list(model.parameters()))


def _muon_setup(weight_decay=0.0):
    from vitlab.config import OptimConfig
    from vitlab.train.optim import build_optimizer

    torch.manual_seed(0)
    model = create_model("vit_mini_patch4_32")
    opt = build_optimizer(model, OptimConfig(name="muon", weight_decay=weight_decay), lr=1e-2)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    return model, opt


def test_muon_orthogonalises_the_blocks_matrices_and_leaves_the_rest_to_adamw():
    model, opt = _muon_setup()
    name_of = {id(p): n for n, p in model.named_parameters()}
    on_muon = {name_of[id(p)] for g in opt.muon.param_groups for p in g["params"]}
    assert on_muon == {n for n, p in model.named_parameters() if p.ndim == 2 and n.startswith("blocks.")}
    assert {"blocks.0.attn.qkv.weight", "blocks.3.mlp.fc2.weight"} <= on_muon
    assert not on_muon & {"head.weight", "patch_embed.proj.weight", "pos_embed", "cls_token"}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    opt.step()
    params = dict(model.named_parameters())
    for name in ("blocks.0.attn.qkv.weight", "blocks.1.mlp.fc1.weight", "blocks.2.mlp.fc2.weight"):
        step = params[name].detach() - before[name]
        # by hand: the first update is (1 + momentum) * g; Muon moves W along -U V^T of it (g = U S V^T),
        # by lr * 0.2 * sqrt(max(rows, cols)) (Moonshot's AdamW-matched scale), singular values near 1
        u, _, vh = torch.linalg.svd(grads[name], full_matrices=False)
        scale = 1e-2 * 0.2 * max(step.shape) ** 0.5
        cos = torch.nn.functional.cosine_similarity(step.flatten(), (-u @ vh).flatten(), dim=0)
        assert cos > 0.97, (name, cos)
        sv = torch.linalg.svdvals(step) / scale
        assert 0.6 < sv.min() and sv.max() < 1.3, (name, sv.min(), sv.max())
    # AdamW's first step is lr * g / (|g| + eps): about lr * sign(g), whatever the gradient's size
    step = params["head.weight"].detach() - before["head.weight"]
    assert torch.allclose(step, -1e-2 * grads["head.weight"].sign(), atol=1e-5)
    # the second step, by hand: buf = mu * g1 + g2, the update orthogonalised is g2 + mu * buf (Nesterov);
    # leaving out the momentum or Nesterov's look-ahead gives directions at cosine 0.88-0.93 here
    name = "blocks.1.mlp.fc1.weight"
    g1, g2 = grads[name], torch.randn_like(grads[name])
    params[name].grad = g2
    w1 = params[name].detach().clone()
    opt.step()
    u, _, vh = torch.linalg.svd(g2 + 0.95 * (0.95 * g1 + g2), full_matrices=False)
    cos = torch.nn.functional.cosine_similarity((params[name].detach() - w1).flatten(), (-u @ vh).flatten(), dim=0)
    assert cos > 0.97, cos


def test_muon_takes_the_lr_weight_decay_and_state_of_one_optimizer():
    model, opt = _muon_setup(weight_decay=0.5)
    assert {g["weight_decay"] for g in opt.muon.param_groups} == {0.5}  # the matrices are decayed groups
    for g in opt.param_groups:  # the engine sets the schedule's lr through param_groups
        g["lr"] = 0.0
    before = [p.detach().clone() for p in model.parameters()]
    opt.step()
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    for g in opt.param_groups:
        g["lr"] = 1e-2
    opt.step()
    # a resumed optimizer continues exactly: state saved after step 2, loaded into a fresh one
    model2 = create_model("vit_mini_patch4_32")
    model2.load_state_dict(model.state_dict())
    from vitlab.config import OptimConfig
    from vitlab.train.optim import build_optimizer

    opt2 = build_optimizer(model2, OptimConfig(name="muon", weight_decay=0.5), lr=1e-2)
    buf = io.BytesIO()  # through bytes, as a checkpoint goes (a live state_dict shares the optimizer's tensors)
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    opt2.load_state_dict(torch.load(buf, weights_only=True))
    for p, p2 in zip(model.parameters(), model2.parameters()):
        p2.grad = p.grad.clone()
    opt.step()
    opt2.step()
    assert all(torch.equal(p, p2) for p, p2 in zip(model.parameters(), model2.parameters()))
    for g in opt2.param_groups:  # after a load, the lr the schedule writes still reaches both parts
        g["lr"] = 0.0
    before = [p.detach().clone() for p in model2.parameters()]
    opt2.step()
    assert all(torch.equal(p, b) for p, b in zip(model2.parameters(), before))
    with pytest.raises(ValueError, match="MuonAdamW"):
        opt2.load_state_dict(torch.optim.AdamW(model2.parameters()).state_dict())
    with pytest.raises((KeyError, ValueError)):  # and the other way round (the engine makes either one line)
        torch.optim.AdamW(model2.parameters()).load_state_dict(opt2.state_dict())


def test_muon_on_a_model_without_transformer_blocks_is_a_user_error():
    from vitlab.config import OptimConfig
    from vitlab.train.optim import build_optimizer

    with pytest.raises(UserError, match="use adamw"):
        build_optimizer(create_model("resnet18_cifar"), OptimConfig(name="muon"), lr=1e-3)


def test_ema_decay_warms_up_then_holds_and_averages_as_computed_by_hand():
    from vitlab.train.optim import ModelEMA

    model = torch.nn.Linear(3, 2)
    ema = ModelEMA(model, decay=0.99)
    assert [ema.decay_at(n) for n in (0, 1, 10, 100, 889, 891, 10**6)] == pytest.approx(
        [1 / 10, 2 / 11, 11 / 20, 101 / 110, 890 / 899, 0.99, 0.99])
    w0 = model.weight.detach().clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update(model, 0)  # decay 0.1: mostly the new weights
    assert torch.allclose(ema.module.weight, 0.1 * w0 + 0.9 * (w0 + 1.0))
    before = ema.module.weight.clone()
    ema.update(model, 1000)  # decay capped at 0.99
    assert torch.allclose(ema.module.weight, 0.99 * before + 0.01 * (w0 + 1.0))
    assert not ema.module.weight.requires_grad


def test_seed_command_lines_parse():
    cfg = build_config(None, parse_overrides(["--model", "vit_small_patch4_32", "--mixup-alpha", "0.2",
                                              "--label-smoothing", "0.1", "--drop-path", "0.1", "--autoaugment"]))
    assert cfg.model.name == "vit_small_patch4_32" and cfg.aug.autoaugment and cfg.model.drop_path_rate == 0.1
    assert cfg.optim.label_smoothing == 0.1 and cfg.aug.mixup_alpha == 0.2
    # Seed defaults
    assert (cfg.optim.name, cfg.optim.lr, cfg.optim.weight_decay, cfg.sched.warmup_epochs) == ("adamw", 3e-4, 0.05, 5)


def test_bad_config_key_exits_2_naming_the_closest(tmp_path):
    r = cli("train", "--optim.lrr", "1e-3", "--out", str(tmp_path))
    assert r.returncode == 2
    assert "did you mean 'optim.lr'" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    r = cli("train", "--model", "vit_tiny_patch4_23", "--out", str(tmp_path), *FAST[2:])
    assert r.returncode == 2 and "did you mean 'vit_tiny_patch4_32'" in r.stderr
    r = cli("train", "--resume", str(tmp_path / "nope"))
    assert r.returncode == 2 and "no such run folder" in r.stderr
    (tmp_path / "empty_run").mkdir()
    r = cli("train", "--resume", str(tmp_path / "empty_run"))
    assert r.returncode == 2 and "last.ckpt" in r.stderr
    # fewer training images than one batch: every epoch would be empty (it was a raw traceback)
    r = cli("train", *FAST, "--data.subset", "40", "--out", str(tmp_path))
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "40 images, fewer than one batch of 64" in r.stderr


# -- real runs ------------------------------------------------------------------------------

def test_short_run_on_shapes_learns_and_writes_a_complete_run(tmp_path):
    # the hybrid ViT (a two-conv stem, 16 tokens): it learns shapes in a few epochs, where the plain
    # patch-4 ViT sat at chance for two of its five epochs and ended near 72% in four times the time
    r = cli("train", "--model", "vit_mini_convstem_patch8_32", "--data", "shapes", "--epochs", "4", "--batch-size", "128",
            "--lr", "2e-3", "--sched.warmup_epochs", "0.5", "--aug.mixup_alpha", "0", "--drop-path", "0",
            "--run.name", "shapes", "--out", str(tmp_path), "--run.ema", "--run.tta", "--run.precision", "fp32")
    assert r.returncode == 0, r.stderr[-2000:]
    summary = r.stdout
    run = tmp_path / "shapes"
    for f in ["config.yaml", "metrics.jsonl", "model.safetensors", "last.ckpt", "curves.png"]:
        assert (run / f).is_file(), f
    rows = metrics(run)
    assert [r["epoch"] for r in rows] == list(range(1, 5))
    for key in ["train_loss", "train_acc", "test_acc", "test_top5", "lr", "images_per_s", "wall_time", "test_acc_ema",
                "test_acc_tta", "eval_time"]:
        assert key in rows[-1], key
    assert rows[-1]["test_acc"] > 80.0, rows[-1]  # chance is ~17%; 3 epochs of seeds 0 / 1 reached 87.7 / 92.1%
    # the EMA's warmed-up decay: after 312 steps it averages the last ~30, not the initialisation
    assert rows[-1]["test_acc_ema"] > 70.0, rows[-1]
    assert rows[-1]["train_loss"] < rows[0]["train_loss"]
    # eval and predict from the run directory
    r = cli("eval", "--checkpoint", str(run))
    assert r.returncode == 0, r.stderr
    assert "top-1" in r.stdout and "top-5" in r.stdout and (run / "confusion_matrix.png").is_file()  # 6 classes
    ev = json.loads((run / "eval.json").read_text())
    from vitlab.train.checkpoint import load_model

    # the best epoch's weights (the model's or, if it scored higher, the EMA's), scored as the run did
    meta = load_model(run / "model.safetensors")[1]
    saved = rows[meta["epoch"] - 1]
    assert meta["weights"] in ("model", "ema") and meta["test_acc"] == max(saved["test_acc"], saved["test_acc_ema"])
    assert ev["acc"] == pytest.approx(saved["test_acc" if meta["weights"] == "model" else "test_acc_ema"], abs=0.2)
    # the run's summary names that same best, and whose weights they are
    ema_note = ", EMA weights" if meta["weights"] == "ema" else ""
    assert f"best {meta['test_acc']:.2f}% (epoch {meta['epoch']}{ema_note}; in model.safetensors)" in summary, summary
    r = cli("eval", "--checkpoint", str(run), "--tta", "flip", "--out", str(tmp_path / "tta"))
    assert r.returncode == 0 and "test (flip TTA): top-1" in r.stdout, r.stderr
    ev = json.loads((tmp_path / "tta" / "eval-flip.json").read_text())
    if meta["weights"] == "model":  # the saved epoch's flip-TTA score, as the run measured it (the model's only)
        assert ev["tta"] == "flip" and ev["acc"] == pytest.approx(rows[meta["epoch"] - 1]["test_acc_tta"], abs=0.2)
    r = cli("eval", "--checkpoint", str(run), "--tta", "flip-shift", "--out", str(tmp_path / "tta10"),
            "--data.num_workers", "0")  # decoding in the main process: the same scores
    assert r.returncode == 0 and "test (flip-shift TTA): top-1" in r.stdout, r.stderr
    assert json.loads((tmp_path / "tta10" / "eval-flip-shift.json").read_text())["tta"] == "flip-shift"
    # the frozen, compiled copy (bf16 weights where bf16 is fast, else fp32): the same scores
    # within bf16's rounding (the plain eval is the auto choice here: too little work to compile)
    assert "eager (auto:" in cli("eval", "--checkpoint", str(run), "--out", str(tmp_path / "e"), "--device", "cpu").stderr
    r = cli("eval", "--checkpoint", str(run), "--compile", "true", "--out", str(tmp_path / "frozen"), "--device", "cpu")
    assert r.returncode == 0 and "frozen torch.compile" in r.stderr, r.stderr
    frozen = json.loads((tmp_path / "frozen" / "eval.json").read_text())
    plain = json.loads((tmp_path / "e" / "eval.json").read_text())
    assert frozen["n"] == plain["n"] and abs(frozen["acc"] - plain["acc"]) <= 1.0, (frozen["acc"], plain["acc"])
    assert frozen["scoring"].startswith("frozen torch.compile") and plain["scoring"].startswith("eager (auto:")
    assert plain["data"] == "shapes" and plain["split"] == "test" and plain["checkpoint"] == str(run / "model.safetensors")
    # another split gets its own files: the test score stays
    r = cli("eval", "--checkpoint", str(run), "--split", "train", "--out", str(tmp_path / "e"))
    assert r.returncode == 0 and "eval-train.json" in r.stdout, r.stderr
    assert json.loads((tmp_path / "e" / "eval.json").read_text()) == plain
    assert json.loads((tmp_path / "e" / "eval-train.json").read_text())["split"] == "train"
    assert (tmp_path / "e" / "confusion_matrix-train.png").is_file()
    r = cli("eval", "--checkpoint", str(run), "--data.num_workers", "-1")
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and "num_workers" in r.stderr, r.stderr
    (tmp_path / "a_file").write_text("x")  # --out naming a file: refused before any scoring or output
    r = cli("eval", "--checkpoint", str(run), "--out", str(tmp_path / "a_file"))
    assert r.returncode == 2 and r.stdout == "" and r.stderr.strip().count("\n") == 0, (r.stdout, r.stderr)
    assert "exists and is not a folder" in r.stderr
    # benchmarks/fashion_mnist.py's after-the-clock score reads the final weights (last.ckpt): without
    # TTA it is the last epoch's own test score
    import importlib.util

    from vitlab.config import from_dict, load_yaml

    spec = importlib.util.spec_from_file_location("fm_bench", Path(__file__).parents[1] / "benchmarks" / "fashion_mnist.py")
    fm_bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fm_bench)
    import shutil

    from vitlab.train import checkpoint as ckpt

    cfg = from_dict(load_yaml(run / "config.yaml"))
    copy = Path(shutil.copytree(run, tmp_path / "copy"))
    decoy, decoy_meta = ckpt.load_model(copy)  # best-by-test weights with a zeroed head: chance accuracy
    torch.nn.init.zeros_(decoy.head.weight)
    ckpt.save_model(copy / ckpt.WEIGHTS, decoy, {k: v for k, v in decoy_meta.items() if k not in ("format", "arch")})
    assert fm_bench.score_final(copy, cfg, "none") == pytest.approx(rows[-1]["test_acc"], abs=0.1)  # 2 of 2,000 images
    from vitlab.data.shapes import SHAPES_CLASSES, make_shapes
    from PIL import Image

    imgs, labels, _ = make_shapes(5, seed=123)
    paths = []
    for i in range(5):
        p = tmp_path / f"img{i}.png"
        Image.fromarray(imgs[i].permute(1, 2, 0).numpy()).save(p)
        paths.append(str(p))
    r = cli("predict", *paths, "--checkpoint", str(run / "model.safetensors"), "--top-k", "3")
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("%") == 15 and any(c in r.stdout for c in SHAPES_CLASSES)
    # in chunks of 2 (2, 2, 1): the same answers, in the same order
    chunked = cli("predict", *paths, "--checkpoint", str(run / "model.safetensors"), "--top-k", "3", "--batch-size", "2")
    assert chunked.returncode == 0, chunked.stderr

    def answers(out):  # [(line's class or file name, percent or None)]; percents within print rounding
        return [(ln.split("%")[-1].strip(), float(ln.split("%")[0])) if "%" in ln else (ln, None)
                for ln in out.splitlines()]
    got, want = answers(chunked.stdout), answers(r.stdout)
    assert [g[0] for g in got] == [w[0] for w in want]
    assert all(g[1] == w[1] or abs(g[1] - w[1]) <= 0.011 for g, w in zip(got, want))
    # a folder stands for its images, sorted: the same answers as the files named one by one
    folder = tmp_path / "folder"
    folder.mkdir()
    for q in sorted(paths, reverse=True):
        shutil.copy(q, folder / Path(q).name)
    (folder / "notes.txt").write_text("not an image")
    r = cli("predict", str(folder), "--checkpoint", str(run), "--top-k", "3")
    assert r.returncode == 0, r.stderr
    assert answers(r.stdout) == want
    (tmp_path / "empty").mkdir()
    (tmp_path / "other").mkdir()
    shutil.copy(paths[0], tmp_path / "other" / Path(paths[0]).name)
    r = cli("predict", paths[0], str(tmp_path / "other" / Path(paths[0]).name), "--checkpoint", str(run), "--top-k", "1")
    assert r.returncode == 0 and f"{paths[0]}:" in r.stdout and f"{tmp_path / 'other' / 'img0.png'}:" in r.stdout
    r = cli("predict", str(tmp_path / "empty"), "--checkpoint", str(run))
    assert r.returncode == 2 and "no image files" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    (tmp_path / "empty" / "cats").mkdir()  # an image-folder layout: its subfolders are named in the line
    (tmp_path / "empty" / "dogs").mkdir()
    r = cli("predict", str(tmp_path / "empty"), "--checkpoint", str(run))
    assert r.returncode == 2 and "its 2 subfolders are not searched" in r.stderr, r.stderr
    # a bad file in a later chunk fails the command before any answer is printed
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)  # a PNG signature, then junk
    r = cli("predict", *paths[:3], str(tmp_path / "bad.png"), "--checkpoint", str(run), "--batch-size", "2")
    assert r.returncode == 2 and r.stdout == "" and len(r.stderr.strip().splitlines()) == 1, (r.stdout, r.stderr)
    assert "cannot read image" in r.stderr and "bad.png" in r.stderr
    r = cli("predict", *paths, "--checkpoint", str(run), "--batch-size", "0")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "--batch-size" in r.stderr
    r = cli("predict", str(tmp_path / "missing.png"), "--checkpoint", str(run))
    assert r.returncode == 2 and "image not found" in r.stderr
    # --tta flip: the softmax of the mean logits over each image and its mirror, as eval scores them
    r = cli("predict", *paths[:2], "--checkpoint", str(run / "model.safetensors"), "--top-k", "1", "--tta", "flip")
    assert r.returncode == 0, r.stderr
    from vitlab.data.files import read_image_file
    from vitlab.train.predict import to_batch

    model, meta = load_model(run / "model.safetensors")
    x = to_batch([read_image_file(q, 3, tuple(model.img_size), False) for q in paths[:2]], meta["mean"], meta["std"])
    with torch.no_grad():
        probs = torch.softmax((model(x).float() + model(x.flip(-1)).float()) / 2, dim=-1)
    top = probs.max(-1)
    tta_answers = [a for a in answers(r.stdout) if a[1] is not None]
    assert [a[0] for a in tta_answers] == [SHAPES_CLASSES[i] for i in top.indices.tolist()]
    assert all(abs(a[1] - 100 * v) <= 0.011 for a, v in zip(tta_answers, top.values.tolist()))
    # --precision bf16: the same classes, the probabilities within bf16's rounding of fp32's
    r = cli("predict", *paths, "--checkpoint", str(run), "--top-k", "1", "--precision", "bf16", "--device", "cpu")
    assert r.returncode == 0, r.stderr
    fp32 = cli("predict", *paths, "--checkpoint", str(run), "--top-k", "1").stdout
    fp32_top = [a for a in answers(fp32) if a[1] is not None]
    bf16_top = [a for a in answers(r.stdout) if a[1] is not None]
    assert [a[0] for a in bf16_top] == [a[0] for a in fp32_top]
    assert all(abs(a[1] - b[1]) < 3.0 for a, b in zip(bf16_top, fp32_top)), (bf16_top, fp32_top)
    for bad, says in ((["--device", "tpu"], "unknown device 'tpu' for --device"),
                      (["--precision", "fp8"], "unknown precision 'fp8'"),
                      (["--precision", "fp16", "--device", "cpu"], "fp16 needs a GPU")):
        r = cli("predict", paths[0], "--checkpoint", str(run), *bad)
        assert r.returncode == 2 and says in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_predicts_check_decodes_every_image_so_a_truncated_jpeg_fails_up_front(tmp_path, monkeypatch):
    import io

    import numpy as np
    from PIL import Image

    from vitlab.data.files import read_image_file
    from vitlab.train import predict

    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buf, "JPEG", quality=90)
    good, cut = tmp_path / "good.jpg", tmp_path / "cut.jpg"
    good.write_bytes(buf.getvalue())
    cut.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])  # Pillow's verify() passes this file

    def read(p):
        return read_image_file(p, 3, (32, 32), crop=False)

    kept = predict.check_images([str(good)] * 3, read)
    assert [tuple(a.shape) for a in kept] == [(3, 32, 32)] * 3 and all((a == kept[0]).all() for a in kept)
    with pytest.raises(UserError, match="cannot read image .*cut.jpg.*truncated"):
        predict.check_images([str(good), str(cut)], read)
    # past the cache budget the arrays are dropped (decoded again in their chunk), not kept
    monkeypatch.setattr(predict, "CACHE_BYTES", 2 * 32 * 32 * 3)
    assert [a is None for a in predict.check_images([str(good)] * 3, read)] == [False, False, True]


def test_predict_prepares_images_as_the_model_was_trained(tmp_path):
    import numpy as np
    from PIL import Image

    from vitlab.data.files import read_image_file
    from vitlab.train.predict import crops_like_training

    def read_image(path, in_chans, size, crop):  # (H, W, C) numpy, for the pixel checks below
        return read_image_file(path, in_chans, size, crop).permute(1, 2, 0).numpy()

    # a wide image: blue, red, blue thirds of 32 columns each
    a = np.zeros((32, 96, 3), dtype=np.uint8)
    a[:, :32, 2] = a[:, 64:, 2] = 255
    a[:, 32:64, 0] = 255
    Image.fromarray(a).save(tmp_path / "wide.png")
    # trained on image files: shorter side to 37 (32 * 256 / 224), centre 32 x 32: all red
    assert crops_like_training({"data": "imagefolder:/photos"}, (32, 32))
    assert crops_like_training({"data": "flowers102"}, (32, 32))
    crop = read_image(str(tmp_path / "wide.png"), 3, (32, 32), crop=True).astype(int)
    assert crop.shape == (32, 32, 3) and (crop[..., 0] > 200).all() and (crop[..., 2] < 60).all()
    # a tensor dataset (or an imported checkpoint): the whole image, squeezed to 32 x 32
    assert not crops_like_training({"data": "cifar10"}, (32, 32)) and not crops_like_training({}, (224, 224))
    whole = read_image(str(tmp_path / "wide.png"), 3, (32, 32), crop=False).astype(int)
    assert (whole[:, :8, 2] > 200).all() and (whole[:, 12:20, 0] > 200).all() and (whole[:, 24:, 2] > 200).all()
    # transparency is white, as in the training data path; one channel for a greyscale model
    rgba = np.zeros((8, 8, 4), dtype=np.uint8)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "clear.png")
    assert (read_image(str(tmp_path / "clear.png"), 3, (8, 8), crop=False) == 255).all()
    grey = read_image(str(tmp_path / "clear.png"), 1, (8, 8), crop=False)
    assert grey.shape == (8, 8, 1) and (grey == 255).all()


def test_eval_on_other_data_does_not_read_the_runs_data_folder():
    from vitlab.train.evaluate import data_config_for

    meta = {"config": {"data": {"name": "fashion-mnist", "dir": "/data/fashion-mnist", "subset": 512}}}
    # MNIST's files have Fashion-MNIST's names: the run's folder would be scored as MNIST
    assert data_config_for(meta, "mnist", None).dir is None
    root = {"config": {"data": {"name": "fashion-mnist", "dir": "/data"}}}  # a root of several: still looked in
    assert data_config_for(root, "mnist", None).dir == "/data"
    assert data_config_for(meta, "mnist", "/data/mnist").dir == "/data/mnist"
    same = data_config_for(meta, "fashion-mnist", None)
    assert same.dir == "/data/fashion-mnist" and same.subset is None  # (scored whole)
    # the train split of a run on a subset is the subset it trained on; another dataset's is whole
    assert data_config_for(meta, None, None, split="train").subset == 512
    assert data_config_for(meta, "fashion-mnist", None, split="train").subset == 512
    assert data_config_for(meta, "mnist", None, split="train").subset is None
    assert data_config_for(meta, None, None).dir == "/data/fashion-mnist"


def test_eval_refuses_data_whose_classes_or_channels_the_model_cannot_score():
    from vitlab.config import DataConfig
    from vitlab.train.evaluate import score

    for kw, message in [({"num_classes": 10}, "the model has 10 classes but shapes has 6"),
                        ({"num_classes": 4}, "the model has 4 classes but shapes has 6"),  # labels past its head
                        ({"num_classes": 6, "in_chans": 1}, "takes 1-channel images but shapes has 3-channel")]:
        model = create_model("vit_mini_patch4_32", **kw)
        with pytest.raises(UserError, match=message):
            score(model, {}, DataConfig(name="shapes"), "test", device="cpu", precision="fp32")


def test_image_files_are_seen_at_the_presets_size_unless_data_img_size_asks():
    from vitlab.train.engine import choose_img_size

    def size(*flags, native=(224, 224)):
        return choose_img_size(build_config(None, parse_overrides(list(flags))), native)

    assert size("--data", "imagefolder:photos", "--model", "vit_mini_patch4_32") == (32, 32)  # not 3,136 tokens
    assert size("--data", "flowers102", "--model", "vit_tiny_patch4_32") == (32, 32)
    assert size("--data", "imagefolder:photos", "--model", "vit_mini_patch4_32", "--data.img_size", "64",
                native=(64, 64)) == (64, 64)
    assert size("--data", "imagefolder:photos", "--model", "vit_tiny_patch16_224") == (224, 224)
    assert size("--data", "shapes", "--model", "vit_mini_patch4_32", native=(32, 32)) == (32, 32)


def test_a_resumed_run_keeps_the_size_it_was_built_at(tmp_path):
    """Runs made before choose_img_size changed (image files at 224 px under a 32-px preset) must
    resume at their own size: from the state's record, else from the run's weights file."""
    from vitlab.train import checkpoint as ckpt
    from vitlab.train.engine import resumed_img_size

    assert resumed_img_size({"img_size": [48, 48]}, tmp_path) == (48, 48)
    assert resumed_img_size({}, tmp_path) is None  # nothing says: the rule decides
    model = create_model("vit_mini_patch4_32", num_classes=3, img_size=64)
    ckpt.save_model(tmp_path / ckpt.WEIGHTS, model, {"img_size": [64, 64]})
    assert resumed_img_size({}, tmp_path) == (64, 64)


def test_a_resume_may_name_the_class_count_and_size_the_run_derived(tmp_path):
    """--model.num_classes 3 on a resumed run that left it unset (derived from its 3-class data) is no
    change; 4 is one, refused in one line."""
    from vitlab.config import check_resume_config
    from vitlab.train import checkpoint as ckpt
    from vitlab.train.command import _unset_if_as_run

    ckpt.save_model(tmp_path / ckpt.WEIGHTS, create_model("vit_mini_patch4_32", num_classes=3, img_size=64),
                    {"img_size": [64, 64]})
    saved = build_config(None, {})
    for same in (["--model.num_classes", "3"], ["--model.img_size", "64"]):
        cfg = build_config(None, parse_overrides(same))
        _unset_if_as_run(saved, cfg, tmp_path)
        check_resume_config(saved, cfg, tmp_path)  # passes
    for other, key in ((["--model.num_classes", "4"], "model.num_classes"),
                       (["--model.img_size", "32"], "model.img_size")):
        cfg = build_config(None, parse_overrides(other))
        _unset_if_as_run(saved, cfg, tmp_path)
        with pytest.raises(UserError, match=f"{key} cannot change on a resume"):
            check_resume_config(saved, cfg, tmp_path)
    # a run paused before its first evaluation has only its last.ckpt, which records the same two values
    (tmp_path / ckpt.WEIGHTS).unlink()
    torch.save({"img_size": [64, 64], "num_classes": 3}, tmp_path / ckpt.LAST)
    cfg = build_config(None, parse_overrides(["--model.num_classes", "3", "--model.img_size", "64"]))
    _unset_if_as_run(saved, cfg, tmp_path)
    assert cfg.model.num_classes is None and cfg.model.img_size is None


def test_tensorboard_asked_for_but_not_installed_stops_before_the_run_starts(tmp_path, monkeypatch):
    from vitlab.train import engine

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # its import fails, as without the package
    cfg = build_config(None, parse_overrides([*FAST, "--out", str(tmp_path), "--run.name", "tb", "--run.tensorboard"]))
    with pytest.raises(UserError, match="needs the tensorboard package"):
        engine.train(cfg)
    assert not (tmp_path / "tb").exists()


def test_a_state_that_is_not_a_torch_file_or_is_cut_short_says_so_in_words(tmp_path):
    from vitlab.models.pretrained import load_pretrained
    from vitlab.train.checkpoint import load_state

    torch.save({"model": {"w": torch.randn(64, 64)}}, tmp_path / "good.ckpt")
    whole = (tmp_path / "good.ckpt").read_bytes()
    (tmp_path / "cut.ckpt").write_bytes(whole[: len(whole) // 2])
    (tmp_path / "text.ckpt").write_text("hello world")
    for name, needle in (("cut.ckpt", "a damaged torch zip archive: cut short"),
                         ("text.ckpt", "not a torch file: neither its zip format nor a pickle")):
        with pytest.raises(UserError, match=needle):  # (torch's own reasons: a byte value, a zip reader's)
            load_state(tmp_path / name)
    (tmp_path / "text.pth").write_text("hello world")
    with pytest.raises(UserError, match="text.pth is not a readable torch weights file \\(not a torch file"):
        load_pretrained(tmp_path / "text.pth")
    assert load_state(tmp_path / "good.ckpt")["model"]["w"].shape == (64, 64)


def test_an_old_pickle_as_a_checkpoint_is_one_error_without_torchs_warnings(tmp_path):
    import pickle
    import warnings

    from vitlab.models.pretrained import load_pretrained
    from vitlab.train.checkpoint import load_state

    path = tmp_path / "old.ckpt"
    path.write_bytes(pickle.dumps({"a": 1}, protocol=4))  # torch warns of protocols other than its own
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        with pytest.raises(UserError):
            load_state(path)
        with pytest.raises(UserError):
            load_pretrained(str(path))
    assert not seen, [str(w.message) for w in seen]


def test_a_runs_last_ckpt_given_as_weights_points_to_the_run_folder(tmp_path):
    from vitlab.train.checkpoint import load_model, save_state

    save_state(tmp_path / "last.ckpt", {"step": 1})
    with pytest.raises(UserError, match="resumable training state .*pass the run folder"):
        load_model(tmp_path / "last.ckpt")


def test_resume_equals_uninterrupted(tmp_path):
    common = [*FAST_HYBRID, "--epochs", "3", "--out", str(tmp_path), "--model.drop_path_rate", "0.1",
              "--aug.mixup_alpha", "0.2", "--aug.hflip", "0.5", "--run.ema"]  # EMA: its decay follows the step
    r = cli("train", *common, "--run.name", "full")
    assert r.returncode == 0, r.stderr[-2000:]
    r = cli("train", *common, "--run.name", "part", "--run.stop_after", "1")
    assert r.returncode == 0, r.stderr[-2000:]
    assert len(metrics(tmp_path / "part")) == 1
    # what a resume cannot change (the weights' and the optimizer state's shapes, the data): one line,
    # exit 2, and the run left as it was (it used to crash at the first step after rewriting config.yaml)
    saved_cfg = (tmp_path / "part" / "config.yaml").read_text()
    for change, key in ((["--model", "vit_mini_patch4_32"], "model.name"), (["--optim.name", "sgd"], "optim.name"),
                        (["--data", "cifar10"], "data.name")):
        r = cli("train", "--resume", str(tmp_path / "part"), *change, "--epochs", "4")
        assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr[-2000:]
        assert f"{key} cannot change on a resume" in r.stderr
    assert (tmp_path / "part" / "config.yaml").read_text() == saved_cfg
    # the same changes made by hand in a copy's config.yaml: the engine compares it with the config the
    # state was saved with; without that record (keep=False), loading the state itself says what misfits
    for i, (old, new, keep, needle) in enumerate((
            ("name: adamw", "name: sgd", True, "optim.name cannot change on a resume"),
            ("subset: 1024", "subset: 512", True, "data.subset cannot change on a resume"),
            ("name: adamw", "name: sgd", False, "does not fit optim.name 'sgd'"),
            ("vit_mini_convstem_patch8_32", "vit_mini_patch4_32", False, "saved weights do not fit"))):
        edited = Path(shutil.copytree(tmp_path / "part", tmp_path / f"edited-{i}"))
        assert old in saved_cfg
        (edited / "config.yaml").write_text(saved_cfg.replace(old, new, 1))
        if not keep:
            state = torch.load(edited / "last.ckpt", weights_only=True)
            del state["config"]
            torch.save(state, edited / "last.ckpt")
        r = cli("train", "--resume", str(edited))
        assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr[-2000:]
        assert needle in r.stderr, r.stderr
    r = cli("train", "--resume", str(tmp_path / "part"))
    assert r.returncode == 0, r.stderr[-2000:]
    full, part = comparable(metrics(tmp_path / "full")), comparable(metrics(tmp_path / "part"))
    assert len(part) == 3
    assert part == full
    # a finished run has nothing to resume, and a run trained from scratch takes no --pretrained: one line
    # each, the run untouched (both used to exit 0 and rewrite config.yaml)
    saved_cfg = (tmp_path / "part" / "config.yaml").read_text()
    for extra, needle in (([], "has finished 3 epochs of 3"), (["--epochs", "2"], "has finished 3 epochs of 2"),
                          (["--epochs", "5", "--pretrained", str(tmp_path / "full")], "trained from scratch")):
        r = cli("train", "--resume", str(tmp_path / "part"), *extra)
        assert r.returncode == 2 and needle in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr[-2000:]
    assert (tmp_path / "part" / "config.yaml").read_text() == saved_cfg


def test_sigkill_mid_epoch_then_resume_matches(tmp_path):
    common = [*FAST_HYBRID, "--epochs", "3", "--out", str(tmp_path), "--data.subset", "2048"]
    r = cli("train", *common, "--run.name", "ref")
    assert r.returncode == 0, r.stderr[-2000:]
    proc = subprocess.Popen([sys.executable, "-m", "vitlab.cli", "train", *common, "--run.name", "killed"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    last = tmp_path / "killed" / "last.ckpt"
    t0 = time.time()
    while not last.exists() and proc.poll() is None and time.time() - t0 < 300:
        time.sleep(0.05)
    # epoch 1 is saved; a third of epoch 2's training time later the run is inside it (hence
    # the uneven split of a SIGKILL: one finished epoch and a half-trained one, unsaved)
    time.sleep(metrics(tmp_path / "ref")[1]["epoch_time"] / 3)
    assert proc.poll() is None, "the run finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert len(metrics(tmp_path / "killed")) in (1, 2)
    # No temporary half-files are left looking like checkpoints.
    assert not [p for p in (tmp_path / "killed").iterdir() if p.name.endswith(".tmp")]
    r = cli("train", "--resume", str(tmp_path / "killed"))
    assert r.returncode == 0, r.stderr[-2000:]
    assert comparable(metrics(tmp_path / "killed")) == comparable(metrics(tmp_path / "ref"))


def test_non_finite_loss_stops_with_the_step_and_saves_nothing(tmp_path, monkeypatch):
    from vitlab.train import engine, losses

    calls = {"n": 0}
    real = losses.DistillationLoss.forward

    def poisoned(self, outputs, targets, images=None):
        calls["n"] += 1
        loss = real(self, outputs, targets, images)
        return loss * float("nan") if calls["n"] == 3 else loss

    monkeypatch.setattr(losses.DistillationLoss, "forward", poisoned)
    closed = []  # the loaders are closed on the way out of a failed run too (FileLoader: its workers stop)
    monkeypatch.setattr(TensorLoader, "close", lambda self: closed.append(self.train))
    cfg = build_config(None, parse_overrides([*FAST, "--epochs", "2", "--out", str(tmp_path), "--run.name", "nan"]))
    with pytest.raises(RunFailed, match=r"non-finite at epoch 1, batch 3"):
        engine.train(cfg)
    run = tmp_path / "nan"
    assert not (run / "model.safetensors").exists() and not (run / "last.ckpt").exists()
    assert sorted(closed) == [False, True]  # the eval loader and the training loader


def test_clean_head_and_tail_turn_augmentation_off_at_the_schedules_ends(tmp_path, monkeypatch, capsys):
    from vitlab.data import augment
    from vitlab.train import engine

    flags = []
    real = augment.TrainTransform.__call__

    def spy(self, images, labels, generator, clean=False):
        flags.append(clean)
        return real(self, images, labels, generator, clean)

    monkeypatch.setattr(augment.TrainTransform, "__call__", spy)
    cfg = build_config(None, parse_overrides([*FAST, "--data.subset", "256", "--epochs", "2", "--out", str(tmp_path),
                                              "--run.name", "tail", "--aug.clean_tail", "0.25",
                                              "--aug.clean_head", "0.125", "--run.eval_every", "2"]))
    engine.train(cfg)
    assert flags == [True] + [False] * 5 + [True] * 2  # 2 epochs of 4 steps: the first eighth, the last quarter
    assert "(epoch 2; in model.safetensors)" in capsys.readouterr().out  # (eval_every 2) the summary names the best epoch, not its index


def test_a_pause_before_the_first_evaluation_ends_cleanly_and_resumes(tmp_path, capsys):
    from vitlab.train import engine

    over = [*FAST, "--data.subset", "256", "--epochs", "3", "--out", str(tmp_path), "--run.name", "pause",
            "--run.eval_every", "3"]
    engine.train(build_config(None, parse_overrides([*over, "--run.stop_after", "1"])))
    assert "paused after 1 epochs, before the first evaluation" in capsys.readouterr().out
    run = tmp_path / "pause"
    assert [("test_acc" in r) for r in metrics(run)] == [False] and not (run / "model.safetensors").exists()
    # resuming with another optimizer than the run's: one clear error, and the run is left as it was
    with pytest.raises(UserError, match="optim.name cannot change on a resume .*'adamw'; asked for 'muon'"):
        engine.train(build_config(None, parse_overrides([*over, "--optim.name", "muon"])), resume=str(run))
    assert len(metrics(run)) == 1
    engine.train(build_config(None, parse_overrides(over)), resume=str(run))
    assert [("test_acc" in r) for r in metrics(run)] == [False, False, True]  # the last epoch is scored
    assert (run / "model.safetensors").is_file()


def test_a_pause_after_a_scored_epoch_says_paused_not_done(tmp_path, capsys):
    from vitlab.train import engine

    over = [*FAST, "--data.subset", "256", "--epochs", "3", "--out", str(tmp_path), "--run.name", "pause1"]
    engine.train(build_config(None, parse_overrides([*over, "--run.stop_after", "1"])))
    out = capsys.readouterr().out
    assert "paused: 1 epochs" in out and "last test acc" in out and "done:" not in out


def test_a_paused_run_with_a_val_split_is_scored_on_test_only_when_it_ends(tmp_path, capsys):
    from vitlab.train import engine

    over = [*FAST, "--data.subset", "256", "--data.val_fraction", "0.25", "--epochs", "2", "--out", str(tmp_path),
            "--run.name", "pv"]
    engine.train(build_config(None, parse_overrides([*over, "--run.stop_after", "1"])))
    run = tmp_path / "pv"
    assert "test accuracy of the best-by-val weights" not in capsys.readouterr().out
    assert not (run / "test.json").exists()
    engine.train(build_config(None, parse_overrides(over)), resume=str(run))
    assert "test accuracy of the best-by-val weights" in capsys.readouterr().out
    assert json.loads((run / "test.json").read_text())["n"] > 0


def _tta_case(model_name: str, seed: int):
    """A model, 40 shapes images in two batches, their eval transform, and the transformed images."""
    from vitlab.data import DatasetInfo, build_eval_transform, make_shapes

    torch.manual_seed(0)
    model = create_model(model_name, num_classes=6).eval()
    images, labels, _ = make_shapes(40, seed=seed)
    tf = build_eval_transform(DatasetInfo("t", 6, list("abcdef"), 3, (32, 32), (0.5,) * 3, (0.25,) * 3), (32, 32))
    loader = [(images[:24], labels[:24]), (images[24:], labels[24:])]
    return model, labels, tf, loader, tf(images)


def test_flip_tta_scores_the_mean_of_the_image_and_mirror_logits():
    from vitlab.train.engine import evaluate

    model, labels, tf, loader, x = _tta_case("vit_mini_patch4_32", seed=3)
    with torch.no_grad():
        plain, mirror = model(x), model(x.flip(-1))
    mean = (plain + mirror) / 2
    res = evaluate(model, loader, tf, torch.device("cpu"), None, 6, tta="flip")
    assert res["acc"] == pytest.approx(100 * (mean.argmax(-1) == labels).float().mean().item())
    assert res["loss"] == pytest.approx(torch.nn.functional.cross_entropy(mean, labels).item(), rel=1e-5)
    off = evaluate(model, loader, tf, torch.device("cpu"), None, 6)
    assert off["loss"] == pytest.approx(torch.nn.functional.cross_entropy(plain, labels).item(), rel=1e-5)
    assert (mean - plain).abs().max() > 1e-3  # the mirror changes the logits, so the two checks differ
    both = evaluate(model, loader, tf, torch.device("cpu"), None, 6, tta="flip", also_tta=True)  # what --run.tta logs
    assert both["acc"] == off["acc"] and both["loss"] == pytest.approx(off["loss"], rel=1e-6)
    assert both["acc_tta"] == pytest.approx(res["acc"]) and "acc_tta" not in off


def test_flip_tta_alongside_plain_on_a_distilled_model_averages_both_heads_of_both_views():
    from vitlab.train.engine import evaluate

    model, labels, tf, loader, x = _tta_case("deit_mini_distilled_patch4_32", seed=4)
    with torch.no_grad():
        views = [model.forward_head(model.forward_features(v), separate=True) for v in (x, x.flip(-1))]
    plain = (views[0][0] + views[0][1]) / 2
    tta = (plain + (views[1][0] + views[1][1]) / 2) / 2
    res = evaluate(model, loader, tf, torch.device("cpu"), None, 6, separate_heads=True, tta="flip", also_tta=True)
    assert res["acc"] == pytest.approx(100 * (plain.argmax(-1) == labels).float().mean().item())
    assert res["acc_tta"] == pytest.approx(100 * (tta.argmax(-1) == labels).float().mean().item())
    assert res["acc_cls_head"] == pytest.approx(100 * (views[0][0].argmax(-1) == labels).float().mean().item())
    # without also_tta the TTA prediction is the primary one, so there is no separate acc_tta
    alone = evaluate(model, loader, tf, torch.device("cpu"), None, 6, separate_heads=True, tta="flip")
    assert alone["acc"] == pytest.approx(res["acc_tta"]) and "acc_tta" not in alone


def test_flip_shift_views_move_the_image_and_its_mirror_one_pixel_each_way():
    from vitlab.train.engine import tta_views

    x = torch.arange(2 * 1 * 4 * 5, dtype=torch.float32).view(2, 1, 4, 5)
    views = tta_views(x, "flip-shift")
    assert len(views) == 10 and all(v.shape == x.shape for v in views)
    assert torch.equal(views[0], x) and torch.equal(views[5], x.flip(-1))
    down, right = views[2], views[4]  # (dy, dx) = (1, 0) and (0, 1): the content moves down / right
    assert torch.equal(down[..., 1:, :], x[..., :-1, :]) and torch.equal(down[..., 0, :], x[..., 1, :])  # reflected edge
    assert torch.equal(right[..., :, 1:], x[..., :, :-1]) and torch.equal(right[..., :, 0], x[..., :, 1])
    up, left = views[1], views[3]
    assert torch.equal(up[..., :-1, :], x[..., 1:, :]) and torch.equal(left[..., :, :-1], x[..., :, 1:])
    assert torch.equal(views[9][..., :, 1:], x.flip(-1)[..., :, :-1])  # the mirror, moved right
    assert [len(tta_views(x, k)) for k in ("none", "flip")] == [1, 2]
    with pytest.raises(UserError, match="unknown TTA 'mirror'"):
        tta_views(x, "mirror")


def test_flip_shift_tta_scores_the_mean_logits_of_ten_views():
    from vitlab.train.engine import evaluate, tta_views

    model, labels, tf, loader, x = _tta_case("vit_mini_patch4_32", seed=5)
    with torch.no_grad():
        mean = torch.stack([model(v) for v in tta_views(x, "flip-shift")]).mean(0)
        flip = (model(x) + model(x.flip(-1))) / 2
    assert (mean - flip).abs().max() > 1e-3  # the shifts change the answer, so the check can fail
    res = evaluate(model, loader, tf, torch.device("cpu"), None, 6, tta="flip-shift")
    assert res["acc"] == pytest.approx(100 * (mean.argmax(-1) == labels).float().mean().item())
    assert res["loss"] == pytest.approx(torch.nn.functional.cross_entropy(mean, labels).item(), rel=1e-5)


def test_compile_auto_only_for_long_single_process_runs():
    from types import SimpleNamespace

    from vitlab.train.engine import AUTO_COMPILE_MIN_STEPS, resolve_compile

    one, two = SimpleNamespace(enabled=False), SimpleNamespace(enabled=True)
    assert resolve_compile(None, AUTO_COMPILE_MIN_STEPS, one)[0] is True
    on, note = resolve_compile(None, AUTO_COMPILE_MIN_STEPS - 1, one)
    assert on is False and f"{AUTO_COMPILE_MIN_STEPS - 1} steps" in note
    assert resolve_compile(None, 10**6, two)[0] is False
    assert resolve_compile(True, 1, two)[0] is True and resolve_compile(False, 10**6, one)[0] is False
    assert build_config("shapes", {}).run.compile is None  # presets leave it to auto unless they ran otherwise


def test_clock_schedule_progress_carries_over_a_resume():
    from vitlab.train.engine import clock_progress

    t0 = 1000.0
    assert clock_progress(t0 + 30, t0, 0.0, 60, 0.0) == 0.5  # half of a one-minute budget
    assert clock_progress(t0 + 30, t0, 0.0, 60, 20.0) == 0.75  # 20 s kept for the last evaluation
    # resumed after 30 s of training: the schedule goes on from the middle, not from its start
    assert clock_progress(t0, t0, 30.0, 60, 0.0) == 0.5
    assert clock_progress(t0 + 15, t0, 30.0, 60, 0.0) == 0.75
    assert clock_progress(t0 + 90, t0, 30.0, 60, 0.0) == 1.0  # capped at the end


def test_a_resumed_time_limited_run_keeps_back_its_last_evaluation_time():
    from vitlab.train.engine import eval_reserve

    assert eval_reserve([]) == 0.0  # nothing measured yet
    history = [{"epoch": 1, "eval_time": 4.0}, {"epoch": 2}, {"epoch": 3, "eval_time": 2.5}, {"epoch": 4}]
    assert eval_reserve(history) == 3.5  # the latest evaluation (epoch 3), 1 s more
    assert eval_reserve(history[:2]) == 5.0


def test_decoding_workers_default_to_two_on_a_cpu_and_the_cores_per_process_with_a_gpu(monkeypatch):
    from vitlab.train.engine import resolve_workers

    cpu, gpu = torch.device("cpu"), torch.device("cuda", 0)  # (a device object; no GPU is touched)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)))
    assert resolve_workers(None, cpu) == 2  # the training step needs the CPU's cores
    assert resolve_workers(None, gpu) == 8  # 16 cores, capped at 8
    assert resolve_workers(None, gpu, world_size=4) == 3  # 4 cores per process, one for the process itself
    assert resolve_workers(None, gpu, world_size=16) == 2  # never fewer than the CPU default
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    assert resolve_workers(None, gpu) == 2
    assert resolve_workers(0, gpu) == 0 and resolve_workers(5, cpu) == 5  # as asked
    with pytest.raises(UserError, match="num_workers"):
        resolve_workers(-1, cpu)


def test_compiled_training_matches_eager(tmp_path):
    """--run.compile: the same run, the same numbers up to float reassociation."""
    from vitlab.train import engine

    common = [*FAST, "--epochs", "1", "--data.subset", "256", "--out", str(tmp_path), "--model.drop_path_rate", "0"]
    eager = engine.train(build_config(None, parse_overrides([*common, "--run.name", "eager"])))
    comp = engine.train(build_config(None, parse_overrides([*common, "--run.name", "comp", "--run.compile", "true"])))
    (e,), (c,) = metrics(eager), metrics(comp)
    assert c["train_loss"] == pytest.approx(e["train_loss"], rel=1e-3)
    assert c["test_loss"] == pytest.approx(e["test_loss"], rel=1e-2)


def test_compile_failure_falls_back_to_eager_with_a_note(tmp_path, monkeypatch, capsys):
    import torch._dynamo.exc as dexc

    from vitlab.train import engine

    class Broken(torch.nn.Module):  # what torch.compile hands back on a machine with no C++ compiler
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, x):
            raise dexc.InternalTorchDynamoError("no working C++ compiler found")

    monkeypatch.setattr(engine.torch, "compile", lambda m, **kw: Broken(m))
    common = [*FAST, "--epochs", "1", "--data.subset", "256", "--out", str(tmp_path)]
    ref = engine.train(build_config(None, parse_overrides([*common, "--run.name", "ref"])))
    run = engine.train(build_config(None, parse_overrides([*common, "--run.name", "fb", "--run.compile", "true"])))
    assert "torch.compile failed (InternalTorchDynamoError: no working C++ compiler found)" in capsys.readouterr().out
    assert comparable(metrics(run)) == comparable(metrics(ref))


def test_native_kernels_that_fail_to_build_are_one_note(tmp_path, monkeypatch, capsys):
    """A compiled CPU run whose native kernels do not build says so once and trains on."""
    from test_native import as_if_linux_x86_with_the_flags, fake_compiler

    from vitlab.models import native
    from vitlab.train import engine

    monkeypatch.setenv("CC", str(fake_compiler(tmp_path / "cc", "error: broken")))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv("VITLAB_NATIVE", raising=False)
    as_if_linux_x86_with_the_flags(monkeypatch)  # a CPU that could run it
    monkeypatch.setattr(engine.torch, "compile", lambda m, **kw: m)  # the note, not compiling, is under test
    native._decide.cache_clear()
    try:
        common = [*FAST, "--epochs", "1", "--data.subset", "64", "--out", str(tmp_path)]
        engine.train(build_config(None, parse_overrides([*common, "--run.name", "k", "--run.compile", "true"])))
        out = capsys.readouterr().out
        assert out.count("note: building vitlab's kernels failed") == 1
        assert "(cc failed: error: broken); GELU, attention and the Linears' weight gradients run on ATen's" in out
        engine.train(build_config(None, parse_overrides([*common, "--run.name", "e", "--run.compile", "false"])))
        assert "vitlab's kernels" not in capsys.readouterr().out  # eager: nothing to say
    finally:
        native._decide.cache_clear()


def test_two_processes_agree_with_one(tmp_path):
    # Same global batch (64): one process with 64, or two with 32 each. No randomness
    # that differs per process (no augmentation, no dropout), fp32.
    common = [*FAST, "--epochs", "2", "--out", str(tmp_path), "--aug.hflip", "0", "--aug.crop_padding", "0",
              "--aug.mixup_alpha", "0", "--model.drop_path_rate", "0", "--run.threads", "1"]
    r = cli("train", *common, "--run.name", "single")
    assert r.returncode == 0, r.stderr[-2000:]
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                        "--master_port", "29611", "-m", "vitlab.cli", "train", *common, "--run.name", "ddp"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    one, two = metrics(tmp_path / "single"), metrics(tmp_path / "ddp")
    assert len(one) == len(two) == 2
    for a, b in zip(one, two):
        assert a["step"] == b["step"]
        assert math.isclose(a["train_loss"], b["train_loss"], rel_tol=1e-3)
        assert math.isclose(a["test_loss"], b["test_loss"], rel_tol=1e-3)
        assert abs(a["test_acc"] - b["test_acc"]) <= 0.5


def test_auto_precision_on_a_gpu_wants_native_bf16_not_emulated(monkeypatch):
    from vitlab.train.engine import resolve_precision

    gpu = torch.device("cuda", 0)  # a device object only: nothing runs on it
    # a V100 / T4: torch's default answer counts bf16 emulation as support
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)
    assert resolve_precision("auto", gpu)[0] == torch.float16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)  # Ampere and later
    assert resolve_precision("auto", gpu)[0] == torch.bfloat16


def test_auto_precision_follows_the_measured_matmul_rates(monkeypatch):
    from vitlab.train import engine

    cpu = torch.device("cpu")
    monkeypatch.setattr(engine, "cpu_has_bf16", lambda: True)
    monkeypatch.setattr(engine, "cpu_matmul_rates", lambda: (300.0, 160.0))  # bf16 slower (no AMX)
    dtype, note = engine.resolve_precision("auto", cpu)
    assert dtype is None and "160" in note and "300" in note
    monkeypatch.setattr(engine, "cpu_matmul_rates", lambda: (190.0, 850.0))  # AMX / fast bf16
    dtype, note = engine.resolve_precision("auto", cpu)
    assert dtype == torch.bfloat16 and "auto" in note and "850" in note and "190" in note  # the choice and why
    monkeypatch.setattr(engine, "cpu_has_bf16", lambda: False)
    assert engine.resolve_precision("auto", cpu)[0] is None
    assert engine.resolve_precision("bf16", cpu)[0] == torch.bfloat16  # asked for explicitly: always honoured


def test_run_files_get_an_ordinary_mode(tmp_path):
    import os

    from vitlab.models import create_model
    from vitlab.train.checkpoint import save_model
    from vitlab.utils import atomic_write_text

    old = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "a.txt", "x")
        # safetensors' writer recreates the file: the weights came out 0600, unreadable to others
        save_model(tmp_path / "model.safetensors", create_model("vit_mini_patch4_32"), {})
    finally:
        os.umask(old)
    assert (tmp_path / "a.txt").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "model.safetensors").stat().st_mode & 0o777 == 0o644


def test_time_budgeted_schedule_fits_the_limit(tmp_path):
    # 50 epochs is only an upper bound: the cosine runs on the clock and ends with the budget.
    r = cli("train", *FAST, "--data.subset", "256", "--epochs", "50", "--run.time_limit", "0.3",
            "--sched.by_time", "--lr", "1e-3", "--out", str(tmp_path), "--run.name", "budget", "--run.eval_every", "100")
    assert r.returncode == 0, r.stderr[-2000:]
    rows = metrics(tmp_path / "budget")
    assert 1 <= len(rows) < 50 and "time limit of 0.3 min reached" in r.stdout
    assert "test_acc" in rows[-1] and not any("test_acc" in row for row in rows[:-1])  # the epoch the clock ended is scored
    # the last line says the clock ended the run (vitlab ablate then counts it done, not one to resume)
    assert rows[-1]["stopped"] == "time_limit" and not any("stopped" in row for row in rows[:-1])
    from vitlab.train.ablate import _done

    assert _done(tmp_path / "budget", 50)
    r = cli("train", "--resume", str(tmp_path / "budget"))  # nothing left on its clock: refused, not one more epoch
    assert r.returncode == 2 and "used all of its --run.time_limit (0.3 min)" in r.stderr, r.stderr
    assert rows[-1]["wall_time"] < 0.3 * 60 + 5  # the final evaluation fits in the budget too (+ slack)
    peak = 1e-3 * 64 / 128
    assert max(row["lr"] for row in rows) > 0.3 * peak  # it went up...
    assert rows[-1]["lr"] < 0.1 * peak  # ...and came down to (near) the floor by the end
    r = cli("train", *FAST, "--sched.by_time", "--out", str(tmp_path))
    assert r.returncode == 2 and "--run.time_limit" in r.stderr


def test_ablate_runs_the_ladder_and_writes_its_table_chart_and_record(tmp_path):
    r = cli("ablate", "--data", "shapes", "--debug", "--epochs", "1", "--rungs", "2", "--run.precision", "fp32",
            "--out", str(tmp_path))
    assert r.returncode == 0, r.stderr[-2000:]
    out = next(tmp_path.glob("ablation-*"))
    rec = json.loads((out / "ablation.json").read_text())
    assert [g["rung"] for g in rec["rungs"]] == ["Baseline (SGD)", "+ AdamW"]
    assert rec["rungs"][0]["settings"]["optim.name"] == "sgd" and rec["rungs"][1]["settings"]["optim.name"] == "adamw"
    # each rung is a real run with the ladder's settings, scored on the test split
    from vitlab.config import load_yaml

    for k, name in enumerate(["sgd", "adamw"]):
        cfg = load_yaml(out / f"rung{k}" / "config.yaml")
        assert cfg["optim"]["name"] == name
        assert rec["rungs"][k]["acc"] == metrics(out / f"rung{k}")[-1]["test_acc"]
    table = (out / "ablation.md").read_text()
    assert "| Baseline (SGD) |" in table and "| + AdamW |" in table
    assert "on shapes (512 training images), 1 epoch," in table and rec["subset"] == 512  # --debug's cap said
    assert rec["train_images"] == 512  # counted on the data the rungs loaded
    assert (out / "ablation.png").stat().st_size > 1000
    # a second call reuses the finished rungs instead of training them again
    r = cli("ablate", "--data", "shapes", "--debug", "--epochs", "1", "--rungs", "2", "--run.precision", "fp32",
            "--out", str(tmp_path))
    assert r.returncode == 0 and r.stdout.count("already done") + r.stderr.count("already done") == 2, r.stderr
    assert "(512 training images)" in (out / "ablation.md").read_text()  # the count kept, though no data loaded
    # ...but not rungs trained with other settings: their accuracy would go under this ladder's labels
    before = [(out / f).read_text() for f in ("ablation.md", "rung0/metrics.jsonl", "rung1/config.yaml")]
    r = cli("ablate", "--data", "shapes", "--debug", "--epochs", "1", "--rungs", "2", "--run.precision", "fp32",
            "--seed", "1", "--out", str(tmp_path))
    assert r.returncode == 2 and "run.seed 0 there, 1 now" in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert [(out / f).read_text() for f in ("ablation.md", "rung0/metrics.jsonl", "rung1/config.yaml")] == before
    # an unknown model or dataset: one line before any folder is made
    for flag, name in (("--model", "nosuch"), ("--data", "nosuch")):
        r = cli("ablate", flag, name, "--debug", "--out", str(tmp_path / "bad"))
        assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and r.stdout == "", (r.stdout, r.stderr)
        assert f"unknown {'model' if flag == '--model' else 'dataset'} 'nosuch'" in r.stderr
    assert not (tmp_path / "bad").exists()


def test_leaving_the_process_group_is_bounded(monkeypatch, tmp_path, capsys):
    """destroy_process_group() sometimes hangs (pytorch/pytorch#75097); past the final barrier every
    file is written, so shutdown waits DESTROY_TIMEOUT_S at most, says so in one line, and returns.
    The normal path tears the group down and says nothing. A one-process gloo group stands in."""
    import threading

    import torch.distributed as dist
    from vitlab.train import distributed

    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store1"), 1), rank=0, world_size=1)
    real, release = dist.destroy_process_group, threading.Event()
    monkeypatch.setattr(dist, "destroy_process_group", lambda *a, **k: release.wait(60))  # a teardown that hangs
    t0 = time.monotonic()
    distributed.shutdown(distributed.DistInfo(rank=0, world_size=2), timeout_s=0.5)
    assert time.monotonic() - t0 < 10
    err = capsys.readouterr().err
    assert "leaving the process group took over 0 s" in err and len(err.strip().splitlines()) == 1
    release.set()
    monkeypatch.undo()
    real()
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store2"), 1), rank=0, world_size=1)
    distributed.shutdown(distributed.DistInfo(rank=0, world_size=2))
    assert not dist.is_initialized() and capsys.readouterr().err == ""
