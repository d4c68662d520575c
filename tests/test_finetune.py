"""Fine-tuning: `vitlab finetune` from saved "pretrained" weights, offline, on tiny real-format fixtures."""

import json
import subprocess
import sys

import torch
from safetensors.torch import load_file

from vitlab.models import create_model
from vitlab.train.checkpoint import save_model
from vitlab.train.optim import param_groups

from test_data_sources import write_flowers, write_odd_folder
from test_pretrained import hf_model

QUICK = ["--epochs", "2", "--batch-size", "4", "--data.num_workers", "0", "--run.precision", "fp32",
         "--run.log_every", "1", "--sched.warmup_epochs", "0.5"]


def cli(*args):
    return subprocess.run([sys.executable, "-m", "vitlab.cli", *args], capture_output=True, text=True, timeout=300)


def backbone(state):
    return {k: v for k, v in state.items() if not k.startswith("head")}


def test_layer_decay_scales_each_layer_and_keeps_the_head_at_full_rate():
    model = create_model("vit_mini_patch4_32")  # depth 4
    groups = param_groups(model, 0.05, layer_decay=0.5)
    name_of = {id(p): n for n, p in model.named_parameters()}
    scale = {name_of[id(p)]: g["lr_scale"] for g in groups for p in g["params"]}
    assert scale["head.weight"] == scale["norm.weight"] == 1.0
    assert scale["blocks.3.mlp.fc1.weight"] == 0.5 and scale["blocks.3.norm1.bias"] == 0.5
    assert scale["blocks.0.attn.qkv.weight"] == 0.5**4
    assert scale["patch_embed.proj.weight"] == scale["pos_embed"] == scale["cls_token"] == 0.5**5
    assert len(scale) == len(list(model.parameters()))
    wd = {name_of[id(p)]: g["weight_decay"] for g in groups for p in g["params"]}
    assert wd["blocks.0.attn.qkv.weight"] == 0.05 and wd["blocks.0.attn.qkv.bias"] == 0.0 and wd["pos_embed"] == 0
    # without layer decay: the two plain groups
    assert [g["name"] for g in param_groups(model, 0.05)] == ["decay", "no_decay"]


def test_finetune_hf_checkpoint_on_flowers_layout_end_to_end(tmp_path):
    write_flowers(tmp_path / "data" / "flowers-102", n=24, classes=3)
    _, pre = hf_model(tmp_path, num_labels=7)  # 7 pretrained classes -> a new 3-class head
    (pre / "preprocessor_config.json").write_text(json.dumps({"image_mean": [0.5] * 3, "image_std": [0.5] * 3}))
    r = cli("finetune", "--pretrained", str(pre), "--data", "flowers102", "--data-dir", str(tmp_path / "data"),
            *QUICK, "--optim.layer_decay", "0.7", "--out", str(tmp_path / "runs"), "--run.name", "ft")
    assert r.returncode == 0, r.stderr[-3000:]
    run = tmp_path / "runs" / "ft"
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [row["epoch"] for row in rows] == [1, 2] and "val_acc" in rows[-1]
    test = json.loads((run / "test.json").read_text())  # the best-by-val weights scored on the test split
    assert test["n"] == 8 and 0.0 <= test["acc"] <= 100.0
    assert "test accuracy of the best-by-val weights" in r.stdout
    assert "top5" not in r.stdout  # 100% by definition with three classes: not shown
    from safetensors import safe_open

    with safe_open(str(run / "model.safetensors"), "pt") as f:
        meta = f.metadata()
    assert json.loads(meta["mean"]) == [0.5] * 3 and json.loads(meta["std"]) == [0.5] * 3  # the weights' own
    assert json.loads(meta["img_size"]) == [32, 32]  # the checkpoint's resolution, not the decode default
    state = load_file(run / "model.safetensors")
    assert state["head.weight"].shape == (3, 32)
    from vitlab.models.pretrained import load_pretrained

    src = load_pretrained(pre)[0].state_dict()
    # the backbone was trained: it moved away from the pretrained weights
    assert not torch.equal(state["blocks.0.attn.proj.weight"], src["blocks.0.attn.proj.weight"])
    assert state["blocks.0.attn.proj.weight"].shape == src["blocks.0.attn.proj.weight"].shape
    cfg = (run / "config.yaml").read_text()
    assert "layer_decay: 0.7" in cfg and str(pre) in cfg


def test_linear_probe_keeps_the_backbone_exactly(tmp_path):
    write_odd_folder(tmp_path / "pets")
    base = create_model("vit_mini_patch4_32", num_classes=5, img_size=16)
    save_model(tmp_path / "pre.safetensors", base, {"mean": [0.3] * 3, "std": [0.2] * 3})
    r = cli("finetune", "--pretrained", str(tmp_path / "pre.safetensors"), "--data", f"imagefolder:{tmp_path / 'pets'}",
            "--data.val_fraction", "0.3", *QUICK, "--model.freeze", "backbone", "--optim.lr", "0.1",
            "--out", str(tmp_path / "runs"), "--run.name", "probe")
    assert r.returncode == 0, r.stderr[-3000:]
    state = load_file(tmp_path / "runs" / "probe" / "model.safetensors")
    before = base.state_dict()
    for k, v in backbone(state).items():
        assert torch.equal(v, before[k]), k
    assert state["head.weight"].shape == (2, 128)  # cat / dog
    assert "no validation split" not in r.stdout + r.stderr  # (--data.val_fraction 0.3)
    # a paused fine-tune resumes without its source weights (moved, deleted, or a relative path typed
    # elsewhere): the run's own weights file says what the model is, and last.ckpt holds the weights;
    # unnamed, the run is named after the weights' architecture (not model.name, which finetune ignores)
    r = cli("finetune", "--pretrained", str(tmp_path / "pre.safetensors"), "--data", f"imagefolder:{tmp_path / 'pets'}",
            "--data.val_fraction", "0.3", *QUICK, "--out", str(tmp_path / "unnamed"), "--run.stop_after", "1",
            "--drop-path", "0.0")
    assert r.returncode == 0, r.stderr[-3000:]
    paused = next((tmp_path / "unnamed").iterdir())
    assert paused.name.startswith("vit_mini_patch4_32-imagefolder-"), paused.name
    (tmp_path / "pre.safetensors").unlink()
    r = cli("train", "--resume", str(paused), "--drop-path", "0.2")  # a drop rate may change on a resume...
    assert r.returncode == 0, r.stderr[-3000:]
    rows = [json.loads(line) for line in (paused / "metrics.jsonl").read_text().splitlines()]
    assert [row["epoch"] for row in rows] == [1, 2]
    from vitlab.config import build_config, parse_overrides
    from vitlab.train.engine import resumed_pretrained

    model, meta = resumed_pretrained(paused, build_config(None, parse_overrides(["--drop-path", "0.2"])))
    assert model.arch["kwargs"]["drop_path_rate"] == 0.2 and model.training  # ...and the resumed model has it
    assert model.arch["kwargs"]["embed_dim"] == 128 and meta["mean"] == [0.3] * 3  # the source's, from the run


def test_finetune_without_weights_or_with_bad_weights_is_one_line(tmp_path):
    r = cli("finetune", "--data", "shapes")
    assert r.returncode == 2 and "--pretrained" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    (tmp_path / "bad.safetensors").write_bytes(b"\x00" * 64)
    r = cli("finetune", "--pretrained", str(tmp_path / "bad.safetensors"), "--data", "shapes", "--epochs", "1")
    assert r.returncode == 2 and "bad.safetensors" in r.stderr and "Traceback" not in r.stderr
    r = cli("finetune", "--pretrained", str(tmp_path / "bad.safetensors"), "--optim.layer_decay", "1.5")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1


def test_grayscale_data_into_an_rgb_checkpoint_is_a_clear_error(tmp_path):
    base = create_model("vit_mini_patch4_32", num_classes=10)
    save_model(tmp_path / "pre.safetensors", base)
    from test_data_sources import write_idx_set

    write_idx_set(tmp_path / "fm", size=32)
    r = cli("finetune", "--pretrained", str(tmp_path / "pre.safetensors"), "--data", "fashion-mnist",
            "--data-dir", str(tmp_path / "fm"), "--epochs", "1")
    assert r.returncode == 2 and "3-channel" in r.stderr and "Traceback" not in r.stderr, r.stderr
