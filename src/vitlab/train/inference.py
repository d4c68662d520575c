"""The fast inference path: a frozen, compiled copy of a model with bf16 weights (CPU).

Scoring a trained model is forward passes over fixed weights, and that lets the compiler do more than
it can for training: with inductor's `freezing`, the weights become constants of the compiled
graph, so it folds them ahead of time and packs each Linear's weight once into oneDNN's blocked
layout (instead of re-reading and re-casting it every call, as autocast does). Holding the weights in
bf16 makes the packed matmuls run on the CPU's bf16 units (AMX / AVX-512 BF16). On the dev CPU this
scored ViT-Tiny at 1.1-1.6x eager autocast and 1.34-1.57x the fastest peer in three runs, with
logits within about 1% of fp32 (benchmarks/throughput.py, the "vitlab frozen" row; README).

The cost is compiling (7.5 s for ViT-Tiny, longer for bigger models), so `vitlab eval`
chooses it by itself only for long jobs (`resolve_inference_compile`, AUTO_MIN_TFLOP). The caller's model is left
untouched: the frozen copy is a deep copy.
"""

from __future__ import annotations

import copy

import torch
import torch.nn as nn

# The work (forward FLOPs over all images and TTA views) from which compiling pays back on the dev
# CPU, for ViT-Tiny: the frozen copy saved 0.08, 0.48 and 0.26 ms per image over eager autocast in
# benchmarks/throughput.py's three runs of 2026-11-27, against 7.5 s of compiling, which breaks even
# somewhere between 6 and 34 TFLOP (16,000-92,000 images x views); 40 TFLOP stays on the safe side.
# Small models gain less (they are bound by per-call overhead, not matmuls), which a count of
# images would miss: Fashion-MNIST's preset with 10-view TTA (100,000 forwards) is 2 TFLOP.
AUTO_MIN_TFLOP = 40.0


def forward_flops(model: nn.Module, x: torch.Tensor) -> float:
    """FLOPs of one image's forward pass (counted by torch on the first image of x)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    # the math backend, because the counter has no formula for the CPU's fused attention kernel
    # (it would count attention's two products as nothing)
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(x[:1])
    return float(counter.get_total_flops())


def resolve_inference_compile(choice: bool | None, tflop: float, device: torch.device, amp_dtype,
                              is_vit: bool = True) -> tuple[bool, str]:
    """--compile true / false as asked; auto (None) freezes a long bf16 job of a ViT on a CPU.
    -> (on, note).

    tflop: the job's forward work, images x views x forward_flops, in TFLOP. amp_dtype: the
    precision chosen for scoring (`--precision auto` picks bf16 only on a CPU where it is fast)."""
    if choice is not None:
        if choice and device.type != "cpu":
            return True, "torch.compile (weights not frozen: freezing is the CPU path)"
        weights = "bf16" if amp_dtype is torch.bfloat16 else "fp32"
        return bool(choice), (f"frozen torch.compile, {weights} weights" if choice else "eager")
    if device.type != "cpu":
        return False, "eager (auto: the frozen path is for CPUs)"
    if amp_dtype is not torch.bfloat16:
        return False, "eager (auto: the frozen path is chosen for bf16 scoring, and the precision here is fp32)"
    if not is_vit:
        return False, "eager (auto: the frozen path is measured for ViTs; --compile true to use it)"
    if tflop < AUTO_MIN_TFLOP:
        return False, f"eager (auto: {tflop:.1f} TFLOP of forward passes is too little for compiling to pay back)"
    return True, f"frozen torch.compile, bf16 weights (auto: {tflop:.0f} TFLOP of forward passes)"


class FrozenInference(nn.Module):
    """A compiled, frozen copy of `model` for inference; call it like the model.

    dtype: the weights' dtype in the copy (bf16, or None to keep them). Inputs are cast to it and the
    logits come back in fp32. freeze=False (a GPU) compiles the copy without freezing; the caller's
    autocast then applies as usual. A batch smaller than the first one seen (a loader's last batch)
    is padded to that size, so the graph compiled once serves every batch instead of compiling a
    second one. If compiling fails (no C++ compiler, an unsupported op) the copy runs eagerly and
    `note` says why.
    """

    def __init__(self, model: nn.Module, dtype: torch.dtype | None = torch.bfloat16, freeze: bool = True):
        super().__init__()
        frozen = copy.deepcopy(model).eval()
        for p in frozen.parameters():
            p.requires_grad_(False)
        self.dtype, self.freeze = dtype, freeze
        self.model = frozen.to(dtype) if dtype is not None else frozen
        self.num_classes = getattr(model, "num_classes", None)
        self._compiled = torch.compile(self.model, dynamic=False)
        self._batch = None
        self.note = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        if self._batch is None:
            self._batch = n
        if n < self._batch:
            x = torch.cat([x, x.new_zeros((self._batch - n, *x.shape[1:]))])
        if self.dtype is not None:
            x = x.to(self.dtype)
        # the graph is compiled for one memory layout: TTA's shifted views are strided slices, which
        # would otherwise compile (and pack the weights) a second time
        x = x.contiguous()
        # freezing is a global inductor setting that applies when a graph is compiled: it is set
        # around every call, so a recompile (a bigger batch) is frozen too, and other compiles are not
        with torch.no_grad(), torch._inductor.config.patch(freezing=self.freeze):
            try:
                out = self._compiled(x)
            except Exception as e:
                from .engine import _is_compile_failure, compile_failure_note

                if not _is_compile_failure(e):
                    raise
                self.note = f"{compile_failure_note(e)}; scored eagerly"
                self._compiled = self.model
                out = self.model(x)
        return out[:n].float()
