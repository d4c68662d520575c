"""Pretrained weights: find the format, rename to vitlab's keys, load strictly.

vitlab's ViT uses timm's parameter names, so every source is converted into a
timm-named state dict plus the constructor arguments the source states:

    format       what it is                                   architecture from
    hf           Hugging Face ViT/DeiT dir (config.json +     config.json: sizes, eps,
                 model.safetensors or pytorch_model.bin),     qkv bias, heads, id2label;
                 or a hub id (google/vit-base-patch16-224)    mean/std from preprocessor
    timm         state dict (.pth/.pt/.bin/.safetensors),     tensor shapes; heads from
                 bare or in model/state_dict/model_ema,       num_heads=, a preset or a
                 DeiT distilled too; or a timm hub dir        name hint, else WIDTH_HEADS
    npz          original Google JAX ViT .npz                 tensor shapes (heads too)
    torchvision  vit_b_16-style state dict                    shapes (heads as for timm)
    vitlab       vitlab run dir or .safetensors               the recorded `arch`

`load_pretrained(path_or_id, num_classes=..., img_size=...)` is the one entry
point; `create_model(..., pretrained=...)` calls it. Every key and shape is
checked before anything is copied, and a mismatch is one line naming the first
offending keys with expected and found shapes.
"""

from __future__ import annotations

import json
import math
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..errors import UserError, brief
from ..utils import torch_file_kind
from .registry import PRESETS, build_from_arch, get_preset

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
HALF = (0.5, 0.5, 0.5)  # mean = std = 0.5: the original Google ViT / HF / timm-augreg normalisation

# Heads cannot be read off tensor shapes (qkv is (3*D, D) for any head count),
# so timm and torchvision files take them from `num_heads=`, a preset name, or
# this table of the standard widths (ViT/DeiT Ti, S, B, L, H).
WIDTH_HEADS = {192: 3, 384: 6, 768: 12, 1024: 16, 1280: 16}

# `create_model(preset, pretrained=True)` fetches these hub repos.
DEFAULT_SOURCES = {
    "vit_tiny_patch16_224": "timm/vit_tiny_patch16_224.augreg_in21k_ft_in1k",
    "vit_small_patch16_224": "timm/vit_small_patch16_224.augreg_in21k_ft_in1k",
    "vit_base_patch16_224": "google/vit-base-patch16-224",
    "vit_b16": "google/vit-base-patch16-224",  # the seed notebook's ViT-B/16 (keeps its dropout 0.1)
    "vit_base_patch32_224": "timm/vit_base_patch32_224.augreg_in21k_ft_in1k",
    "vit_large_patch16_224": "google/vit-large-patch16-224",
    "deit_tiny_distilled_patch16_224": "timm/deit_tiny_distilled_patch16_224.fb_in1k",
    "deit_small_distilled_patch16_224": "timm/deit_small_distilled_patch16_224.fb_in1k",
    "deit_base_distilled_patch16_224": "timm/deit_base_distilled_patch16_224.fb_in1k",
}

# Constructor arguments that fix the network's shape or computation. With a
# preset name, the preset decides them and a source that states otherwise is
# an error (not a silent switch to another architecture).
STRUCTURE = ("embed_dim", "depth", "num_heads", "mlp_dim", "patch_size", "in_chans", "distilled")

HF_WEIGHTS = ("model.safetensors", "pytorch_model.bin")
TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt", ".tar")


class PretrainedError(UserError):
    pass


@dataclass
class Source:
    """A checkpoint converted to vitlab names, before any model is built."""

    format: str
    state: dict  # vitlab (timm) key -> tensor
    arch: dict  # VisionTransformer kwargs the source determines
    guessed: set = field(default_factory=set)  # arch keys that are defaults, not read from the source
    classes: list | None = None
    mean: tuple = HALF
    std: tuple = HALF
    name: str = "vit"
    notes: list = field(default_factory=list)
    family: str = "vit"
    model: object = None  # vitlab checkpoints arrive as a built model


# ----------------------------------------------------------------------------
# Small helpers
# ----------------------------------------------------------------------------
def _pair(x):
    return (int(x), int(x)) if isinstance(x, (int, np.integer)) else tuple(int(v) for v in x)


def default_num_heads(width: int) -> int:
    """The standard head count for a width; otherwise 64-wide heads."""
    if width in WIDTH_HEADS:
        return WIDTH_HEADS[width]
    if width % 64 == 0:
        return width // 64
    raise PretrainedError(f"cannot guess the number of heads for width {width}; pass num_heads= (--num-heads)")


def _grid_from_tokens(n: int, patch, img_size_hint=None) -> tuple[int, int]:
    """Image size from the number of patch position embeddings (square unless a hint fits)."""
    if img_size_hint is not None:
        h, w = _pair(img_size_hint)
        if (h // patch[0]) * (w // patch[1]) == n:
            return (h, w)
    side = math.isqrt(n)
    if side * side != n:
        raise PretrainedError(f"{n} position embeddings are not a square grid; pass the checkpoint's img_size=")
    return (side * patch[0], side * patch[1])


def _count_blocks(keys, pattern: str) -> int:
    rx = re.compile(pattern)
    idx = {int(m.group(1)) for k in keys if (m := rx.match(k))}
    if not idx:
        return 0
    if idx != set(range(max(idx) + 1)):
        raise PretrainedError(f"transformer blocks are not numbered 0..{max(idx)} (found {sorted(idx)[:8]}...)")
    return max(idx) + 1


def _classes_from_id2label(id2label: dict | None, k: int) -> list | None:
    """Class names from a HF id2label, unless they are transformers' LABEL_i placeholders."""
    if not id2label or len(id2label) != k:
        return None
    try:
        names = [str(id2label[i] if i in id2label else id2label[str(i)]) for i in range(k)]
    except KeyError:
        return None
    if all(n == f"LABEL_{i}" for i, n in enumerate(names)):
        return None
    return names


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise PretrainedError(f"{path} is not readable JSON ({e})") from None


def _torch_load(path: Path) -> dict:
    try:
        with warnings.catch_warnings():  # torch's notes on old pickle protocols: our one line says enough
            warnings.simplefilter("ignore")
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any failure means a file we cannot use
        text = str(e)
        glob = re.search(r"Unsupported global: GLOBAL (\S+)", text)
        if glob:  # e.g. a training checkpoint that pickled its argparse.Namespace
            raise PretrainedError(
                f"{path} holds pickled Python objects ({glob.group(1)}) that are not loaded (weights_only=True); "
                f"if you trust the file, re-save just its state dict"
            ) from None
        # torch's message is a paragraph; keep the unpickler's own reason, unless the file's first
        # bytes say plainly what it is not
        reason = text.split("WeightsUnpickler error:")[-1].strip()
        reason = torch_file_kind(path) or (brief(reason) if reason else type(e).__name__)
        raise PretrainedError(f"{path} is not a readable torch weights file ({reason})") from None
    return obj


def _safetensors_load(path: Path) -> tuple[dict, dict]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
            state = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise PretrainedError(f"{path} is not a readable safetensors file ({brief(e)})") from None
    return state, meta


def _unwrap(obj, path) -> dict:
    """Find the state dict inside a training checkpoint and drop DDP's `module.` prefix."""
    if not isinstance(obj, dict):
        raise PretrainedError(f"{path} holds a {type(obj).__name__}, not a state dict")
    if not any(isinstance(v, torch.Tensor) for v in obj.values()):
        # timm/DeiT training checkpoints: prefer the plain weights over the EMA copy.
        for key in ("model", "state_dict", "model_ema", "state_dict_ema", "module"):
            if isinstance(obj.get(key), dict):
                return _unwrap(obj[key], path)
        raise PretrainedError(f"{path} has no tensors (top-level keys: {sorted(obj)[:6]})")
    state = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def _layout(keys) -> str | None:
    """Which layout a state dict's key names follow."""
    keys = set(keys)
    if "patch_embed.proj.weight" in keys:
        return "timm"
    if "conv_proj.weight" in keys and "class_token" in keys:
        return "torchvision"
    if any(k.endswith("embeddings.patch_embeddings.projection.weight") for k in keys):
        return "hf"
    return None


# ----------------------------------------------------------------------------
# Hugging Face
# ----------------------------------------------------------------------------
_HF_LAYER = re.compile(r"^(?:encoder\.layer|layers)\.(\d+)\.(.+)$")
_HF_BLOCK_NAMES = {
    # transformers <= 4 and the files every version writes ...
    "attention.attention.query": "q", "attention.attention.key": "k", "attention.attention.value": "v",
    "attention.output.dense": "attn.proj", "intermediate.dense": "mlp.fc1", "output.dense": "mlp.fc2",
    # ... and transformers 5's in-memory names, in case someone saved a raw state_dict().
    "attention.q_proj": "q", "attention.k_proj": "k", "attention.v_proj": "v",
    "attention.o_proj": "attn.proj", "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2",
    "layernorm_before": "norm1", "layernorm_after": "norm2",
}
_HF_TOP = {
    "embeddings.cls_token": "cls_token",
    "embeddings.position_embeddings": "pos_embed",
    "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
    "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
    "layernorm.weight": "norm.weight", "layernorm.bias": "norm.bias",
    "classifier.weight": "head.weight", "classifier.bias": "head.bias",
    # DeiTForImageClassificationWithTeacher / DeiTModel
    "embeddings.distillation_token": "dist_token",
    "cls_classifier.weight": "head.weight", "cls_classifier.bias": "head.bias",
    "distillation_classifier.weight": "head_dist.weight", "distillation_classifier.bias": "head_dist.bias",
}


def convert_hf(state: dict) -> dict:
    """Hugging Face ViT (and DeiT) keys -> vitlab keys.

    q, k and v are separate (D, D) Linears in HF and one fused (3D, D) Linear
    here, rows ordered q|k|v, so they are concatenated along dim 0. The pooler
    (ViTModel's tanh layer, unused for classification) and the MIM mask token
    are dropped. Keys that match nothing are kept so the strict check names them.
    """
    state = {re.sub(r"^(vit|deit)\.", "", k): v for k, v in state.items()}
    out, qkv = {}, {}
    for k, v in state.items():
        if k.startswith("pooler.") or k == "embeddings.mask_token":
            continue
        if k in _HF_TOP:
            out[_HF_TOP[k]] = v
            continue
        m = _HF_LAYER.match(k)
        if m:
            i, rest = int(m.group(1)), m.group(2)
            sub, _, kind = rest.rpartition(".")  # kind: weight / bias
            name = _HF_BLOCK_NAMES.get(sub)
            if name in ("q", "k", "v"):
                qkv.setdefault((i, kind), {})[name] = v
                continue
            if name:
                out[f"blocks.{i}.{name}.{kind}"] = v
                continue
        out[k] = v
    for (i, kind), parts in qkv.items():
        if set(parts) == {"q", "k", "v"}:
            out[f"blocks.{i}.attn.qkv.{kind}"] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
        else:  # incomplete: leave the pieces for the strict check to report
            out.update({f"blocks.{i}.attn.{n}.{kind}": t for n, t in parts.items()})
    return out


def _hf_weights(d: Path) -> dict:
    for name in HF_WEIGHTS:
        index = d / f"{name}.index.json"  # sharded checkpoints (the big models)
        if index.is_file():
            shards = sorted(set(_read_json(index).get("weight_map", {}).values()))
            state = {}
            for shard in shards:
                state.update(_read_weights_file(d / shard))
            return state
        if (d / name).is_file():
            return _read_weights_file(d / name)
    raise PretrainedError(f"{d} has a config.json but no {' or '.join(HF_WEIGHTS)}")


def _read_weights_file(path: Path) -> dict:
    if not path.is_file():
        raise PretrainedError(f"missing weights file {path}")
    if path.suffix == ".safetensors":
        return _safetensors_load(path)[0]
    return _unwrap(_torch_load(path), path)


def read_hf_dir(d: Path, name_hint: str | None = None) -> Source:
    cfg = _read_json(d / "config.json")
    if "architecture" in cfg and cfg.get("model_type") in (None, "timm_wrapper"):  # a timm repo on the hub
        return read_timm_state(_unwrap(_hf_weights(d), d), d, cfg)
    model_type = cfg.get("model_type")
    if model_type not in ("vit", "deit"):
        raise PretrainedError(f"{d}: config.json is for model_type {model_type!r}; only 'vit' (ViTModel, "
                              f"ViTForImageClassification) and 'deit' Hugging Face checkpoints are supported")
    act = cfg.get("hidden_act", "gelu")
    if act != "gelu":  # "gelu" is the exact erf GELU, as in vitlab; tanh variants would change logits
        raise PretrainedError(f"{d}: hidden_act {act!r} is not supported (vitlab's ViT uses exact GELU, 'gelu')")
    # Missing fields take ViTConfig's defaults (ViT-B/16 at 224 px), as transformers would.
    dim, heads = int(cfg.get("hidden_size", 768)), int(cfg.get("num_attention_heads", 12))
    head_dim = cfg.get("head_dim")
    if head_dim is not None and int(head_dim) != dim // heads:
        raise PretrainedError(f"{d}: head_dim {head_dim} != hidden_size / heads ({dim // heads}); not supported")
    state = convert_hf(_hf_weights(d))
    patch = _pair(cfg.get("patch_size", 16))
    img = _pair(cfg.get("image_size", 224))
    num_classes = state["head.weight"].shape[0] if "head.weight" in state else 0
    distilled = "dist_token" in state
    if distilled and num_classes and "head_dist.weight" not in state:
        # DeiTForImageClassification: a [DIST] token but only the [CLS] head, which
        # vitlab's distilled ViT (averaging both heads) cannot reproduce.
        raise PretrainedError(f"{d}: DeiTForImageClassification (no distillation head) is not supported; use "
                              f"DeiTForImageClassificationWithTeacher weights or DeiTModel (backbone)")
    arch = dict(
        embed_dim=dim, depth=int(cfg.get("num_hidden_layers", 12)), num_heads=heads,
        mlp_dim=int(cfg.get("intermediate_size", 4 * dim)), patch_size=patch, img_size=img,
        in_chans=int(cfg.get("num_channels", 3)), qkv_bias=bool(cfg.get("qkv_bias", True)),
        norm_eps=float(cfg.get("layer_norm_eps", 1e-12)), num_classes=num_classes, distilled=distilled,
    )
    src = Source("hf", state, arch, classes=_classes_from_id2label(cfg.get("id2label"), num_classes),
                 name=name_hint or d.name)
    if model_type == "deit":  # HF's DeiT processors default to ImageNet statistics
        src.mean, src.std = IMAGENET_MEAN, IMAGENET_STD
    pre = d / "preprocessor_config.json"
    if pre.is_file():
        p = _read_json(pre)
        if p.get("image_mean") is not None and p.get("image_std") is not None:
            src.mean, src.std = tuple(p["image_mean"]), tuple(p["image_std"])
    return src  # else the model type's default


def fetch_hub(repo_id: str) -> Path:
    """Download a hub repo's configs and weights (or find them in the local cache); returns its directory."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise PretrainedError(f"{repo_id!r} looks like a Hugging Face hub id, but huggingface_hub is not installed "
                              f"(pip install 'vitlab[hub]'); or pass a local directory") from None
    try:
        # Only what loading needs: the JSON configs and one weights format
        # (safetensors if the repo has it, else the pickle), shards included.
        d = Path(snapshot_download(repo_id, allow_patterns=["*.json", "model.safetensors*"]))
        if not any((d / n).is_file() for n in ("model.safetensors", "model.safetensors.index.json")):
            d = Path(snapshot_download(repo_id, allow_patterns=["*.json", "pytorch_model.bin*"]))
    except Exception as e:  # noqa: BLE001 - offline, unknown repo, gated, network...
        raise PretrainedError(
            f"{repo_id!r}: no such file or folder here, and as a Hugging Face hub id it cannot be fetched "
            f"({type(e).__name__}: offline or unknown id); download it where there is network "
            f"(`hf download {repo_id} --local-dir DIR`) and pass DIR instead"
        ) from None
    if not (d / "config.json").is_file():
        raise PretrainedError(f"hub repo {repo_id!r} has no config.json; not a Hugging Face or timm model repo")
    return d


# ----------------------------------------------------------------------------
# timm
# ----------------------------------------------------------------------------
def read_timm_state(state: dict, path, hub_cfg: dict | None = None) -> Source:
    """A timm-named state dict: copy the tensors, read the architecture off their shapes."""
    w = state.get("patch_embed.proj.weight")
    if w is None or w.ndim != 4:
        raise PretrainedError(f"{path}: no patch_embed.proj.weight; not a timm ViT state dict")
    dim, in_chans, patch = w.shape[0], w.shape[1], tuple(w.shape[2:])
    distilled = "dist_token" in state
    prefix = 2 if distilled else 1
    if "pos_embed" not in state:
        raise PretrainedError(f"{path}: no pos_embed; not a timm ViT state dict")
    depth = _count_blocks(state, r"^blocks\.(\d+)\.")
    if depth == 0:
        raise PretrainedError(f"{path}: no blocks.N.* keys; not a timm ViT state dict")
    hub_cfg = hub_cfg or {}
    pcfg = hub_cfg.get("pretrained_cfg", {})
    size_hint = pcfg.get("input_size")  # (C, H, W) in a timm hub config
    img = _grid_from_tokens(state["pos_embed"].shape[1] - prefix, patch, size_hint[1:] if size_hint else None)
    head = state.get("head.weight")
    arch = dict(
        embed_dim=dim, depth=depth, num_heads=None,  # not in the shapes: caller, preset or width table
        mlp_dim=state["blocks.0.mlp.fc1.weight"].shape[0] if "blocks.0.mlp.fc1.weight" in state else 4 * dim,
        patch_size=patch, img_size=img, in_chans=in_chans, qkv_bias="blocks.0.attn.qkv.bias" in state,
        norm_eps=1e-6, num_classes=head.shape[0] if head is not None else 0, distilled=distilled,
        layer_scale=1e-5 if "blocks.0.ls1.gamma" in state else None,  # the value is overwritten by the load
    )
    name = hub_cfg.get("architecture") or Path(str(path)).stem
    # A name hint: timm and vitlab share preset names ("vit_small_patch16_224",
    # "deit_tiny_distilled_patch16_224"), with a ".tag" after timm's. Still a
    # guess (a num_heads= argument or a preset passed by the caller wins).
    hint = PRESETS.get(name.split(".")[0])
    if hint is not None and hint.family == "vit" and hint.kwargs.get("embed_dim") == dim:
        arch["num_heads"] = hint.kwargs["num_heads"]
    src = Source("timm", dict(state), arch, guessed={"num_heads"}, name=name)
    # Normalisation is not in a bare state dict: DeiT trained with ImageNet's
    # statistics, timm's ViT weights (Google's) with 0.5/0.5.
    if pcfg.get("mean") and pcfg.get("std"):
        src.mean, src.std = tuple(pcfg["mean"]), tuple(pcfg["std"])
    elif distilled or "deit" in name.lower():
        src.mean, src.std = IMAGENET_MEAN, IMAGENET_STD
    labels = hub_cfg.get("label_names") or pcfg.get("label_names")
    if labels and len(labels) == arch["num_classes"]:
        src.classes = list(labels)
    return src


# ----------------------------------------------------------------------------
# torchvision
# ----------------------------------------------------------------------------
_TV_BLOCK = re.compile(r"^encoder\.layers\.encoder_layer_(\d+)\.(.+)$")
_TV_BLOCK_NAMES = {
    "ln_1": "norm1", "ln_2": "norm2",
    "self_attention.out_proj": "attn.proj",
    "mlp.0": "mlp.fc1", "mlp.3": "mlp.fc2",
    "mlp.linear_1": "mlp.fc1", "mlp.linear_2": "mlp.fc2",  # torchvision < 0.13 names
}
_TV_TOP = {
    "conv_proj.weight": "patch_embed.proj.weight", "conv_proj.bias": "patch_embed.proj.bias",
    "class_token": "cls_token", "encoder.pos_embedding": "pos_embed",
    "encoder.ln.weight": "norm.weight", "encoder.ln.bias": "norm.bias",
    "heads.head.weight": "head.weight", "heads.head.bias": "head.bias",
}


def convert_torchvision(state: dict) -> dict:
    """torchvision VisionTransformer keys -> vitlab keys. nn.MultiheadAttention's
    in_proj is already the fused q|k|v projection, so it is a rename."""
    out = {}
    for k, v in state.items():
        if k in _TV_TOP:
            out[_TV_TOP[k]] = v
            continue
        m = _TV_BLOCK.match(k)
        if m:
            i, rest = m.group(1), m.group(2)
            if rest.startswith("self_attention.in_proj_"):
                out[f"blocks.{i}.attn.qkv.{rest.rsplit('_', 1)[1]}"] = v
                continue
            sub, _, kind = rest.rpartition(".")
            if sub in _TV_BLOCK_NAMES:
                out[f"blocks.{i}.{_TV_BLOCK_NAMES[sub]}.{kind}"] = v
                continue
        out[k] = v
    return out


def read_torchvision_state(state: dict, path) -> Source:
    notes = []
    if any(k.startswith("heads.pre_logits") for k in state):
        # A representation layer (Linear + tanh before the head) vitlab does not have:
        # keep the backbone, drop that layer and the head it feeds.
        state = {k: v for k, v in state.items() if not k.startswith("heads.")}
        notes.append("dropped the pre-logits layer and its head (vitlab's ViT has no representation layer)")
    out = convert_torchvision(state)
    timm_src = read_timm_state(out, path)
    timm_src.format = "torchvision"
    timm_src.arch["qkv_bias"] = True  # nn.MultiheadAttention always has in_proj_bias here
    timm_src.mean, timm_src.std = IMAGENET_MEAN, IMAGENET_STD  # torchvision's ViT weights use ImageNet stats
    timm_src.notes = notes
    return timm_src


# ----------------------------------------------------------------------------
# Google .npz (the original JAX ViT)
# ----------------------------------------------------------------------------
def convert_npz(w: dict) -> tuple[dict, dict, list]:
    """Google ViT .npz arrays -> (vitlab state dict, architecture, notes).

    JAX layouts: conv kernels HWIO (-> OIHW); Dense kernels (in, out) (-> (out, in));
    attention query/key/value kernels (D, h, d) and biases (h, d); the output
    kernel (h, d, D). Flattening (h, d) keeps heads major, which is timm's qkv order.
    """
    t = lambda a: torch.from_numpy(np.ascontiguousarray(a)).float()  # noqa: E731
    kernel = w["embedding/kernel"]  # (P, P, C, D)
    dim = kernel.shape[3]
    out = {"patch_embed.proj.weight": t(kernel.transpose(3, 2, 0, 1)),
           "patch_embed.proj.bias": t(w["embedding/bias"]),
           "cls_token": t(w["cls"]),
           "pos_embed": t(w["Transformer/posembed_input/pos_embedding"]),
           "norm.weight": t(w["Transformer/encoder_norm/scale"]),
           "norm.bias": t(w["Transformer/encoder_norm/bias"])}
    depth = _count_blocks(w, r"^Transformer/encoderblock_(\d+)/")
    heads = None
    qkv_bias = True
    for i in range(depth):
        p = f"Transformer/encoderblock_{i}/"
        att = p + "MultiHeadDotProductAttention_1/"
        q = w[att + "query/kernel"]  # (D, h, d)
        heads = q.shape[1]
        out[f"blocks.{i}.norm1.weight"] = t(w[p + "LayerNorm_0/scale"])
        out[f"blocks.{i}.norm1.bias"] = t(w[p + "LayerNorm_0/bias"])
        out[f"blocks.{i}.attn.qkv.weight"] = torch.cat(
            [t(w[att + f"{n}/kernel"].reshape(dim, -1).T) for n in ("query", "key", "value")])  # (3*h*d, D)
        qkv_bias = att + "query/bias" in w
        if qkv_bias:
            out[f"blocks.{i}.attn.qkv.bias"] = torch.cat(
                [t(w[att + f"{n}/bias"].reshape(-1)) for n in ("query", "key", "value")])
        o = w[att + "out/kernel"]  # (h, d, D)
        out[f"blocks.{i}.attn.proj.weight"] = t(o.reshape(-1, o.shape[-1]).T)  # (D, h*d)
        out[f"blocks.{i}.attn.proj.bias"] = t(w[att + "out/bias"])
        out[f"blocks.{i}.norm2.weight"] = t(w[p + "LayerNorm_2/scale"])
        out[f"blocks.{i}.norm2.bias"] = t(w[p + "LayerNorm_2/bias"])
        for j in (0, 1):
            out[f"blocks.{i}.mlp.fc{j + 1}.weight"] = t(w[p + f"MlpBlock_3/Dense_{j}/kernel"].T)
            out[f"blocks.{i}.mlp.fc{j + 1}.bias"] = t(w[p + f"MlpBlock_3/Dense_{j}/bias"])
    notes, num_classes = [], 0
    if "pre_logits/kernel" in w:
        notes.append("dropped the pre-logits layer and its head (vitlab's ViT has no representation layer)")
    elif "head/kernel" in w:
        out["head.weight"] = t(w["head/kernel"].T)
        out["head.bias"] = t(w["head/bias"])
        num_classes = out["head.weight"].shape[0]
    patch = tuple(kernel.shape[:2])
    arch = dict(embed_dim=dim, depth=depth, num_heads=int(heads or default_num_heads(dim)),
                mlp_dim=out["blocks.0.mlp.fc1.weight"].shape[0] if depth else 4 * dim, patch_size=patch,
                img_size=_grid_from_tokens(out["pos_embed"].shape[1] - 1, patch), in_chans=kernel.shape[2],
                qkv_bias=qkv_bias, norm_eps=1e-6, num_classes=num_classes, distilled=False)
    return out, arch, notes


def read_npz(path: Path) -> Source:
    try:
        with np.load(path, allow_pickle=False) as f:
            w = {k: f[k] for k in f.files}
    except Exception as e:  # noqa: BLE001 - zip/format errors
        raise PretrainedError(f"{path} is not a readable .npz file ({type(e).__name__}: {brief(e)})") from None
    if any(k.startswith("opt/target/") for k in w):  # some Google releases keep the optimizer's tree
        w = {k[len("opt/target/"):]: v for k, v in w.items() if k.startswith("opt/target/")}
    if "embedding/kernel" not in w or "Transformer/posembed_input/pos_embedding" not in w:
        raise PretrainedError(f"{path}: not an original Google ViT .npz (no embedding/kernel; "
                              f"keys start {sorted(w)[:3]}); big_vision checkpoints are not supported")
    try:
        state, arch, notes = convert_npz(w)
    except KeyError as e:
        raise PretrainedError(f"{path}: Google ViT .npz without the key {e.args[0]!r}") from None
    return Source("npz", state, arch, name=path.stem, notes=notes)


# ----------------------------------------------------------------------------
# vitlab's own checkpoints
# ----------------------------------------------------------------------------
def _vitlab_meta_norm(meta: dict):
    """Class names and normalisation from a vitlab checkpoint's metadata, wherever the writer put them."""
    classes = meta.get("classes") or meta.get("class_names")
    norm = meta.get("normalize") or meta.get("normalization") or {}
    cfg_data = (meta.get("config") or {}).get("data", {}) if isinstance(meta.get("config"), dict) else {}
    mean = meta.get("mean") or norm.get("mean") or cfg_data.get("mean")
    std = meta.get("std") or norm.get("std") or cfg_data.get("std")
    return (list(classes) if isinstance(classes, (list, tuple)) else None,
            tuple(mean) if mean else None, tuple(std) if std else None)


def read_vitlab(path: Path) -> Source:
    from ..train.checkpoint import load_model

    model, meta = load_model(path)
    arch = dict(model.arch.get("kwargs", {}))
    classes, mean, std = _vitlab_meta_norm(meta)
    src = Source("vitlab", {k: v for k, v in model.state_dict().items()}, arch, classes=classes,
                 name=model.arch.get("name", "vit"), family=model.arch.get("family", "vit"), model=model)
    if mean and std:
        src.mean, src.std = mean, std
    elif src.family != "vit":
        src.mean, src.std = IMAGENET_MEAN, IMAGENET_STD
    return src


# ----------------------------------------------------------------------------
# Detection
# ----------------------------------------------------------------------------
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def _is_vitlab_safetensors(path: Path) -> bool:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), "pt") as f:
            return (f.metadata() or {}).get("format") == "vitlab"
    except (SafetensorError, OSError, ValueError, RuntimeError):
        return False


def detect_format(path_or_id) -> str:
    """'hf' (HF or timm hub dir), 'vitlab', 'npz', 'safetensors' / 'torch' (layout
    then read off the keys), or 'hub' for an owner/name that is not a local path."""
    p = Path(path_or_id)
    if p.is_dir():
        # vitlab first: a run directory may hold its own config files beside the weights.
        if (p / "model.safetensors").is_file() and _is_vitlab_safetensors(p / "model.safetensors"):
            return "vitlab"
        if (p / "config.json").is_file():
            return "hf"
        if (p / "model.safetensors").is_file():  # a run directory whose weights file is damaged?
            from safetensors import SafetensorError, safe_open

            try:
                with safe_open(str(p / "model.safetensors"), "pt"):
                    pass  # readable: someone else's weights without their config.json (the message below)
            except (SafetensorError, OSError, ValueError, RuntimeError) as e:
                raise PretrainedError(f"{p / 'model.safetensors'} is not a readable safetensors file "
                                      f"({brief(e)})") from None
        raise PretrainedError(f"{p} is neither a Hugging Face model directory (config.json) nor a vitlab run "
                              f"directory (model.safetensors)")
    if p.is_file():
        suffix = p.suffix.lower()
        if suffix == ".npz":
            return "npz"
        if suffix == ".safetensors":
            return "vitlab" if _is_vitlab_safetensors(p) else "safetensors"
        if suffix in TORCH_SUFFIXES:
            return "torch"
        raise PretrainedError(f"{p}: unknown checkpoint format {suffix or '(no suffix)'!r}; expected a Hugging Face "
                              f"directory, a vitlab run, .safetensors, .pth/.pt/.bin or a Google .npz")
    s = str(path_or_id)
    if _HUB_ID.match(s) and not s.startswith((".", "/")):
        return "hub"
    raise PretrainedError(f"checkpoint not found: {s}")


def read_source(path_or_id) -> Source:
    """Any supported checkpoint -> Source (vitlab-named tensors + architecture)."""
    p = Path(path_or_id)
    if p.name == "last.ckpt" and (p.parent / "config.yaml").is_file():  # as eval, predict and export refuse it
        raise PretrainedError(f"{p} is a vitlab run's training state (for vitlab train --resume); pass the run "
                              f"folder {p.parent} to start from its best weights")
    fmt = detect_format(path_or_id)
    if fmt == "hub":
        return read_hf_dir(fetch_hub(str(path_or_id)), name_hint=str(path_or_id).split("/")[-1])
    if fmt == "hf":
        return read_hf_dir(p)
    if fmt == "vitlab":
        return read_vitlab(p)
    if fmt == "npz":
        return read_npz(p)
    if fmt == "safetensors":
        state = _safetensors_load(p)[0]
    else:
        state = _unwrap(_torch_load(p), p)
    layout = _layout(state)
    if layout == "timm":
        return read_timm_state(state, p)
    if layout == "torchvision":
        return read_torchvision_state(state, p)
    if layout == "hf":
        if (p.parent / "config.json").is_file():
            return read_hf_dir(p.parent)
        raise PretrainedError(f"{p} has Hugging Face key names but no config.json beside it; pass the model directory")
    raise PretrainedError(f"{p}: unknown weights layout (keys start {sorted(state)[:3]}); expected timm, "
                          f"torchvision or Hugging Face ViT names")


# ----------------------------------------------------------------------------
# Strict loading
# ----------------------------------------------------------------------------
def _few(items, n=3) -> str:
    return ", ".join(items[:n]) + (f" (+{len(items) - n} more)" if len(items) > n else "")


def load_state_strict(model: torch.nn.Module, state: dict, source: str = "checkpoint") -> None:
    """Copy `state` into `model` only if every key and shape matches; otherwise one line naming them."""
    expected = model.state_dict()
    wrong = [f"{k} expected {tuple(expected[k].shape)} got {tuple(state[k].shape)}"
             for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k].shape)]
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    problems = []
    if wrong:
        problems.append(f"shape mismatch: {_few(wrong)}")
    if missing:
        problems.append(f"missing: {_few(missing)}")
    if unexpected:
        problems.append(f"unexpected: {_few(unexpected)}")
    if problems:
        raise PretrainedError(f"{source} does not fit the model; " + "; ".join(problems))
    with torch.no_grad():
        model.load_state_dict({k: v.to(expected[k].dtype) for k, v in state.items()}, strict=True)


# ----------------------------------------------------------------------------
# The entry point
# ----------------------------------------------------------------------------
def load_pretrained(path_or_id, num_classes: int | None = None, img_size=None, preset: str | None = None,
                    **overrides):
    """Build a vitlab model from any supported checkpoint; returns (model in eval mode, info).

    path_or_id: a Hugging Face directory or hub id, a timm / torchvision /
        vitlab .pth/.bin/.safetensors file, a Google .npz, or a vitlab run dir.
    num_classes: a different class count puts on a fresh head (0: no head).
    img_size: a different resolution resamples the position embeddings (bicubic).
    preset: a registry name whose architecture the weights must have; the preset
        also supplies what the file cannot say (heads of timm/torchvision files).
    overrides: any other VisionTransformer argument (drop_path_rate=0.1,
        num_heads=... for a timm file of a non-standard width, ...).

    info: format, source, classes (None if unknown or the head was replaced),
    num_classes, mean, std, img_size, head ("pretrained" / "new" / "none"), notes.
    """
    src = read_source(path_or_id)
    source = str(path_or_id)
    if src.family != "vit":  # a vitlab ResNet checkpoint: nothing to convert
        model, head = src.model, "pretrained"
        if num_classes is not None and num_classes != model.num_classes:
            model.reset_classifier(num_classes)  # (which keeps model.arch true)
            src.classes, head = None, "new"
        return model.eval(), _info(src, source, model, head)

    kwargs = dict(src.arch)
    name = src.name
    if preset is not None:
        p = get_preset(preset)
        if p.family != "vit":
            raise PretrainedError(f"preset {preset!r} is not a ViT; cannot load {src.format} ViT weights into it")
        want = {**_vit_defaults(), **p.kwargs}
        if want.get("mlp_dim") is None:
            want["mlp_dim"] = 4 * want["embed_dim"]
        clash = [f"{k}={src.arch[k]} (preset: {want[k]})" for k in STRUCTURE
                 if k in src.arch and k not in src.guessed and not _same(k, src.arch[k], want[k])]
        if clash:
            raise PretrainedError(f"{source} is not a {preset}: checkpoint has {_few(clash)}")
        # The preset fills in what the source could not state (heads for timm files)
        # and its training defaults (drop rates); the source decides the rest.
        kwargs = {**p.kwargs, **{k: v for k, v in src.arch.items() if k not in src.guessed}}
        name = preset
    kwargs.update({k: v for k, v in overrides.items() if v is not None})
    if src.family == "vit" and kwargs.get("num_heads") is None:
        kwargs["num_heads"] = default_num_heads(kwargs["embed_dim"])

    try:
        model = build_from_arch({"name": name, "family": "vit", "kwargs": kwargs})
    except ValueError as e:
        raise PretrainedError(f"{source}: cannot build the model: {e}") from None
    load_state_strict(model, src.state, source)
    check_heads(model, src, source)

    head = "pretrained" if model.num_classes > 0 else "none"
    if num_classes is not None and num_classes != model.num_classes:
        model.reset_classifier(num_classes)
        src.classes = None
        head = "new" if num_classes > 0 else "none"
    if img_size is None and preset is not None:
        img_size = get_preset(preset).kwargs.get("img_size")
    if img_size is not None and _pair(img_size) != model.img_size:
        try:
            model.set_img_size(img_size)
        except ValueError as e:  # a size its patches do not tile
            raise PretrainedError(f"{source} cannot run at img_size {img_size}: {e}") from None
    # Keep the record true, so a checkpoint saved from this model rebuilds it.
    model.arch["kwargs"].update(num_classes=model.num_classes, img_size=list(model.img_size))
    return model.eval(), _info(src, source, model, head)


def check_heads(model, src: Source, source: str) -> None:
    """The one thing shapes cannot catch: a head count that differs from what the source states."""
    if "num_heads" in src.arch and "num_heads" not in src.guessed:
        got = model.blocks[0].attn.num_heads if len(model.blocks) else src.arch["num_heads"]
        if got != src.arch["num_heads"]:
            raise PretrainedError(f"{source} has {src.arch['num_heads']} attention heads; the model was built "
                                  f"with {got}")


def _vit_defaults() -> dict:
    import inspect

    from .vit import VisionTransformer

    return {k: p.default for k, p in inspect.signature(VisionTransformer).parameters.items()}


def _same(key, a, b) -> bool:
    if key in ("patch_size", "img_size"):
        return _pair(a) == _pair(b)
    return a == b


def _info(src: Source, source: str, model, head: str) -> dict:
    img = getattr(model, "img_size", None)
    return {
        "format": src.format, "source": source, "name": model.arch.get("name"),
        "classes": src.classes, "num_classes": getattr(model, "num_classes", None),
        "mean": tuple(float(x) for x in src.mean), "std": tuple(float(x) for x in src.std),
        "img_size": tuple(img) if img is not None else None, "head": head, "notes": list(src.notes),
    }


def default_source(preset: str) -> str:
    """The hub repo `create_model(preset, pretrained=True)` loads."""
    if preset not in DEFAULT_SOURCES:
        known = ", ".join(DEFAULT_SOURCES)
        raise PretrainedError(f"no default pretrained weights for {preset!r} (known: {known}); "
                              f"pass pretrained=PATH_OR_HUB_ID")
    return DEFAULT_SOURCES[preset]


__all__ = ["DEFAULT_SOURCES", "PretrainedError", "WIDTH_HEADS", "convert_hf", "convert_npz", "convert_torchvision",
           "default_num_heads", "default_source", "detect_format", "load_pretrained", "load_state_strict",
           "read_source"]
