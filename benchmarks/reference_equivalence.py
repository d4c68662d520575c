"""vitlab's pretrained-weight loaders against the libraries that write the weights.

tests/test_pretrained.py checks the Hugging Face path against transformers itself,
but the timm, torchvision and Google .npz paths against files written from each
format's documented layout, because timm and torchvision do not import on the dev
CPU. This script closes that gap wherever they do import (the lent GPU machine):
for each case it builds the library's own model with random weights, saves it the
way the library saves it, loads the file with `vitlab.models.load_pretrained`, and
compares logits on the same random images (fp32, on the CPU, eval mode).

    python benchmarks/reference_equivalence.py --out benchmarks/results/reference

A case passes when the largest logit difference is below 1e-4 of the logits' scale
and every image gets the same top class. A library that is missing is reported,
not skipped silently; the exit status is 1 if any case that ran failed, or if
none of the three libraries imports (nothing was compared).
"""

from __future__ import annotations

import platform
import sys
import tempfile
import time
import traceback
from datetime import date
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "tests"))  # to_google_npz: the .npz layout as the unit tests write it

from vitlab.cli import Parser  # noqa: E402
from vitlab.models import build_from_arch  # noqa: E402
from vitlab.models.pretrained import load_pretrained  # noqa: E402
from vitlab.utils import make_dir, write_json  # noqa: E402

TOL = 1e-4


def perturb_(model: torch.nn.Module, std: float = 0.02, seed: int = 0) -> torch.nn.Module:
    """Add noise to every parameter: libraries initialise biases, tokens and heads to zeros or
    ones, where a swapped tensor would go unseen."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * std)
    return model.eval()


def images(batch: int, size: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def compare(name: str, ref_logits: torch.Tensor, ours: torch.nn.Module, x: torch.Tensor, info: dict) -> dict:
    with torch.no_grad():
        got = ours.eval()(x)
    diff = (got - ref_logits).abs().max().item()
    scale = ref_logits.abs().max().item()
    same_top = bool((got.argmax(-1) == ref_logits.argmax(-1)).all())
    ok = diff <= TOL * max(scale, 1.0) and same_top
    return dict(case=name, ok=ok, max_abs_diff=diff, logit_scale=scale, same_top1=same_top,
                format=info.get("format"), heads=ours.blocks[0].attn.num_heads, params=sum(p.numel() for p in ours.parameters()))


def timm_cases(tmp: Path):
    """Yields (case name, a function that runs it and returns its rows)."""
    import timm
    from safetensors.torch import save_file

    def hub_file(name):
        ref = perturb_(timm.create_model(name, pretrained=False))
        x = images(2, 224)
        with torch.no_grad():
            want = ref(x)
        # as the timm hub ships it: model.safetensors, a bare timm-named state dict
        path = tmp / f"{name}.safetensors"
        save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, path)
        model, info = load_pretrained(path)
        rows = [compare(f"timm {name} (.safetensors)", want, model, x, info)]
        # as a training checkpoint: {"model": state_dict, ...} in a .pth, under a name that says nothing
        path = tmp / "checkpoint.pth"
        torch.save({"model": ref.state_dict(), "epoch": 300}, path)
        model, info = load_pretrained(path)
        rows.append(compare(f"timm {name} ({{'model': ...}} .pth)", want, model, x, info))
        return rows

    for name in ("vit_tiny_patch16_224", "vit_small_patch16_224", "vit_base_patch16_224", "vit_base_patch32_224",
                 "deit_small_patch16_224", "deit_tiny_distilled_patch16_224"):
        yield name, lambda name=name: hub_file(name)

    def hub_dir():  # config.json + model.safetensors, written by timm itself
        from timm.models import _hub

        ref = perturb_(timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=7))
        d = tmp / "timm-hub"
        try:
            _hub.save_for_hf(ref, d, safe_serialization=True)  # as the hub ships it: model.safetensors
        except TypeError:  # an older timm
            _hub.save_for_hf(ref, d)
        x = images(2, 224)
        with torch.no_grad():
            want = ref(x)
        model, info = load_pretrained(d)
        return [compare("timm hub directory (save_for_hf), 7 classes", want, model, x, info)]

    def resized():  # timm's own resampling of the position embeddings against vitlab's
        from timm.models.vision_transformer import checkpoint_filter_fn

        ref = perturb_(timm.create_model("vit_base_patch16_224", pretrained=False))
        path = tmp / "vit_base_patch16_224.safetensors"
        save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, path)
        big = timm.create_model("vit_base_patch16_224", pretrained=False, img_size=384).eval()
        big.load_state_dict(checkpoint_filter_fn(ref.state_dict(), big))
        x = images(2, 384)
        with torch.no_grad():
            want = big(x)
        model, info = load_pretrained(path, img_size=384)
        return [compare("timm vit_base_patch16_224 resized to 384 (timm's resampling vs vitlab's)", want, model, x,
                        info)]

    def npz():  # the original Google .npz, read by timm's own loader and by vitlab's
        from test_pretrained import to_google_npz
        from timm.models.vision_transformer import VisionTransformer, _load_weights

        src = perturb_(build_from_arch({"name": "npz", "family": "vit", "kwargs": dict(
            img_size=224, patch_size=16, embed_dim=384, depth=4, num_heads=6, mlp_dim=1536, num_classes=10)}),
            std=0.2)
        path = tmp / "ViT-S_16-test.npz"
        np.savez(path, **to_google_npz(src))
        ref = VisionTransformer(img_size=224, patch_size=16, embed_dim=384, depth=4, num_heads=6,
                                num_classes=10).eval()
        _load_weights(ref, str(path))
        x = images(2, 224)
        with torch.no_grad():
            want = ref(x)
        model, info = load_pretrained(path)
        return [compare("Google .npz: timm's _load_weights vs vitlab", want, model, x, info)]

    yield "hub directory", hub_dir
    yield "resized", resized
    yield "npz", npz


def torchvision_cases(tmp: Path):
    import torchvision

    def one(name):
        ref = perturb_(getattr(torchvision.models, name)(weights=None))
        x = images(2, 224)
        with torch.no_grad():
            want = ref(x)
        path = tmp / f"{name}.pth"  # torchvision's hub files are bare state dicts
        torch.save(ref.state_dict(), path)
        model, info = load_pretrained(path)
        return [compare(f"torchvision {torchvision.__version__} {name}", want, model, x, info)]

    for name in ("vit_b_16", "vit_b_32", "vit_l_16"):
        yield name, lambda name=name: one(name)


def hf_cases(tmp: Path):
    import transformers

    def one(cls, cfg):
        ref = perturb_(getattr(transformers, cls)(cfg))
        d = tmp / cls
        ref.save_pretrained(d)
        x = images(2, cfg.image_size)
        with torch.no_grad():
            want = ref(pixel_values=x).logits
        model, info = load_pretrained(d)
        return [compare(f"transformers {transformers.__version__} {cls}", want, model, x, info)]

    yield "ViT-B/16", lambda: one("ViTForImageClassification", transformers.ViTConfig(num_labels=10))
    yield "DeiT-Ti distilled", lambda: one("DeiTForImageClassificationWithTeacher", transformers.DeiTConfig(
        hidden_size=192, num_attention_heads=3, intermediate_size=768, num_labels=10))


def main(argv=None) -> int:
    p = Parser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="benchmarks/results/reference")
    args = p.parse_args(argv)
    make_dir(args.out)  # a bad --out is one line now, not after minutes of work
    torch.manual_seed(0)
    libs, rows = {}, []
    with tempfile.TemporaryDirectory() as t:
        tmp = Path(t)
        for lib, fn in (("timm", timm_cases), ("torchvision", torchvision_cases), ("transformers", hf_cases)):
            t0 = time.time()
            try:
                mod = __import__(lib)
                libs[lib] = mod.__version__
            except Exception as e:  # noqa: BLE001  (torchvision's ops fail to register on some CPU builds)
                libs[lib] = f"not importable: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                print(f"{lib}: {libs[lib]}")
                continue
            for case, run in fn(tmp):
                try:
                    for row in run():
                        rows.append(row)
                        print(f"  {'ok  ' if row['ok'] else 'FAIL'} {row['case']}: max |diff| "
                              f"{row['max_abs_diff']:.2e} (logits up to {row['logit_scale']:.2f}), format "
                              f"{row['format']}, {row['heads']} heads", flush=True)
                except Exception:  # noqa: BLE001  (a failing case is reported; the others still run)
                    rows.append(dict(case=f"{lib} {case}: error", ok=False, error=traceback.format_exc()))
                    print(f"  FAIL {lib} {case}: {traceback.format_exc()}", flush=True)
            print(f"{lib} {libs[lib]}: {time.time() - t0:.0f} s", flush=True)
    res = dict(date=str(date.today()), machine=f"{platform.processor() or platform.machine()}, torch {torch.__version__}",
               command="python benchmarks/reference_equivalence.py " + " ".join(argv or sys.argv[1:]),
               libraries=libs, tolerance=TOL, cases=rows)
    path = write_json(Path(args.out) / "reference_equivalence.json", res)
    print(f"{sum(r['ok'] for r in rows)}/{len(rows)} cases agree; wrote {path}")
    if not rows:
        print("nothing was compared: none of timm, torchvision and transformers imports here", file=sys.stderr)
        return 1
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    from vitlab.cli import run_script

    run_script(main, "reference_equivalence.py")
