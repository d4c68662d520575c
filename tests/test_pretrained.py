"""Pretrained weights: every source format loads exactly, export round-trips through transformers.

No network: Hugging Face models are built at random and saved with
`save_pretrained`; timm / Google .npz / torchvision files are written from a
vitlab model's weights by converters written here from the published layouts
(../shared/docs/ANCHORS.md), independently of vitlab's loader.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import vitlab
from vitlab.cli import main as cli_main
from vitlab.errors import UserError
from vitlab.models import VisionTransformer, build_from_arch
from vitlab.models.pretrained import load_pretrained
from vitlab.train.checkpoint import save_model

transformers = pytest.importorskip("transformers")  # in the `test` extra; needed for the HF half


# -- helpers ---------------------------------------------------------------------------
def scramble_(module, std=0.3, seed=0):
    """Replace every parameter with noise of a real model's scale, so a swapped
    or transposed tensor changes the output by far more than the tolerance."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return module


def small_vit(**kw):
    """A random vitlab ViT with a recorded architecture, small enough for CPU tests."""
    args = dict(img_size=32, patch_size=8, embed_dim=192, depth=2, num_heads=3, mlp_dim=96, num_classes=5)
    args.update(kw)
    model = build_from_arch({"name": "test_vit", "family": "vit", "kwargs": args})
    return scramble_(model, std=0.2).eval()


def images(model_or_shape, batch=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    if isinstance(model_or_shape, tuple):
        c, h, w = model_or_shape
    else:
        c, (h, w) = model_or_shape.in_chans, model_or_shape.img_size
    return torch.randn(batch, c, h, w, generator=g)


def hf_model(tmp_path, cls="ViTForImageClassification", name="hf", **cfg):
    args = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=32,
                patch_size=8, num_labels=4, attn_implementation="eager")
    args.update(cfg)
    attn = args.pop("attn_implementation")
    config = transformers.ViTConfig(**args)
    model = getattr(transformers, cls)(config)
    scramble_(model).eval()
    model.config._attn_implementation = attn
    out = tmp_path / name
    model.save_pretrained(out)
    return model, out


# -- Hugging Face ------------------------------------------------------------------------
def test_hf_classifier_matches_transformers_logits_and_carries_labels_and_normalisation(tmp_path):
    labels = {0: "daisy", 1: "rose", 2: "tulip", 3: "iris"}
    hf, d = hf_model(tmp_path, id2label=labels, label2id={v: k for k, v in labels.items()})
    transformers.ViTImageProcessor(image_mean=[0.4, 0.45, 0.5], image_std=[0.2, 0.25, 0.3],
                                   size={"height": 32, "width": 32}).save_pretrained(d)
    model, info = load_pretrained(d)
    x = images(model)
    with torch.no_grad():
        ref, got = hf(pixel_values=x).logits, model(x)
    assert (ref - got).abs().max() < 1e-4
    assert ref.abs().max() > 0.1  # the comparison is not between two near-zero tensors
    assert model.blocks[0].norm1.eps == 1e-12 and model.norm.eps == 1e-12  # HF's eps, carried over
    assert info["format"] == "hf" and info["classes"] == ["daisy", "rose", "tulip", "iris"]
    assert info["mean"] == (0.4, 0.45, 0.5) and info["std"] == (0.2, 0.25, 0.3)
    assert info["img_size"] == (32, 32) and info["head"] == "pretrained"


@pytest.mark.parametrize("cfg", [
    dict(layer_norm_eps=1e-6, qkv_bias=False),
    dict(image_size=(32, 48)),
    dict(num_channels=1, num_attention_heads=4, patch_size=16),
], ids=["eps1e-6-no-qkv-bias", "non-square-32x48", "one-channel-4-heads"])
def test_hf_config_variants_match_transformers(tmp_path, cfg):
    hf, d = hf_model(tmp_path, **cfg)
    model, info = load_pretrained(d)
    assert model.blocks[0].norm1.eps == cfg.get("layer_norm_eps", 1e-12)
    assert (model.blocks[0].attn.qkv.bias is not None) == cfg.get("qkv_bias", True)
    x = images(model)
    assert x.shape[1:] == (cfg.get("num_channels", 3), *((32, 48) if "image_size" in cfg else (32, 32)))
    with torch.no_grad():
        assert (hf(pixel_values=x).logits - model(x)).abs().max() < 1e-4
    assert info["classes"] is None  # LABEL_i placeholders are not class names
    assert info["mean"] == (0.5, 0.5, 0.5) == info["std"]  # HF ViT's default without a preprocessor config


def test_hf_backbone_from_pytorch_model_bin_matches_last_hidden_state(tmp_path):
    hf, d = hf_model(tmp_path, cls="ViTModel")  # with its pooler, which vitlab ignores
    # Write the legacy pickle format by hand (recent transformers only write safetensors).
    from safetensors.torch import load_file

    torch.save(load_file(d / "model.safetensors"), d / "pytorch_model.bin")
    (d / "model.safetensors").unlink()
    model, info = load_pretrained(d)
    assert model.num_classes == 0 and info["head"] == "none"
    x = images(model)
    with torch.no_grad():
        ref = hf(pixel_values=x).last_hidden_state
        assert (ref - model.forward_features(x)).abs().max() < 1e-4


def test_hf_non_exact_gelu_is_refused(tmp_path):
    _, d = hf_model(tmp_path, hidden_act="gelu_new")
    with pytest.raises(UserError, match="hidden_act 'gelu_new'"):
        load_pretrained(d)


def test_hub_id_goes_through_the_hub_fetcher(tmp_path, monkeypatch):
    import vitlab.models.pretrained as pre

    hf, d = hf_model(tmp_path)
    asked = []
    monkeypatch.setattr(pre, "fetch_hub", lambda repo: asked.append(repo) or d)
    model = vitlab.create_model("someone/tiny-vit", num_classes=4).eval()
    assert asked == ["someone/tiny-vit"] and model.pretrained_info["format"] == "hf"
    x = images(model)
    with torch.no_grad():
        assert (hf(pixel_values=x).logits - model(x)).abs().max() < 1e-4


def test_offline_hub_id_is_one_clear_line(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    r = subprocess.run([sys.executable, "-m", "vitlab.cli", "export", "--checkpoint",
                        "nobody-here/no-such-vit-model", "--out", str(tmp_path / "out")],
                       capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert "nobody-here/no-such-vit-model" in lines[0] and "cannot be fetched" in lines[0]
    assert "local" in lines[0] and "DIR" in lines[0]


# -- timm -----------------------------------------------------------------------------
def assert_same_weights(model, reference):
    a, b = model.state_dict(), reference.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("wrap", ["bare", "model", "state_dict", "model_ema", "safetensors", "ddp"])
def test_timm_state_dicts_round_trip_exactly(tmp_path, wrap):
    ref = small_vit(qkv_bias=wrap != "bare")  # also infers qkv_bias from the keys
    sd = {k: v.clone() for k, v in ref.state_dict().items()}  # timm names are vitlab's names
    if wrap == "safetensors":
        path = tmp_path / "vit.safetensors"
        save_file(sd, path)
    else:
        obj = {"bare": sd, "model": {"model": sd, "epoch": 3}, "state_dict": {"state_dict": sd, "epoch": 3},
               "model_ema": {"model_ema": sd}, "ddp": {f"module.{k}": v for k, v in sd.items()}}[wrap]
        path = tmp_path / "vit.pth"
        torch.save(obj, path)
    model, info = load_pretrained(path)
    assert info["format"] == "timm"
    assert model.blocks[0].attn.num_heads == 3  # width 192 -> ViT-Ti's 3 heads
    assert_same_weights(model, ref)
    x = images(model)
    with torch.no_grad():
        assert torch.equal(model(x), ref(x))


def test_timm_deit_distilled_round_trips(tmp_path):
    ref = small_vit(distilled=True)
    torch.save({"model": ref.state_dict()}, tmp_path / "deit_tiny_distilled.pth")
    model, info = load_pretrained(tmp_path / "deit_tiny_distilled.pth")
    assert model.distilled and model.pos_embed.shape[1] == 2 + 16
    assert_same_weights(model, ref)
    assert info["mean"] == (0.485, 0.456, 0.406)  # DeiT trained with ImageNet statistics
    x = images(model)
    with torch.no_grad():
        assert torch.equal(model(x), ref(x))


def test_timm_heads_of_a_non_standard_width_come_from_the_caller(tmp_path):
    ref = small_vit(embed_dim=48, num_heads=4, mlp_dim=64)
    torch.save(ref.state_dict(), tmp_path / "w.pth")
    with pytest.raises(UserError, match="num_heads="):
        load_pretrained(tmp_path / "w.pth")
    model, _ = load_pretrained(tmp_path / "w.pth", num_heads=4)
    x = images(model)
    with torch.no_grad():
        assert torch.equal(model(x), ref(x))


# -- Google .npz ------------------------------------------------------------------------
def to_google_npz(model) -> dict:
    """vitlab weights -> the original JAX ViT checkpoint layout (written from the layout, not the loader)."""
    s = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    D, h = model.embed_dim, model.blocks[0].attn.num_heads
    d = D // h
    w = {"embedding/kernel": s["patch_embed.proj.weight"].transpose(2, 3, 1, 0),  # OIHW -> HWIO
         "embedding/bias": s["patch_embed.proj.bias"], "cls": s["cls_token"],
         "Transformer/posembed_input/pos_embedding": s["pos_embed"],
         "Transformer/encoder_norm/scale": s["norm.weight"], "Transformer/encoder_norm/bias": s["norm.bias"],
         "head/kernel": s["head.weight"].T, "head/bias": s["head.bias"]}
    for i in range(len(model.blocks)):
        b, g = f"blocks.{i}.", f"Transformer/encoderblock_{i}/"
        a = g + "MultiHeadDotProductAttention_1/"
        qkv_w = s[b + "attn.qkv.weight"].reshape(3, h, d, D)  # rows: (q|k|v, head, head dim)
        qkv_b = s[b + "attn.qkv.bias"].reshape(3, h, d)
        for j, n in enumerate(("query", "key", "value")):
            w[a + f"{n}/kernel"] = qkv_w[j].transpose(2, 0, 1)  # (D, h, d)
            w[a + f"{n}/bias"] = qkv_b[j]  # (h, d)
        w[a + "out/kernel"] = s[b + "attn.proj.weight"].T.reshape(h, d, D)  # (h, d, D)
        w[a + "out/bias"] = s[b + "attn.proj.bias"]
        w[g + "LayerNorm_0/scale"], w[g + "LayerNorm_0/bias"] = s[b + "norm1.weight"], s[b + "norm1.bias"]
        w[g + "LayerNorm_2/scale"], w[g + "LayerNorm_2/bias"] = s[b + "norm2.weight"], s[b + "norm2.bias"]
        for j in (0, 1):
            w[g + f"MlpBlock_3/Dense_{j}/kernel"] = s[b + f"mlp.fc{j + 1}.weight"].T
            w[g + f"MlpBlock_3/Dense_{j}/bias"] = s[b + f"mlp.fc{j + 1}.bias"]
    return w


def test_google_npz_round_trips_exactly_with_heads_read_from_the_kernels(tmp_path):
    ref = small_vit(embed_dim=48, num_heads=4, mlp_dim=64)  # 4 heads: not the width-table default
    np.savez(tmp_path / "ViT-test.npz", **to_google_npz(ref))
    model, info = load_pretrained(tmp_path / "ViT-test.npz")
    assert info["format"] == "npz" and model.blocks[0].attn.num_heads == 4
    assert_same_weights(model, ref)
    x = images(model)
    with torch.no_grad():
        assert torch.equal(model(x), ref(x))


def test_google_npz_with_a_pre_logits_layer_loads_the_backbone_only(tmp_path):
    ref = small_vit()
    w = to_google_npz(ref)
    w["pre_logits/kernel"], w["pre_logits/bias"] = np.zeros((192, 192), np.float32), np.zeros(192, np.float32)
    np.savez(tmp_path / "in21k.npz", **w)
    model, info = load_pretrained(tmp_path / "in21k.npz")
    assert model.num_classes == 0 and info["head"] == "none" and "pre-logits" in info["notes"][0]
    x = images(model)
    with torch.no_grad():
        assert torch.equal(model.forward_features(x), ref.forward_features(x))


# -- torchvision ------------------------------------------------------------------------
def to_torchvision(model, legacy_mlp=False) -> dict:
    s = model.state_dict()
    fc1, fc2 = ("mlp.linear_1", "mlp.linear_2") if legacy_mlp else ("mlp.0", "mlp.3")
    tv = {"conv_proj.weight": s["patch_embed.proj.weight"], "conv_proj.bias": s["patch_embed.proj.bias"],
          "class_token": s["cls_token"], "encoder.pos_embedding": s["pos_embed"],
          "encoder.ln.weight": s["norm.weight"], "encoder.ln.bias": s["norm.bias"],
          "heads.head.weight": s["head.weight"], "heads.head.bias": s["head.bias"]}
    for i in range(len(model.blocks)):
        b, t = f"blocks.{i}.", f"encoder.layers.encoder_layer_{i}."
        pairs = {"ln_1": "norm1", "ln_2": "norm2", "self_attention.out_proj": "attn.proj", fc1: "mlp.fc1", fc2: "mlp.fc2"}
        for theirs, ours in pairs.items():
            for kind in ("weight", "bias"):
                tv[t + f"{theirs}.{kind}"] = s[b + f"{ours}.{kind}"]
        tv[t + "self_attention.in_proj_weight"] = s[b + "attn.qkv.weight"]
        tv[t + "self_attention.in_proj_bias"] = s[b + "attn.qkv.bias"]
    return tv


@pytest.mark.parametrize("legacy_mlp", [False, True], ids=["mlp.0/mlp.3", "mlp.linear_1/2"])
def test_torchvision_state_dict_round_trips_exactly(tmp_path, legacy_mlp):
    ref = small_vit()
    torch.save(to_torchvision(ref, legacy_mlp), tmp_path / "vit_b_16.pth")
    model, info = load_pretrained(tmp_path / "vit_b_16.pth")
    assert info["format"] == "torchvision" and model.blocks[0].norm1.eps == 1e-6
    assert info["mean"] == (0.485, 0.456, 0.406)
    assert_same_weights(model, ref)
    x = images(model)
    with torch.no_grad():
        assert torch.equal(model(x), ref(x))


# -- vitlab's own checkpoints -----------------------------------------------------------
def test_vitlab_checkpoint_keeps_classes_and_normalisation(tmp_path):
    ref = small_vit(num_classes=3, norm_eps=1e-5)
    save_model(tmp_path / "run" / "model.safetensors", ref,
               {"classes": ["a", "b", "c"], "mean": [0.1, 0.2, 0.3], "std": [0.3, 0.2, 0.1]})
    model, info = load_pretrained(tmp_path / "run")
    assert info["format"] == "vitlab" and info["classes"] == ["a", "b", "c"]
    assert info["mean"] == (0.1, 0.2, 0.3) and model.norm.eps == 1e-5
    assert_same_weights(model, ref)


# -- create_model: new head, new resolution, presets --------------------------------------
def test_class_count_change_gives_a_fresh_head_and_keeps_the_backbone(tmp_path):
    ref = small_vit()
    torch.save(ref.state_dict(), tmp_path / "w.pth")
    model = vitlab.create_model(tmp_path / "w.pth", num_classes=7).eval()
    assert model.head.weight.shape == (7, 192) and model.pretrained_info["head"] == "new"
    assert model.pretrained_info["classes"] is None and model.arch["kwargs"]["num_classes"] == 7
    assert model.head.bias.abs().sum() == 0 and model.head.weight.std() < 0.05  # fresh init, not copied
    x = images(model)
    with torch.no_grad():
        assert torch.equal(model.forward_features(x), ref.forward_features(x))
        assert model(x).shape == (2, 7)


def test_resolution_change_resamples_and_keeps_logits_close_at_the_original_grid(tmp_path):
    ref = small_vit()
    torch.save(ref.state_dict(), tmp_path / "w.pth")
    same = vitlab.create_model(tmp_path / "w.pth", img_size=32).eval()
    big = vitlab.create_model(tmp_path / "w.pth", img_size=64).eval()
    assert big.img_size == (64, 64) and big.pos_embed.shape == (1, 1 + 64, 192)
    assert torch.equal(big.pos_embed[:, :1], ref.pos_embed[:, :1])  # the [CLS] slot is not resampled
    assert big.arch["kwargs"]["img_size"] == [64, 64]  # a checkpoint of it rebuilds at 64 px
    x = images(ref)
    with torch.no_grad():
        assert torch.equal(same(x), ref(x))  # no resampling when the size does not change
        assert big(images(big)).shape == (2, 5)
        big.set_img_size(32)  # up and back down: bicubic is not exactly invertible, but close
        ref_logits, back = ref(x), big(x)
    assert (back - ref_logits).abs().max() < 0.25 * ref_logits.abs().max()
    assert torch.corrcoef(torch.stack([back.flatten(), ref_logits.flatten()]))[0, 1] > 0.95
    # a size the patches do not tile: one line naming the size (it was a ValueError traceback)
    with pytest.raises(UserError, match=r"cannot run at img_size 30: image height 30 is not divisible by the patch"):
        vitlab.models.pretrained.load_pretrained(tmp_path / "w.pth", img_size=30)


def test_preset_name_with_checkpoint_takes_heads_from_the_preset(tmp_path):
    ref = scramble_(vitlab.create_model("vit_tiny_patch4_32")).eval()  # 192 wide, 3 heads, 6 layers
    torch.save({"model": ref.state_dict()}, tmp_path / "tiny.pth")
    model = vitlab.create_model("vit_tiny_patch4_32", pretrained=tmp_path / "tiny.pth", num_classes=3)
    assert model.training and model.arch["name"] == "vit_tiny_patch4_32" and model.num_classes == 3
    model.eval()
    x = images(model)
    with torch.no_grad():
        assert torch.equal(model.forward_features(x), ref.forward_features(x))


def test_preset_and_checkpoint_of_another_architecture_is_a_clear_error(tmp_path):
    _, d = hf_model(tmp_path)
    with pytest.raises(UserError, match=r"not a vit_tiny_patch4_32: checkpoint has embed_dim=32 \(preset: 192\)"):
        vitlab.create_model("vit_tiny_patch4_32", pretrained=d)


def test_pretrained_true_without_a_default_source_says_so():
    with pytest.raises(UserError, match="no default pretrained weights for 'vit_tiny_patch4_32'"):
        vitlab.create_model("vit_tiny_patch4_32", pretrained=True)


# -- errors --------------------------------------------------------------------------------
def one_line(excinfo):
    msg = str(excinfo.value)
    assert "\n" not in msg
    return msg


def test_shape_mismatch_names_the_keys_with_expected_and_found_shapes(tmp_path):
    sd = small_vit().state_dict()
    sd["blocks.1.mlp.fc1.weight"] = torch.zeros(80, 192)
    del sd["norm.bias"]
    sd["extra.weight"] = torch.zeros(1)
    torch.save(sd, tmp_path / "bad.pth")
    with pytest.raises(UserError) as e:
        load_pretrained(tmp_path / "bad.pth")
    msg = one_line(e)
    assert "blocks.1.mlp.fc1.weight expected (96, 192) got (80, 192)" in msg
    assert "missing: norm.bias" in msg and "unexpected: extra.weight" in msg


def test_hf_weights_that_disagree_with_their_config_are_reported(tmp_path):
    _, d = hf_model(tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    cfg["intermediate_size"] = 48
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UserError, match=r"blocks.0.mlp.fc1.weight expected \(48, 32\) got \(64, 32\)"):
        load_pretrained(d)


@pytest.mark.parametrize("case", ["txt", "foreign-keys", "corrupt-safetensors", "corrupt-pth", "corrupt-npz",
                                  "pickled-object", "empty-dir", "missing", "run-dir-corrupt-weights"])
def test_unknown_formats_and_corrupt_files_are_one_line_user_errors(tmp_path, case):
    import argparse

    p = tmp_path / {"txt": "w.txt", "foreign-keys": "resnet.pth", "corrupt-safetensors": "w.safetensors",
                    "corrupt-pth": "w.pth", "corrupt-npz": "w.npz", "pickled-object": "train.pth",
                    "empty-dir": "empty", "missing": "nothing.pth", "run-dir-corrupt-weights": "run"}[case]
    if case == "txt":
        p.write_text("hello")
    elif case == "foreign-keys":
        torch.save({"conv1.weight": torch.zeros(1), "fc.weight": torch.zeros(1)}, p)
    elif case == "pickled-object":
        torch.save({"state_dict": {}, "args": argparse.Namespace(lr=0.1)}, p)
    elif case == "empty-dir":
        p.mkdir()
    elif case == "run-dir-corrupt-weights":  # a run whose weights file was cut short
        p.mkdir()
        (p / "model.safetensors").write_bytes(os.urandom(300))
    elif case != "missing":
        p.write_bytes(os.urandom(300))
    with pytest.raises(UserError) as e:
        load_pretrained(p)
    msg = one_line(e)
    expect = {"txt": "unknown checkpoint format", "foreign-keys": "unknown weights layout",
              "corrupt-safetensors": "not a readable safetensors", "corrupt-pth": "not a readable torch",
              "corrupt-npz": "not a readable .npz", "pickled-object": "pickled Python objects",
              "empty-dir": "neither a Hugging Face", "missing": "checkpoint not found",
              "run-dir-corrupt-weights": "model.safetensors is not a readable safetensors"}[case]
    assert expect in msg


# -- export ---------------------------------------------------------------------------------
@pytest.mark.parametrize("kw", [dict(), dict(qkv_bias=False, norm_eps=1e-12, img_size=(32, 48), in_chans=1)],
                         ids=["default", "no-bias-eps1e-12-32x48-gray"])
def test_export_loads_in_transformers_with_the_same_logits(tmp_path, kw):
    ref = small_vit(num_classes=3, **kw)
    save_model(tmp_path / "run" / "model.safetensors", ref, {"classes": ["cat", "dog", "owl"],
                                                              "mean": [0.5], "std": [0.25]})
    rc = cli_main(["export", "--checkpoint", str(tmp_path / "run"), "--out", str(tmp_path / "hf")])
    assert rc == 0
    hf = transformers.ViTForImageClassification.from_pretrained(tmp_path / "hf", attn_implementation="eager").eval()
    assert hf.config.id2label == {0: "cat", 1: "dog", 2: "owl"}
    assert hf.config.layer_norm_eps == kw.get("norm_eps", 1e-6) and hf.config.qkv_bias == kw.get("qkv_bias", True)
    pre = json.loads((tmp_path / "hf" / "preprocessor_config.json").read_text())
    assert pre["image_mean"] == [0.5] and pre["image_std"] == [0.25]
    assert pre["size"] == {"height": ref.img_size[0], "width": ref.img_size[1]}
    x = images(ref)
    with torch.no_grad():
        assert (hf(pixel_values=x).logits - ref(x)).abs().max() < 1e-4
    # ... and back into vitlab, exactly.
    back, info = load_pretrained(tmp_path / "hf")
    assert info["classes"] == ["cat", "dog", "owl"]
    assert_same_weights(back, ref)
    # A second export into the same directory needs --force.
    assert cli_main(["export", "--checkpoint", str(tmp_path / "run"), "--out", str(tmp_path / "hf")]) == 2


def test_export_of_an_image_file_run_prepares_images_as_vitlab_predict_does(tmp_path, capsys):
    """A run trained on image files saw 'shorter side to size*256/224, centre crop': the exported
    processor must do the same, or Hugging Face users get other answers than vitlab predict."""
    from PIL import Image

    from vitlab.data.files import read_image_file
    from vitlab.train.predict import to_batch

    ref = small_vit(num_classes=3)  # 32 px
    mean, std = [0.4, 0.45, 0.5], [0.2, 0.25, 0.3]
    save_model(tmp_path / "run" / "model.safetensors", ref, {"classes": ["a", "b", "c"], "mean": mean, "std": std,
                                                              "data": "imagefolder:photos"})
    (tmp_path / "run" / "last.ckpt").write_bytes(b"state")
    assert cli_main(["export", "--checkpoint", str(tmp_path / "run"), "--out", str(tmp_path / "hf")]) == 0
    processor = transformers.AutoImageProcessor.from_pretrained(tmp_path / "hf")
    rng = np.random.default_rng(0)
    for w, h in [(64, 40), (40, 56), (50, 50), (37, 90)]:  # wide, tall, square, and a 2.4:1 strip
        path = tmp_path / f"img_{w}x{h}.png"
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
        ours = to_batch([read_image_file(str(path), 3, (32, 32), crop=True)], mean, std)
        with Image.open(path) as img:
            theirs = processor(img.convert("RGB"), return_tensors="pt")["pixel_values"]
        assert theirs.shape == ours.shape and (theirs - ours).abs().max() < 1e-4, (w, h, (theirs - ours).abs().max())
    # not from a run's training state (last epoch's weights, no class names), and never into a run
    capsys.readouterr()
    assert cli_main(["export", "--checkpoint", str(tmp_path / "run" / "last.ckpt"), "--out", str(tmp_path / "x")]) == 2
    assert "resumable training state" in capsys.readouterr().err
    (tmp_path / "run" / "config.yaml").write_text("model: {}\n")  # ...nor as a fine-tune's source
    with pytest.raises(UserError, match="run's training state .*pass the run folder"):
        load_pretrained(tmp_path / "run" / "last.ckpt")
    assert cli_main(["export", "--checkpoint", str(tmp_path / "run"), "--out", str(tmp_path / "run"), "--force"]) == 2
    err = capsys.readouterr().err
    assert "holds a vitlab run" in err and len(err.strip().splitlines()) == 1
    assert load_pretrained(tmp_path / "run")[1]["format"] == "vitlab"  # untouched
    # nor among a folder of the user's own files without --force
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "cat.jpg").write_bytes(b"a user's photo")
    assert cli_main(["export", "--checkpoint", str(tmp_path / "run"), "--out", str(tmp_path / "photos")]) == 2
    err = capsys.readouterr().err
    assert "photos is not empty (1 other entry, e.g. cat.jpg)" in err and len(err.strip().splitlines()) == 1
    assert sorted(f.name for f in (tmp_path / "photos").iterdir()) == ["cat.jpg"]
    assert cli_main(["export", "--checkpoint", str(tmp_path / "run"), "--out", str(tmp_path / "photos"), "--force"]) == 0


def test_export_of_a_backbone_is_a_vitmodel(tmp_path):
    ref = small_vit(num_classes=0)
    save_model(tmp_path / "b.safetensors", ref)
    assert cli_main(["export", "--checkpoint", str(tmp_path / "b.safetensors"), "--out", str(tmp_path / "hf")]) == 0
    hf = transformers.ViTModel.from_pretrained(tmp_path / "hf", add_pooling_layer=False).eval()
    x = images(ref)
    with torch.no_grad():
        assert (hf(pixel_values=x).last_hidden_state - ref.forward_features(x)).abs().max() < 1e-4


def test_export_refuses_what_hf_vit_cannot_express(tmp_path, capsys):
    save_model(tmp_path / "ls.safetensors", small_vit(layer_scale=1e-5))
    assert cli_main(["export", "--checkpoint", str(tmp_path / "ls.safetensors"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "LayerScale" in err[0]
    from vitlab.models.export import export_hf

    with pytest.raises(UserError, match="not divisible by num_heads"):
        export_hf(VisionTransformer(img_size=32, patch_size=8, embed_dim=50, depth=1, num_heads=3), tmp_path / "o2")
    with pytest.raises(UserError, match="global_pool='avg'"):
        export_hf(small_vit(global_pool="avg"), tmp_path / "o3")
    with pytest.raises(UserError, match="conv stem"):
        export_hf(small_vit(conv_stem=(8,)), tmp_path / "o4")


# -- DeiT (distilled) through Hugging Face ------------------------------------------------
def test_hf_deit_with_teacher_matches_transformers_logits(tmp_path):
    cfg = transformers.DeiTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                                  image_size=32, patch_size=8, num_labels=3)
    hf = scramble_(transformers.DeiTForImageClassificationWithTeacher(cfg)).eval()
    hf.save_pretrained(tmp_path / "deit")
    model, info = load_pretrained(tmp_path / "deit")
    assert model.distilled and info["mean"] == (0.485, 0.456, 0.406)
    x = images(model)
    with torch.no_grad():
        out, (cls, dist) = hf(pixel_values=x), model.forward_head(model.forward_features(x), separate=True)
        assert (out.logits - model(x)).abs().max() < 1e-4
        assert (out.cls_logits - cls).abs().max() < 1e-4 and (out.distillation_logits - dist).abs().max() < 1e-4


def test_hf_deit_without_distillation_head_is_refused(tmp_path):
    cfg = transformers.DeiTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                                  image_size=32, patch_size=8, num_labels=3)
    transformers.DeiTForImageClassification(cfg).save_pretrained(tmp_path / "deit")
    with pytest.raises(UserError, match="no distillation head"):
        load_pretrained(tmp_path / "deit")


def test_distilled_model_exports_as_deit_with_the_same_logits(tmp_path):
    ref = small_vit(distilled=True, num_classes=3)
    save_model(tmp_path / "deit.safetensors", ref)
    assert cli_main(["export", "--checkpoint", str(tmp_path / "deit.safetensors"), "--out", str(tmp_path / "hf")]) == 0
    hf = transformers.DeiTForImageClassificationWithTeacher.from_pretrained(tmp_path / "hf").eval()
    x = images(ref)
    with torch.no_grad():
        assert (hf(pixel_values=x).logits - ref(x)).abs().max() < 1e-4
    back, _ = load_pretrained(tmp_path / "hf")
    assert_same_weights(back, ref)


def test_timm_hub_directory_takes_heads_from_the_name_and_labels_mean_std_size_from_its_config(tmp_path):
    # "vit_tiny" is vitlab's 512-wide, 6-head preset: the width table alone would say 8 heads.
    ref = small_vit(embed_dim=512, num_heads=6, depth=1, mlp_dim=64, patch_size=16, img_size=(32, 48), num_classes=2)
    d = tmp_path / "timm-repo"
    d.mkdir()
    save_file(ref.state_dict(), d / "model.safetensors")
    (d / "config.json").write_text(json.dumps({
        "architecture": "vit_tiny.test_tag", "num_classes": 2, "label_names": ["no", "yes"],
        "pretrained_cfg": {"input_size": [3, 32, 48], "mean": [0.1, 0.1, 0.1], "std": [0.9, 0.9, 0.9]}}))
    model, info = load_pretrained(d)
    assert info["format"] == "timm" and model.blocks[0].attn.num_heads == 6 and model.img_size == (32, 48)
    assert info["classes"] == ["no", "yes"] and info["mean"] == (0.1,) * 3 and info["std"] == (0.9,) * 3
    assert_same_weights(model, ref)


def test_hf_sharded_safetensors_load(tmp_path):
    from safetensors.torch import load_file

    hf, d = hf_model(tmp_path)
    state = load_file(d / "model.safetensors")
    (d / "model.safetensors").unlink()
    keys = sorted(state)
    shards = {"model-00001-of-00002.safetensors": keys[: len(keys) // 2],
              "model-00002-of-00002.safetensors": keys[len(keys) // 2:]}
    for name, ks in shards.items():
        save_file({k: state[k] for k in ks}, d / name, metadata={"format": "pt"})
    index = {"metadata": {}, "weight_map": {k: n for n, ks in shards.items() for k in ks}}
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    model, _ = load_pretrained(d)
    x = images(model)
    with torch.no_grad():
        assert (hf(pixel_values=x).logits - model(x)).abs().max() < 1e-4


def test_load_model_puts_the_whole_model_on_the_asked_device(tmp_path):
    # The engine's test pass after a run with a val split loads the best weights with
    # map_location=device; on a GPU the state went there but the model stayed on the CPU.
    # "meta" stands in for a GPU: any device other than the CPU shows the difference.
    from vitlab.train.checkpoint import load_model

    save_model(tmp_path / "w.safetensors", small_vit())
    model, _ = load_model(tmp_path / "w.safetensors", map_location="meta")
    assert {t.device.type for t in [*model.parameters(), *model.buffers()]} == {"meta"}
    model, _ = load_model(tmp_path / "w.safetensors")
    assert {t.device.type for t in model.parameters()} == {"cpu"}
