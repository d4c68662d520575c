"""vitlab.train.inference: the frozen, compiled bf16 copy that `vitlab eval` scores long jobs with."""

import pytest
import torch

from vitlab.models import create_model
from vitlab.train.inference import AUTO_MIN_TFLOP, FrozenInference, forward_flops, resolve_inference_compile

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


def mini_and_reference(batch):
    """A seeded vit_mini in eval mode, a random batch and its fp32 logits."""
    torch.manual_seed(0)
    model = create_model("vit_mini_patch4_32", num_classes=10).eval()
    x = torch.randn(batch, 3, 32, 32)
    with torch.no_grad():
        return model, x, model(x)


def test_frozen_copy_scores_like_the_fp32_model_and_pads_a_short_last_batch():
    model, x, ref = mini_and_reference(6)
    frozen = FrozenInference(model, torch.bfloat16)
    out = frozen(x)
    assert out.dtype == torch.float32 and out.shape == (6, 10)
    # bf16 weights and activations: about 1% off fp32 (autocast is too); a wrong weight layout or
    # a missed layer would be off by ~100%
    assert ((out - ref).norm() / ref.norm()).item() < 0.02
    assert frozen.note is None  # compiled, not the eager fallback
    # a short batch (a loader's last) is padded to the compiled size: the same rows, no second graph
    torch._dynamo.utils.counters.clear()
    short = frozen(x[:4])
    assert short.shape == (4, 10)
    torch.testing.assert_close(short, out[:4], atol=2e-2, rtol=0)
    assert not torch._dynamo.utils.counters["stats"]["unique_graphs"]
    # the caller's model is untouched: fp32 and trainable
    assert all(p.dtype == torch.float32 and p.requires_grad for p in model.parameters())
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref)


def test_frozen_copy_keeps_fp32_weights_when_asked():
    model, x, ref = mini_and_reference(2)
    frozen = FrozenInference(model, None)
    assert all(p.dtype == torch.float32 for p in frozen.model.parameters())
    torch.testing.assert_close(frozen(x), ref, atol=1e-4, rtol=1e-4)


def test_forward_flops_counts_one_image():
    model = create_model("vit_mini_patch4_32", num_classes=10).eval()
    one = forward_flops(model, torch.zeros(3, 3, 32, 32))
    # by hand: 3 blocks of 65 tokens at 128 wide (qkv 3x, proj 1x, MLP 2 x 256) plus attention's
    # two (65 x 65 x 128) products; the last block for [CLS] alone (keys and values of all 65 tokens,
    # [CLS]'s query, proj and MLP, its row of attention); the patch projection (64 patches, 48 -> 128)
    # and the head
    blocks = 3 * 2 * 65 * (128 * 384 + 128 * 128 + 2 * 128 * 256) + 3 * 2 * 2 * 65 * 65 * 128
    blocks += 2 * 65 * 128 * 256 + 2 * (128 * 128 + 128 * 128 + 2 * 128 * 256) + 2 * 2 * 65 * 128
    assert one == pytest.approx(blocks + 2 * 64 * 48 * 128 + 2 * 128 * 10, rel=1e-6)


@pytest.mark.parametrize("choice, tflop, device, dtype, on, says", [
    (True, 0.0, CPU, torch.bfloat16, True, "bf16 weights"),
    (True, 0.0, CPU, None, True, "fp32 weights"),
    (False, 1e3, CPU, torch.bfloat16, False, "eager"),
    (None, 2 * AUTO_MIN_TFLOP, CPU, torch.bfloat16, True, "auto"),
    (None, AUTO_MIN_TFLOP / 10, CPU, torch.bfloat16, False, "too little"),
    (None, 1e3, CPU, None, False, "precision here is fp32"),  # a CPU without fast bf16 (auto precision = fp32)
    (None, 1e3, CUDA, torch.bfloat16, False, "for CPUs"),
    (True, 0.0, CUDA, torch.bfloat16, True, "not frozen"),
])
def test_compile_choice_for_scoring(choice, tflop, device, dtype, on, says):
    got, note = resolve_inference_compile(choice, tflop, device, dtype)
    assert got is on and says in note


def test_auto_leaves_a_resnet_eager_but_compiles_it_when_asked():
    assert resolve_inference_compile(None, 1e3, CPU, torch.bfloat16, is_vit=False) == (
        False, "eager (auto: the frozen path is measured for ViTs; --compile true to use it)")
    assert resolve_inference_compile(True, 0.0, CPU, torch.bfloat16, is_vit=False)[0] is True


def test_tta_views_strided_slices_reuse_the_one_compiled_graph():
    from vitlab.train.engine import tta_views

    torch.manual_seed(0)
    model = create_model("vit_mini_patch4_32", num_classes=10).eval()
    frozen = FrozenInference(model, None)  # fp32: no cast that would make the views contiguous
    x = torch.randn(2, 3, 32, 32)
    views = tta_views(x, "flip-shift")
    assert not all(v.is_contiguous() for v in views)
    frozen(views[0])
    torch._dynamo.utils.counters.clear()
    with torch.no_grad():
        for v in views[1:]:
            torch.testing.assert_close(frozen(v), model(v), atol=1e-4, rtol=1e-4)
    assert not torch._dynamo.utils.counters["stats"]["unique_graphs"]
