"""vitlab ViT -> Hugging Face format; also the `vitlab export` command.

Writes what `transformers.ViTForImageClassification.from_pretrained(DIR)`
reads: config.json (hidden sizes, LayerNorm eps, qkv bias, id2label),
model.safetensors under HF's key names (the names every transformers version
writes and reads), and preprocessor_config.json (mean, std, size). A model
without a head (num_classes=0) is written as a `ViTModel`; a distilled model
as DeiT (`DeiTForImageClassificationWithTeacher`, or `DeiTModel` headless),
whose inference rule, the average of the two heads, is vitlab's too.

The mapping is the inverse of `pretrained.convert_hf`: the fused qkv is split
back into query/key/value by rows (q|k|v).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..errors import UserError
from ..utils import atomic_write, atomic_write_text, staged


class ExportError(UserError):
    pass


def hf_architecture(model) -> str:
    if model.distilled:
        return "DeiTForImageClassificationWithTeacher" if model.num_classes > 0 else "DeiTModel"
    return "ViTForImageClassification" if model.num_classes > 0 else "ViTModel"


def hf_state_dict(model) -> dict:
    """vitlab ViT state dict -> HF ViTForImageClassification / ViTModel / DeiT keys."""
    # The classification wrappers keep the backbone under vit. / deit.; the bare models have no prefix.
    prefix = ("deit." if model.distilled else "vit.") if model.num_classes > 0 else ""
    s = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    out = {
        "embeddings.cls_token": s["cls_token"],
        "embeddings.position_embeddings": s["pos_embed"],
        "embeddings.patch_embeddings.projection.weight": s["patch_embed.proj.weight"],
        "embeddings.patch_embeddings.projection.bias": s["patch_embed.proj.bias"],
        "layernorm.weight": s["norm.weight"],
        "layernorm.bias": s["norm.bias"],
    }
    names = {"norm1": "layernorm_before", "norm2": "layernorm_after", "attn.proj": "attention.output.dense",
             "mlp.fc1": "intermediate.dense", "mlp.fc2": "output.dense"}
    for i in range(len(model.blocks)):
        b, h = f"blocks.{i}.", f"encoder.layer.{i}."
        for kind in ("weight", "bias"):
            if b + f"attn.qkv.{kind}" in s:
                q, k, v = s[b + f"attn.qkv.{kind}"].chunk(3, dim=0)  # rows are q | k | v
                out[h + f"attention.attention.query.{kind}"] = q.contiguous()
                out[h + f"attention.attention.key.{kind}"] = k.contiguous()
                out[h + f"attention.attention.value.{kind}"] = v.contiguous()
            for ours, theirs in names.items():
                out[h + f"{theirs}.{kind}"] = s[b + f"{ours}.{kind}"]
    if model.distilled:
        out["embeddings.distillation_token"] = s["dist_token"]
    out = {prefix + k: v for k, v in out.items()}
    if model.num_classes > 0:
        heads = {"head": "cls_classifier", "head_dist": "distillation_classifier"} if model.distilled \
            else {"head": "classifier"}
        for ours, theirs in heads.items():
            out[f"{theirs}.weight"], out[f"{theirs}.bias"] = s[f"{ours}.weight"], s[f"{ours}.bias"]
    return out


def check_exportable(model) -> None:
    """What HF's ViT / DeiT cannot express, as one clear line."""
    arch = getattr(model, "arch", {})
    if arch.get("family", "vit") != "vit" or not hasattr(model, "blocks"):
        raise ExportError(f"only ViT models export to Hugging Face format (this is a {arch.get('family', type(model).__name__)})")
    if model.global_pool != "token":
        raise ExportError(f"global_pool={model.global_pool!r} is not exportable: HF's ViT classifies the [CLS] token")
    if not isinstance(model.blocks[0].ls1, torch.nn.Identity):
        raise ExportError("models with LayerScale are not exportable: HF's ViT has no LayerScale")
    if getattr(model.patch_embed, "stem", None) is not None:
        raise ExportError("hybrid models (conv stem) are not exportable: HF's ViT embeds patches with one conv")
    attn = model.blocks[0].attn
    if attn.inner_dim != model.embed_dim:
        raise ExportError(f"embed_dim {model.embed_dim} is not divisible by num_heads {attn.num_heads}; "
                          f"HF's ViT needs hidden_size = heads x head width")


def hf_config(model, classes=None) -> dict:
    blk = model.blocks[0]
    cfg = {
        "architectures": [hf_architecture(model)],
        "model_type": "deit" if model.distilled else "vit",
        "hidden_size": model.embed_dim,
        "num_hidden_layers": len(model.blocks),
        "num_attention_heads": blk.attn.num_heads,
        "intermediate_size": blk.mlp.fc1.out_features,
        "hidden_act": "gelu",  # exact (erf) GELU, as nn.GELU()
        "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0,
        "layer_norm_eps": blk.norm1.eps,  # 1e-6 for vitlab/timm, 1e-12 for HF-born weights: carried through
        "qkv_bias": blk.attn.qkv.bias is not None,
        "image_size": model.img_size[0] if model.img_size[0] == model.img_size[1] else list(model.img_size),
        "patch_size": model.patch_size[0] if model.patch_size[0] == model.patch_size[1] else list(model.patch_size),
        "num_channels": model.in_chans,
        "encoder_stride": model.patch_size[0],
        "initializer_range": 0.02,
    }
    if model.num_classes > 0:
        names = list(classes) if classes and len(classes) == model.num_classes else \
            [f"LABEL_{i}" for i in range(model.num_classes)]
        cfg["id2label"] = {str(i): str(n) for i, n in enumerate(names)}
        cfg["label2id"] = {str(n): i for i, n in enumerate(names)}
    return cfg


# Hugging Face's ConvNeXt processor crops only below this size (above it, it resizes the whole image)
HF_CROP_LIMIT = 384


def preprocessor_config(model, mean, std, crop: bool = False) -> dict:
    """How Hugging Face prepares an image for the exported model, as vitlab did for it.

    crop False: the whole image resized to the input size (the tensor datasets, imported weights).
    crop True (runs trained on image files; vitlab.data.files): the shorter side resized to
    round(size * 256 / 224), then a centre crop of the input size. ViT's own processor cannot crop;
    ConvNeXt's does exactly this (shorter side to int(size / crop_pct), centre crop), so it is named
    instead; crop_pct is chosen so int() lands on vitlab's rounding."""
    h, w = model.img_size
    common = {"resample": 2,  # bilinear, as vitlab resizes
              "do_rescale": True, "rescale_factor": 1 / 255,
              "do_normalize": True, "image_mean": [float(x) for x in mean], "image_std": [float(x) for x in std]}
    if crop and h == w and h < HF_CROP_LIMIT:
        resize = round(h * 256 / 224)
        return {"image_processor_type": "ConvNextImageProcessor", "do_resize": True,
                "size": {"shortest_edge": h}, "crop_pct": h / (resize + 0.5), **common}
    return {"image_processor_type": "ViTImageProcessor", "do_resize": True, "size": {"height": h, "width": w},
            **common}


HF_FILES = ("config.json", "model.safetensors", "preprocessor_config.json")  # what an export writes


def export_hf(model, out_dir, classes=None, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), overwrite=False,
              crop: bool = False) -> Path:
    """Write `model` to `out_dir` in Hugging Face ViT format; returns the directory.
    crop: the model was trained on centre crops of image files (see preprocessor_config)."""
    from safetensors.torch import save_file

    from .pretrained import _is_vitlab_safetensors

    check_exportable(model)
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ExportError(f"{out} exists and is not a directory")
    if (out / "last.ckpt").exists() or _is_vitlab_safetensors(out / "model.safetensors"):
        raise ExportError(f"{out} holds a vitlab run, whose model.safetensors the export would replace; "
                          f"write the Hugging Face copy to another folder")
    if not overwrite and any((out / n).exists() for n in ("config.json", "model.safetensors")):
        raise ExportError(f"{out} already holds a model; pass --force to overwrite")
    others = [f for f in out.iterdir() if f.name not in HF_FILES and not f.name.startswith(".")] if out.is_dir() else []
    if not overwrite and others:  # a folder of the user's own files (photos, another project)
        raise ExportError(f"{out} is not empty ({len(others)} other entr{'ies' if len(others) != 1 else 'y'}, e.g. "
                          f"{others[0].name}); choose a new folder, or pass --force to write among them")
    state = hf_state_dict(model)
    with staged(out) as stage:  # the three files replace an earlier export's together, never one by one
        # transformers refuses safetensors files without format metadata.
        atomic_write(stage / "model.safetensors", lambda tmp: save_file(state, tmp, metadata={"format": "pt"}))
        atomic_write_text(stage / "config.json", json.dumps(hf_config(model, classes), indent=2) + "\n")
        atomic_write_text(stage / "preprocessor_config.json",
                          json.dumps(preprocessor_config(model, mean, std, crop), indent=2) + "\n")
    return out


# -- `vitlab export` ----------------------------------------------------------------
def add_arguments(p) -> None:
    p.add_argument("--checkpoint", required=True, metavar="RUN_DIR_OR_FILE",
                   help="a vitlab run dir or .safetensors (or any checkpoint `create_model` loads: timm, "
                        "torchvision, Google .npz, Hugging Face dir or hub id)")
    p.add_argument("--out", required=True, metavar="DIR", help="directory to write the Hugging Face model to")
    p.add_argument("--num-heads", type=int, default=None,
                   help="attention heads, for timm/torchvision files of a non-standard width")
    p.add_argument("--force", action="store_true",
                   help="overwrite a model already in DIR, or write into a folder that holds other files")


def run(args) -> int:
    from .pretrained import load_pretrained

    if args.num_heads is not None and args.num_heads < 1:
        raise ExportError(f"--num-heads must be positive, got {args.num_heads}")
    src = Path(args.checkpoint)
    if src.name == "last.ckpt" and src.is_file():  # its weights are the last epoch's, and it has no class names
        raise ExportError(f"{src} is a resumable training state (for --resume); export the run folder "
                          f"{src.parent} or its model.safetensors")
    extra = {"num_heads": args.num_heads} if args.num_heads else {}
    model, info = load_pretrained(args.checkpoint, **extra)
    crop = False
    if info.get("format") == "vitlab":  # a vitlab run: prepared its images as the run did
        from ..train.checkpoint import read_meta
        from ..train.predict import crops_like_training

        crop = crops_like_training(read_meta(args.checkpoint), tuple(model.img_size))
        if crop and model.img_size[0] >= HF_CROP_LIMIT:
            print(f"note: Hugging Face's processors crop only below {HF_CROP_LIMIT} px; this export's resizes the "
                  f"whole image, where vitlab resized the shorter side and took the centre")
    out = export_hf(model, args.out, classes=info.get("classes"), mean=info["mean"], std=info["std"],
                    overwrite=args.force, crop=crop)
    kind = hf_architecture(model)
    print(f"wrote {out} ({kind}: {len(model.blocks)} layers, width {model.embed_dim}, "
          f"{model.img_size[0]}x{model.img_size[1]} px, {model.num_classes} classes, "
          f"eps {model.blocks[0].norm1.eps:g}); load it with transformers.{kind}.from_pretrained({str(out)!r})")
    return 0
