"""The ViT model: every preset trains, both attention paths agree, shapes and errors."""

import math

import pytest
import torch
import torch.nn.functional as F

import vitlab
from vitlab.models import PRESETS, VisionTransformer, count_params, create_model, resample_pos_embed
from vitlab.models.vit import Attention


def small_input(model, batch=2):
    torch.manual_seed(0)
    h, w = model.img_size
    return torch.randn(batch, model.in_chans, h, w)


@pytest.mark.parametrize("name", list(PRESETS))
def test_every_preset_trains_and_every_parameter_gets_a_gradient(name):
    torch.manual_seed(0)
    preset = PRESETS[name]
    # Keep the preset's architecture but shrink the image to two patches a side,
    # so even ViT-L runs in seconds.
    if preset.family == "vit":
        p = preset.kwargs["patch_size"]
        model = create_model(name, img_size=2 * p)
    else:
        model = create_model(name, img_size=32)
    x = small_input(model)
    out = model(x)
    if isinstance(out, tuple):  # distilled models return both heads in train mode
        assert len(out) == 2
        loss = sum(o.float().logsumexp(-1).mean() for o in out)
        assert out[0].shape == (2, model.num_classes)
    else:
        assert out.shape == (2, model.num_classes)
        loss = out.float().logsumexp(-1).mean()
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing, f"no/invalid gradient for {missing[:5]}"
    # Something actually flows into the first layer, not just zeros.
    first = next(p for n, p in model.named_parameters() if "conv" in n or "patch_embed" in n)
    assert first.grad.abs().sum() > 0


def test_exact_parameter_counts_of_the_seed_notebook_models():
    assert count_params(create_model("vit_b16")) == 86_567_656
    assert count_params(create_model("vit_tiny")) == 8_459_762


def test_known_parameter_counts_match_timm_and_torchvision():
    # Published counts: timm vit_tiny_patch16_224 5.72M, deit_tiny_distilled 5.91M,
    # torchvision resnet18 11,689,512.
    assert count_params(create_model("vit_tiny_patch16_224")) == 5_717_416
    assert count_params(create_model("deit_tiny_distilled_patch16_224")) == 5_910_800
    assert count_params(create_model("resnet18")) == 11_689_512


def test_timm_parameter_names():
    names = dict(create_model("deit_tiny_distilled_patch4_32").named_parameters())
    for key in ["patch_embed.proj.weight", "cls_token", "dist_token", "pos_embed", "blocks.0.norm1.weight",
                "blocks.0.attn.qkv.weight", "blocks.0.attn.qkv.bias", "blocks.0.attn.proj.weight",
                "blocks.0.norm2.bias", "blocks.0.mlp.fc1.weight", "blocks.0.mlp.fc2.bias", "norm.weight",
                "head.weight", "head_dist.bias"]:
        assert key in names, key
    assert names["pos_embed"].shape == (1, 64 + 2, 192)
    assert names["blocks.0.attn.qkv.weight"].shape == (3 * 192, 192)


def test_indivisible_heads_use_reduced_inner_width():
    attn = create_model("vit_tiny").blocks[0].attn  # 512 dims, 6 heads -> 85 per head
    assert attn.head_dim == 85 and attn.inner_dim == 510
    assert attn.qkv.weight.shape == (3 * 510, 512)
    assert attn.proj.weight.shape == (512, 510)
    assert math.isclose(attn.scale, 85**-0.5)


@pytest.mark.parametrize("name", ["vit_tiny_patch4_32", "vit_tiny", "deit_tiny_distilled_patch4_32"])
@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_fused_attention_equals_explicit_path(name, dropout):
    torch.manual_seed(0)
    model = create_model(name, drop_rate=dropout, attn_drop_rate=dropout, drop_path_rate=dropout).eval()
    x = small_input(model, batch=3)
    with torch.no_grad():
        fused = model(x)
        explicit, attns = model(x, return_attn=True)
    assert len(attns) == len(model.blocks)
    torch.testing.assert_close(fused, explicit, atol=1e-5, rtol=1e-5)


def test_fused_equals_explicit_in_train_mode_without_dropout():
    torch.manual_seed(0)
    model = create_model("vit_tiny_patch4_32", drop_path_rate=0.0).train()
    x = small_input(model)
    torch.testing.assert_close(model(x), model(x, return_attn=True)[0], atol=1e-5, rtol=1e-5)


def test_cpu_attention_kernel_rule(monkeypatch):
    # explicit softmax(QK^T)V where it is faster on a CPU (training, bf16 inference), sdpa for fp32
    # inference and for an inference batch whose (B, h, N, N) weights would be too big to hold
    calls = []
    sdpa = F.scaled_dot_product_attention
    monkeypatch.setattr(F, "scaled_dot_product_attention", lambda *a, **k: calls.append(1) or sdpa(*a, **k))
    torch.manual_seed(0)
    model = create_model("vit_mini_patch4_32").eval()
    x, depth = small_input(model), len(model.blocks)

    def fused_calls(fn):
        calls.clear()
        fn()
        return len(calls)

    assert fused_calls(lambda: model(x)) == 0  # grad enabled: the training path
    with torch.no_grad():
        assert fused_calls(lambda: model(x)) == depth  # fp32 inference
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert fused_calls(lambda: model(x)) == 0  # bf16 inference under autocast
        bf16 = create_model("vit_mini_patch4_32").eval().to(torch.bfloat16)
        assert fused_calls(lambda: bf16(x.bfloat16())) == 0  # bf16 weights (the frozen copy's case)
    attn = model.blocks[0].attn
    h, d = attn.num_heads, attn.head_dim
    n = 64  # h * n * n divides 2^28 (h = 4 here), so the limit itself is a batch size
    assert 2**28 % (h * n * n) == 0
    q = torch.empty(1, h, n, d, dtype=torch.bfloat16)
    with torch.no_grad():
        assert attn._explicit(q, n)
        edge = 2**28 // (h * n * n)
        assert attn._explicit(q.expand(edge, h, n, d), n)  # a view: nothing allocated
        assert not attn._explicit(q.expand(edge + 1, h, n, d), n)
        big = q.expand(edge + 1, h, n, d)
        with pytest.raises(ValueError, match="'auto', 'explicit' or 'sdpa'"):
            attn.path = "Explicit"
            attn._explicit(q, n)
        attn.path = "explicit"  # the benchmark's override wins over the rule
        assert attn._explicit(big, n)
        attn.path = "sdpa"
        assert not attn._explicit(q, n)


def test_bf16_explicit_attention_matches_sdpa():
    # the two kernels compute the same thing in bf16: within bf16's rounding of the logits
    torch.manual_seed(0)
    model = create_model("vit_tiny_patch4_32").eval()
    x = small_input(model, batch=4)
    with torch.no_grad():
        ref = model(x)  # fp32
        out = {}
        for path in ("explicit", "sdpa"):
            for m in model.modules():
                if isinstance(m, Attention):
                    m.path = path
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out[path] = model(x).float()
    for path, o in out.items():
        assert ((o - ref).norm() / ref.norm()).item() < 0.03, path
    assert ((out["explicit"] - out["sdpa"]).norm() / ref.norm()).item() < 0.03


def test_attention_against_hand_computation():
    torch.manual_seed(0)
    attn = Attention(dim=8, num_heads=2).eval()
    x = torch.randn(1, 5, 8)
    out, w = attn(x, return_attn=True)
    q, k, v = attn.qkv(x).split(8, dim=-1)  # rows ordered q | k | v, each head-major
    heads = []
    for h in range(2):
        s = slice(4 * h, 4 * h + 4)
        a = torch.softmax(q[0, :, s] @ k[0, :, s].T / math.sqrt(4), dim=-1)
        torch.testing.assert_close(w[0, h], a)
        heads.append(a @ v[0, :, s])
    torch.testing.assert_close(out[0], attn.proj(torch.cat(heads, dim=-1)), atol=1e-6, rtol=1e-5)


def test_attention_rows_sum_to_one():
    model = create_model("vit_tiny_patch4_32").eval()
    with torch.no_grad():
        _, attns = model(small_input(model), return_attn=True)
    for a in attns:
        assert a.shape == (2, 3, 65, 65)
        torch.testing.assert_close(a.sum(-1), torch.ones(2, 3, 65))
        assert (a >= 0).all()


def test_return_attn_is_per_call_not_a_mode():
    model = create_model("vit_tiny_patch4_32").eval()
    x = small_input(model)
    assert isinstance(model(x, return_attn=True), tuple)
    assert isinstance(model(x), torch.Tensor)  # the next plain call is the fused path again


def test_grayscale_and_non_square_inputs():
    model = VisionTransformer(img_size=(24, 40), patch_size=8, in_chans=1, num_classes=3, embed_dim=32,
                              depth=2, num_heads=2)
    assert model.patch_embed.grid_size == (3, 5)
    x = torch.randn(2, 1, 24, 40)
    assert model(x).shape == (2, 3)
    _, attns = model(x, return_attn=True)
    assert attns[0].shape == (2, 2, 1 + 15, 1 + 15)


def test_wrong_input_size_is_a_clear_error():
    model = create_model("vit_tiny_patch4_32")
    with pytest.raises(ValueError, match=r"expected 32x32 images, got 28x28"):
        model(torch.randn(1, 3, 28, 28))
    with pytest.raises(ValueError, match="expected 3-channel images, got 1"):
        model(torch.randn(1, 1, 32, 32))
    with pytest.raises(ValueError, match="not divisible by the patch size 4"):
        create_model("vit_tiny_patch4_32", img_size=30)
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        model(torch.randn(3, 32, 32))


def test_inputs_other_than_normalised_float_images_are_refused_in_one_line():
    """Raw uint8 pixels would otherwise need a cast to run and then predict garbage; float64 (numpy's
    default) and non-tensors would fail deep inside conv2d."""
    model = create_model("vit_mini_patch4_32")
    x = torch.rand(2, 3, 32, 32)
    with pytest.raises(TypeError, match=r"got torch.uint8 \(raw pixels\?\)"):
        model((x * 255).to(torch.uint8))
    with pytest.raises(TypeError, match=r"float64 images for a torch.float32 model; convert them with x.to"):
        model(x.double())
    with pytest.raises(TypeError, match="got ndarray"):
        model(x.numpy())
    assert model.double()(x.double()).dtype == torch.float64  # a float64 model takes float64 images


@pytest.mark.parametrize("kwargs, said", [
    (dict(drop_path_rate=1.0), "drop_path_rate must be in"), (dict(drop_path_rate=-0.5), "drop_path_rate must be in"),
    (dict(drop_rate=1.5), "drop_rate must be in"), (dict(attn_drop_rate=-0.1), "attn_drop_rate must be in"),
    (dict(num_heads=0), "num_heads must be at least 1"), (dict(num_classes=-1), "num_classes must be 0"),
    (dict(img_size="32"), "a size must be an int or"), (dict(img_size=(32,)), "a size must be an int or"),
])
def test_bad_constructor_arguments_are_one_line_at_build_time(kwargs, said):
    with pytest.raises(ValueError, match=said):
        create_model("vit_mini_patch4_32", **kwargs)


def test_unknown_model_names_the_closest():
    with pytest.raises(ValueError, match="did you mean 'vit_tiny_patch4_32'"):
        vitlab.create_model("vit_tiny_patch4_23")
    with pytest.raises(ValueError, match="did you mean 'vit_tiny_patch4_32'"):  # whatever the case
        vitlab.create_model("VIT_TINY_PATCH4_32")


def test_position_resampling_to_the_same_grid_is_identity():
    torch.manual_seed(0)
    pe = torch.randn(1, 1 + 8 * 8, 16)
    torch.testing.assert_close(resample_pos_embed(pe, (8, 8), (8, 8), 1), pe, atol=1e-5, rtol=1e-5)


def test_position_resampling_keeps_prefix_and_smooth_fields():
    # A linear ramp over the grid stays (nearly) a ramp after bicubic resizing.
    gy, gx = torch.meshgrid(torch.linspace(-1, 1, 8), torch.linspace(-1, 1, 8), indexing="ij")
    field = torch.stack([gx, gy], -1).reshape(1, 64, 2)
    prefix = torch.tensor([[[5.0, -5.0], [7.0, 7.0]]])
    out = resample_pos_embed(torch.cat([prefix, field], 1), (16, 16), (8, 8), num_prefix_tokens=2)
    assert out.shape == (1, 2 + 256, 2)
    torch.testing.assert_close(out[:, :2], prefix)
    grid = out[0, 2:].reshape(16, 16, 2)
    assert (grid[:, 1:, 0] - grid[:, :-1, 0] > 0).all()  # x increases along width
    assert (grid[1:, :, 1] - grid[:-1, :, 1] > 0).all()  # y increases along height


def test_set_img_size_runs_at_new_resolution_and_back():
    torch.manual_seed(0)
    model = create_model("vit_tiny_patch4_32").eval()
    x = small_input(model)
    with torch.no_grad():
        ref = model(x)
        model.set_img_size(48)
        assert model.pos_embed.shape == (1, 1 + 144, 192)
        assert model(torch.randn(2, 3, 48, 48)).shape == (2, 10)
        model.set_img_size(32)  # 8 -> 12 -> 8 is not exactly invertible, but close
        assert F.cosine_similarity(model(x).flatten(), ref.flatten(), dim=0) > 0.99


def test_dynamic_img_size_accepts_other_sizes():
    model = create_model("vit_tiny_patch4_32", dynamic_img_size=True).eval()
    assert model(torch.randn(1, 3, 48, 40)).shape == (1, 10)
    with pytest.raises(ValueError, match="not divisible"):
        model(torch.randn(1, 3, 30, 32))


def test_distilled_heads_average_at_eval():
    torch.manual_seed(0)
    model = create_model("deit_tiny_distilled_patch4_32").eval()
    x = small_input(model)
    cls_logits, dist_logits = model.forward_head(model.forward_features(x), separate=True)
    torch.testing.assert_close(model(x), (cls_logits + dist_logits) / 2)
    assert not torch.allclose(cls_logits, dist_logits)


def test_avg_pool_uses_patch_tokens_only():
    torch.manual_seed(0)
    model = create_model("vit_tiny_patch4_32", global_pool="avg").eval()
    feats = model.forward_features(small_input(model))
    torch.testing.assert_close(model.forward_head(feats, pre_logits=True), feats[:, 1:].mean(1))


@pytest.mark.parametrize("name, kw", [("vit_tiny_patch4_32", {"drop_path_rate": 0.2}),
                                      ("deit_tiny_distilled_patch4_32", {}),
                                      ("vit_mini_patch4_32", {"layer_scale": 0.1, "qkv_bias": False})])
def test_last_block_for_the_prefix_tokens_alone_gives_the_same_logits_and_gradients(name, kw):
    """forward() runs the last block for [CLS] (and [DIST]) alone: the same logits and gradients as
    the full block, in training (stochastic depth, gradient checkpointing) and eval."""
    torch.manual_seed(0)
    model = create_model(name, **kw)
    x = small_input(model, batch=3)
    fc1_rows = []
    model.blocks[-1].mlp.fc1.register_forward_hook(lambda m, i, o: fc1_rows.append(i[0].shape[1]))

    def run(prefix_only, train, checkpointing=False):
        model.train(train)
        model.prefix_only_last_block = prefix_only
        model.set_grad_checkpointing(checkpointing)
        model.zero_grad()
        torch.manual_seed(1)  # the same stochastic-depth draws both ways
        out = model(x)
        out = torch.cat(out, 1) if isinstance(out, tuple) else out
        out.square().sum().backward()
        return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    n, prefix = model.pos_embed.shape[1], model.num_prefix_tokens
    for train in (True, False):
        ref_out, ref_grads = run(False, train)
        assert fc1_rows[-1] == n
        for checkpointing in (False, True):
            out, grads = run(True, train, checkpointing)
            assert fc1_rows[-1] == prefix  # the last block's MLP saw the prefix tokens only
            torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5)
            for k, g in ref_grads.items():
                torch.testing.assert_close(grads[k], g, atol=2e-5, rtol=1e-4)
    # what reads every token still gets every token
    assert model.forward_features(x).shape[1] == n
    logits, attns = model(x, return_attn=True)
    assert attns[-1].shape[-2:] == (n, n) and fc1_rows[-1] == n
    torch.testing.assert_close(logits, model(x), atol=1e-5, rtol=1e-5)


def test_avg_pool_runs_the_full_last_block():
    model = create_model("vit_mini_patch4_32", global_pool="avg").eval()
    rows = []
    model.blocks[-1].mlp.fc1.register_forward_hook(lambda m, i, o: rows.append(i[0].shape[1]))
    model(small_input(model))
    assert rows == [model.pos_embed.shape[1]]


def test_attention_for_the_first_queries_equals_the_full_attentions_first_rows():
    torch.manual_seed(0)
    attn = Attention(48, num_heads=3).eval()
    x = torch.randn(2, 17, 48)
    full = attn(x)
    for path in ("explicit", "sdpa"):
        attn.path = path
        torch.testing.assert_close(attn(x, queries=2), full[:, :2], atol=1e-6, rtol=1e-5)
    with pytest.raises(ValueError, match="return_attn"):
        attn(x, return_attn=True, queries=1)


def test_gradient_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    model = create_model("vit_tiny_patch4_32", drop_path_rate=0.0)
    x = small_input(model)
    model(x).sum().backward()
    ref = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model.set_grad_checkpointing(True)
    model(x).sum().backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ref[n], atol=1e-5, rtol=1e-4)


def test_drop_path_linear_rule_and_expectation():
    model = create_model("vit_tiny_patch4_32", drop_path_rate=0.3)
    rates = [b.drop_path1.p for b in model.blocks]
    assert rates[0] == 0.0 and math.isclose(rates[-1], 0.3)
    assert all(b > a for a, b in zip(rates, rates[1:]))
    dp = model.blocks[-1].drop_path1.train()
    torch.manual_seed(0)
    x = torch.ones(20000, 1, 1)
    y = dp(x)
    assert set(y.unique().tolist()) <= {0.0, 1 / 0.7} or torch.allclose(y.unique(), torch.tensor([0.0, 1 / 0.7]))
    assert abs(y.mean().item() - 1.0) < 0.02  # unbiased in expectation


def test_layer_scale_option():
    model = create_model("vit_tiny_patch4_32", layer_scale=1e-5)
    assert torch.allclose(model.blocks[0].ls1.gamma, torch.full((192,), 1e-5))
    assert "blocks.0.ls2.gamma" in dict(model.named_parameters())


def test_layernorm_eps_and_qkv_bias_options():
    model = create_model("vit_tiny_patch4_32", norm_eps=1e-12, qkv_bias=False)
    assert model.blocks[0].norm1.eps == 1e-12 and model.norm.eps == 1e-12
    assert model.blocks[0].attn.qkv.bias is None


def test_reset_classifier_changes_class_count():
    model = create_model("deit_tiny_distilled_patch4_32")
    model.reset_classifier(7)
    model.train()
    a, b = model(torch.randn(2, 3, 32, 32))
    assert a.shape == b.shape == (2, 7)


@pytest.mark.parametrize("name", ["deit_tiny_distilled_patch4_32", "resnet18_cifar"])
def test_a_new_head_or_size_is_recorded_so_the_saved_model_loads_back(tmp_path, name):
    """The notebook fine-tuning path: a new head (and size), then save_model and load_model."""
    model = create_model(name)
    model.reset_classifier(7)
    size = 32
    if name.startswith("deit"):
        model.set_img_size(48)
        size = 48
    vitlab.save_model(tmp_path / "m.safetensors", model)
    back, _ = vitlab.load_model(tmp_path / "m.safetensors")
    x = torch.randn(2, 3, size, size)
    torch.testing.assert_close(back(x), model.eval()(x))
    assert back.num_classes == 7


def test_load_model_refuses_weights_of_another_shape_than_recorded_in_one_line(tmp_path):
    from vitlab.train.checkpoint import CheckpointError

    model = create_model("vit_mini_patch4_32")
    model.reset_classifier(3)
    model.arch["kwargs"]["num_classes"] = 10  # a record that no longer matches its weights
    vitlab.save_model(tmp_path / "m.safetensors", model)
    with pytest.raises(CheckpointError) as e:
        vitlab.load_model(tmp_path / "m.safetensors")
    assert "size mismatch for head.weight" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(ValueError, match="needs a model built by vitlab.create_model"):
        vitlab.save_model(tmp_path / "n.safetensors", VisionTransformer(img_size=32, patch_size=4, embed_dim=32,
                                                                        depth=1, num_heads=2))
    assert not (tmp_path / "n.safetensors").exists()


def test_bf16_autocast_close_to_fp32():
    torch.manual_seed(0)
    model = create_model("vit_tiny_patch4_32").eval()
    x = small_input(model, 4)
    with torch.no_grad():
        ref = model(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model(x)
    assert low.dtype == torch.bfloat16
    assert F.cosine_similarity(ref.flatten(), low.float().flatten(), dim=0) > 0.99


def test_sincos_position_init_is_a_2d_code_and_prefix_slots_stay_small():
    from vitlab.models.vit import sincos_2d

    codes = sincos_2d((3, 5), 16)  # (15, 16): 4 channels each of sin(row), cos(row), sin(col), cos(col)
    assert codes.shape == (15, 16)
    rows, cols = torch.arange(15) // 5, torch.arange(15) % 5
    assert torch.allclose(codes[:, 0], rows.float().sin(), atol=1e-6)  # the lowest frequency is 1
    assert torch.allclose(codes[:, 12], cols.float().cos(), atol=1e-6)
    assert len({tuple(r.tolist()) for r in codes}) == 15  # every patch gets its own code
    m = VisionTransformer(img_size=(12, 20), patch_size=4, embed_dim=16, depth=1, num_heads=2,
                          pos_embed_init="sincos", distilled=True)
    assert torch.equal(m.pos_embed[0, 2:], codes)
    assert m.pos_embed[0, :2].abs().max() < 0.1
    with pytest.raises(ValueError, match="pos_embed_init"):
        VisionTransformer(img_size=32, patch_size=4, embed_dim=16, depth=1, num_heads=2, pos_embed_init="rope")


# -- hybrid input: a conv stem before the patch projection ---------------------------------
def _hybrid(**kw):
    torch.manual_seed(0)
    args = dict(img_size=32, patch_size=8, in_chans=1, embed_dim=32, depth=2, num_heads=4, num_classes=5,
                conv_stem=(8, 16))
    args.update(kw)
    return VisionTransformer(**args)


def test_conv_stem_keeps_the_token_grid_and_is_local():
    m = _hybrid().eval()
    plain = VisionTransformer(img_size=32, patch_size=8, in_chans=1, embed_dim=32, depth=2, num_heads=4)
    assert m.patch_embed.grid_size == plain.patch_embed.grid_size == (4, 4)
    assert m.pos_embed.shape == plain.pos_embed.shape
    # Two stride-2 convs, then a 2x2 projection (8 / 2^2) on the 8x8 feature map.
    assert m.patch_embed.proj.kernel_size == (2, 2) and m.patch_embed.proj.in_channels == 16
    x = torch.randn(2, 1, 32, 32)
    tokens = m.patch_embed(x)  # (B, 16, D)
    assert tokens.shape == (2, 16, 32)
    # Locality: token (0, 0) sees input rows/columns 0..7 and token (0, 1) columns 5..15 (each
    # 3x3 stride-2 conv widens the field by 2 pixels of its input, the 2x2 projection by one map
    # cell), so changing the bottom-right quarter leaves them alone and changes token (3, 3).
    y = x.clone()
    y[:, :, 16:, 16:] = torch.randn(2, 1, 16, 16)
    with torch.no_grad():
        t2 = m.patch_embed(y)
    assert torch.equal(tokens[:, 0], t2[:, 0]) and torch.equal(tokens[:, 1], t2[:, 1])
    assert not torch.allclose(tokens[:, 15], t2[:, 15])


def test_conv_stem_matches_a_hand_built_cnn():
    m = _hybrid().eval()
    for mod in m.patch_embed.stem:  # non-trivial BatchNorm statistics
        if isinstance(mod, torch.nn.BatchNorm2d):
            mod.running_mean.uniform_(-0.5, 0.5)
            mod.running_var.uniform_(0.5, 2.0)
    x = torch.randn(3, 1, 32, 32)
    stem = m.patch_embed.stem
    h = x
    for conv, bn in ((stem[0], stem[1]), (stem[3], stem[4])):
        h = F.conv2d(h, conv.weight, stride=2, padding=1)
        h = (h - bn.running_mean[:, None, None]) / torch.sqrt(bn.running_var[:, None, None] + bn.eps)
        h = F.relu(h * bn.weight[:, None, None] + bn.bias[:, None, None])
    h = F.conv2d(h, m.patch_embed.proj.weight, m.patch_embed.proj.bias, stride=2)  # (B, D, 4, 4)
    with torch.no_grad():
        assert torch.allclose(m.patch_embed(x), h.flatten(2).transpose(1, 2), atol=1e-5)


def test_conv_stem_errors_and_registry():
    with pytest.raises(ValueError, match="divisible by 4"):
        _hybrid(patch_size=6, img_size=36)
    m = create_model("vit_mini_convstem_patch8_32", in_chans=1)
    assert m.arch["kwargs"]["conv_stem"] == (32, 64)
    # The recorded architecture rebuilds the same network (as a checkpoint does, via JSON lists).
    import json

    from vitlab.models.registry import build_from_arch

    arch = json.loads(json.dumps(m.arch))
    twin = build_from_arch(arch)
    twin.load_state_dict(m.state_dict())
    x = torch.randn(2, 1, 32, 32)
    m.eval(), twin.eval()
    with torch.no_grad():
        assert torch.equal(m(x), twin(x))


def test_conv_stem_weight_decay_groups():
    from vitlab.train.optim import param_groups

    m = _hybrid()
    groups = param_groups(m, 0.05)
    decayed = {id(p) for g in groups if g["weight_decay"] > 0 for p in g["params"]}
    stem = m.patch_embed.stem
    assert id(stem[0].weight) in decayed and id(stem[3].weight) in decayed  # conv kernels decay
    assert id(stem[1].weight) not in decayed and id(stem[1].bias) not in decayed  # BatchNorm does not


def test_conv_stem_stride1_layers_and_their_arch_round_trip():
    """A (width, stride) entry adds a stride-1 layer: the shrink (and so the projection kernel)
    counts only the stride-2 ones, and the JSON arch record (pairs become lists) rebuilds it."""
    import json

    from vitlab.models.registry import build_from_arch

    torch.manual_seed(0)
    m = create_model("vit_mini_convstem_patch8_32", in_chans=1, embed_dim=32, depth=2, conv_stem=(8, (8, 1), 16)).eval()
    convs = [mod for mod in m.patch_embed.stem if isinstance(mod, torch.nn.Conv2d)]
    assert [c.stride for c in convs] == [(2, 2), (1, 1), (2, 2)]
    assert m.patch_embed.proj.kernel_size == (2, 2)
    x = torch.randn(2, 1, 32, 32)
    h = x
    for conv in convs:  # BatchNorm in eval with fresh statistics is the identity map up to eps
        h = F.relu(F.conv2d(h, conv.weight, stride=conv.stride, padding=1) / (1 + 1e-5) ** 0.5)
    h = F.conv2d(h, m.patch_embed.proj.weight, m.patch_embed.proj.bias, stride=2)
    with torch.no_grad():
        assert torch.allclose(m.patch_embed(x), h.flatten(2).transpose(1, 2), atol=1e-5)
    twin = build_from_arch(json.loads(json.dumps(m.arch)))
    twin.load_state_dict(m.state_dict())
    twin.eval()
    with torch.no_grad():
        assert torch.equal(m(x), twin(x))
    for bad in ((8, (8, 3)), (8, (8, 1, 1)), ("8",), (0,), (True,), ((8, True),), ((8, 2.0),), 64):
        with pytest.raises(ValueError, match="conv_stem"):
            _hybrid(conv_stem=bad)
    with pytest.raises(ValueError, match="shrinks the image 8x"):
        _hybrid(conv_stem=(8, 8, 8), patch_size=4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gelu_operator_is_atens_gelu_bit_for_bit(dtype):
    """vitlab::gelu (what a compiled CPU training graph calls) gives F.gelu's values and gradient."""
    from vitlab.models import ops

    x = torch.randn(64, 48, dtype=dtype, requires_grad=True)
    g = torch.randn(64, 48, dtype=dtype)
    ref = F.gelu(x)
    (ref_grad,) = torch.autograd.grad(ref, x, g)
    out = ops.gelu(x)
    (grad,) = torch.autograd.grad(out, x, g)
    assert torch.equal(out, ref) and torch.equal(grad, ref_grad)
    assert torch.equal(ops.gelu_backward(g.float(), x.detach()), ref_grad)  # a wider grad is cast to x's dtype
    # the registrations torch.compile relies on: fake (meta) kernels, autograd, schema
    torch.library.opcheck(ops.gelu, (x.detach().requires_grad_(),))
    torch.library.opcheck(ops.gelu_backward, (g, x.detach()))


def test_compiled_cpu_training_graph_calls_the_gelu_operator_and_inference_does_not():
    from vitlab.models import native
    from vitlab.models.vit import GELU, Mlp

    graphs = []
    ours = {"vitlab.gelu.default", "vitlab.gelu_and_grad.default"}

    def record(gm, example_inputs):  # a dynamo backend that keeps the traced graph and runs it as is
        graphs.append({str(n.target) for n in gm.graph.nodes if n.op == "call_function"})
        return gm.forward

    mlp = Mlp(8, 16)
    x = torch.randn(2, 3, 8)
    torch._dynamo.reset()
    compiled = torch.compile(mlp, backend=record)
    compiled(x).sum().backward()
    with torch.no_grad():
        compiled(x)
    torch._dynamo.reset()
    mlp.act.use_native = False
    torch.compile(mlp, backend=record)(x).sum().backward()
    torch._dynamo.reset()
    mlp.act.use_native = True
    assert len(graphs) == 3
    train, infer, train_aten = graphs
    # training: vitlab's kernel (GELU and its derivative) where it runs, else ATen's as one opaque operator
    op = "vitlab.gelu_and_grad.default" if native.library() is not None else "vitlab.gelu.default"
    assert ours & train == {op}
    assert ours & train_aten == {"vitlab.gelu.default"}  # use_native off: ATen's kernels even here
    assert not ours & infer and any("gelu" in t for t in infer)  # inference: F.gelu
    assert torch.equal(mlp.act(x), F.gelu(x))  # eager: plain F.gelu
    tanh = GELU(approximate="tanh")  # nn.GELU's option is honoured, never swapped for the erf operator
    assert torch.equal(torch.compile(tanh, backend=record)(x.requires_grad_()), F.gelu(x, approximate="tanh"))
    assert not ours & graphs[-1]
    exported = torch.export.export(mlp, (x,))  # an exported graph must run without vitlab: plain GELU
    targets = {str(n.target) for n in exported.graph.nodes if n.op == "call_function"}
    assert not ours & targets and any("gelu" in t for t in targets)
