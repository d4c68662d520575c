"""`vitlab visualize`: attention pictures of a trained model, as PNG files.

    vitlab visualize --checkpoint runs/NAME                 # 4 test samples of the run's dataset
    vitlab visualize --checkpoint runs/NAME --samples 8 --head-fusion max --discard-ratio 0.9
    vitlab visualize --checkpoint model.safetensors cat.jpg dog.png --out pics/

Writes, into --out (default RUN/plots/, or a plots/ folder beside a .safetensors file):
    attention_map.png                          originals on top, rollout maps below
    attention_heads_sample_{i}_{class}.png     every head of the last layer
    attention_rollout_sample_{i}_{class}.png   original, raw rollout, overlay, class-specific rollout
    attention_layers_sample_{i}_{class}.png    the token's attention at every layer
i counts from 1; class is the true class of a test sample, the predicted class of an image file.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import torch

from ..data.files import read_image_file
from ..errors import UserError
from ..train.predict import expand_paths
from ..utils import file_part, make_dir, staged
from .attention import HEAD_FUSIONS, TOKENS


def add_arguments(p) -> None:
    p.add_argument("--checkpoint", required=True, metavar="RUN_DIR_OR_FILE",
                   help="a run directory or a model .safetensors file")
    p.add_argument("images", nargs="*", metavar="IMAGE", help="image files (or folders of them) to explain (default: test samples)")
    p.add_argument("--samples", type=int, default=None, metavar="N",
                   help="test samples of the run's dataset, spread over the classes (default 4 without images)")
    p.add_argument("--out", default=None, metavar="DIR", help="output folder (default RUN/plots)")
    p.add_argument("--seed", type=int, default=0, help="which test samples are drawn")
    p.add_argument("--head-fusion", choices=HEAD_FUSIONS, default="mean", help="how rollout merges the heads")
    p.add_argument("--discard-ratio", type=float, default=0.0, metavar="R",
                   help="rollout drops this share of the lowest attentions per row (never [CLS]); 0 to 0.99")
    p.add_argument("--token", choices=TOKENS, default="cls", help="whose attention: [CLS] or, distilled models, [DIST]")
    p.add_argument("--data-dir", default=None, metavar="DIR",
                   help="where the run's dataset lives, if not where training found it")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")


def _device(spec: str) -> torch.device:
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(spec)
    except RuntimeError:
        raise UserError(f"unknown device {spec!r} (auto, cpu, cuda, cuda:N)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device {spec!r} asked for, but no CUDA GPU is available")
    return dev


PROGRESS_FROM = 16  # images: from here on, progress bars (about 0.25 s each on a CPU)
SUMMARY_MAX = 32  # images in attention_map.png: 4 row pairs of 8


def pick_samples(labels: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    """n indices spread over the classes: one per class (in a seeded random order) before any second one."""
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))  # (M,)
    lab = labels[order]
    rank = torch.empty_like(lab)  # rank[j]: how many earlier entries of `order` share lab[j]'s class
    for c in lab.unique():
        sel = (lab == c).nonzero().squeeze(1)
        rank[sel] = torch.arange(len(sel))
    keep = torch.sort(rank, stable=True).indices[:n]
    return order[keep]


def _test_samples(meta: dict, args, size: tuple[int, int], in_chans: int):
    """(uint8 images (n, C, H, W) at the model's size, labels, boxes or None) from the run's test split."""
    from ..config import DataConfig
    from ..data import build_data
    from ..data.augment import fit_size
    from ..data.base import FileSplit

    cfg = (meta.get("config") or {}).get("data")
    if not cfg:
        raise UserError("this checkpoint records no dataset; pass image files to visualise instead")
    fields = {k: v for k, v in cfg.items() if k in DataConfig.__dataclass_fields__}
    if args.data_dir:
        fields["dir"] = args.data_dir
    fields["download"] = False  # pictures should never start a download
    bundle = build_data(DataConfig(**fields))
    split = bundle.test
    idx = pick_samples(split.labels, args.samples, args.seed)
    boxes = None
    if isinstance(split, FileSplit):
        from ..data.files import decode

        side = max(size)
        imgs = torch.stack([decode(split.paths[i], round(side * 256 / 224), side) for i in idx.tolist()])
    else:
        imgs = split.images[idx]
        if split.boxes is not None and tuple(imgs.shape[-2:]) == tuple(size):
            boxes = split.boxes[idx]  # only meaningful when the pixels are not resampled
    imgs = fit_size(imgs, tuple(size), None)  # centre crop or resize, as evaluation does
    if imgs.dtype != torch.uint8:
        imgs = imgs.round().clamp(0, 255).to(torch.uint8)
    if imgs.shape[1] != in_chans:
        if in_chans == 1:  # an RGB dataset under a grayscale model: luminance
            imgs = imgs.float().mean(1, keepdim=True).round().to(torch.uint8)
        else:
            imgs = imgs.expand(-1, in_chans, -1, -1)
    return imgs, split.labels[idx], boxes


def default_out(checkpoint: str) -> Path:
    p = Path(checkpoint)
    return p / "plots" if p.is_dir() else p.parent / "plots"


def run(args) -> int:
    from ..train.checkpoint import load_model
    from . import plots
    from .attention import attention_maps

    if args.samples is not None and args.samples < 1:
        raise UserError(f"--samples must be at least 1, got {args.samples}")
    if not 0.0 <= args.discard_ratio < 1.0:
        raise UserError(f"--discard-ratio must be in [0, 1), got {args.discard_ratio}")
    if args.samples is None and not args.images:
        args.samples = 4
    model, meta = load_model(args.checkpoint)
    if not hasattr(model, "num_prefix_tokens"):
        raise UserError(f"{args.checkpoint} holds a {type(model).__name__}, which has no attention to show")
    if args.token == "dist" and not getattr(model, "distilled", False):
        raise UserError("--token dist needs a distilled model (one with a [DIST] token)")
    device = _device(args.device)
    model.to(device)
    size, C = tuple(model.img_size), model.in_chans
    classes = list(meta.get("classes") or [str(k) for k in range(model.num_classes)])
    mean, std = meta.get("mean"), meta.get("std")
    note = ""
    if not mean or not std:
        mean, std, note = [0.5] * C, [0.5] * C, " (no normalisation recorded: used mean = std = 0.5)"

    # Gather what to show: image files first, then test samples. Read every file
    # before any work, so a bad path fails fast with its name.
    shown, truth, boxes, files = [], [], [], []
    for path in expand_paths(args.images):  # a folder: its image files, as `vitlab predict` takes them
        shown.append(read_image_file(path, C, size))
        truth.append(None)
        boxes.append(None)
        files.append(Path(path).name)
    if args.samples:
        imgs, labels, bx = _test_samples(meta, args, size, C)
        if len(imgs) < args.samples:
            print(f"note: the test split has {len(imgs)} images; showing all of them, not {args.samples}",
                  file=sys.stderr)
        shown.extend(imgs)
        truth.extend(classes[k] if k < len(classes) else str(k) for k in labels.tolist())
        boxes.extend([None] * len(imgs) if bx is None else list(bx))
        files.extend([None] * len(imgs))
    images = torch.stack(shown)  # uint8 (n, C, H, W)
    out = make_dir(Path(args.out) if args.out else default_out(args.checkpoint))  # the inputs are good; before the maps
    earlier = [f for f in out.glob("attention_*_*_*.png")  # an earlier call's per-image pictures
               if re.fullmatch(r"attention_(heads|rollout|layers)_(sample|image)_\d+_.*\.png", f.name)]

    m = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    if m.shape[1] != C:
        raise UserError(f"the checkpoint's normalisation has {m.shape[1]} channels but the model takes {C}")
    x = (images.float() / 255 - m) / s  # (n, C, H, W), as the model was trained on
    # In chunks: the maps hold every layer's (h, N, N) weights, 22 MB per image for ViT-B/16.
    from tqdm.auto import tqdm

    quiet = len(x) < PROGRESS_FROM  # a bar only where the wait is long enough to wonder
    chunks = [attention_maps(model, x[i:i + 8], head_fusion=args.head_fusion, discard_ratio=args.discard_ratio,
                             token=args.token, gradient=True)
              for i in tqdm(range(0, len(x), 8), desc="attention maps", unit="batch of 8", disable=quiet, leave=False)]
    maps = {k: torch.cat([c[k] for c in chunks]) for k in chunks[0]}
    pred = [classes[k] if k < len(classes) else str(k) for k in maps["pred"].tolist()]

    how = f"rollout, heads {args.head_fusion}, discard {args.discard_ratio:g}, [{args.token.upper()}]"
    k = min(len(images), SUMMARY_MAX)  # the overview stays a readable grid; every image gets its own pictures
    first = f" (the first {k} of {len(images)})" if k < len(images) else ""
    # the set moves into `out` only once whole, and the earlier call's other pictures go with that move:
    # an interrupted call leaves the old set, never a mix of two
    with staged(out, stale=lambda names: [f for f in earlier if f.name not in names]) as stage:
        plots.save(plots.plot_summary(images[:k], maps["rollout"][:k], truth[:k], pred[:k],
                                      title=f"Attention {how}{first}", boxes=boxes[:k]), stage / "attention_map.png")
        for i in tqdm(range(len(images)), desc="pictures", unit="image", disable=quiet, leave=False):
            # a test sample is named by its true class; a user's image by its file (its class is unknown)
            if files[i] is None:
                tag, label = f"sample_{i + 1}_{file_part(truth[i])}", f"sample {i + 1}: true {truth[i]}, pred {pred[i]}"
            else:
                tag, label = f"image_{i + 1}_{file_part(Path(files[i]).stem)}", f"{files[i]}: pred {pred[i]}"
            plots.save(plots.plot_heads(images[i], maps["heads"][i], label, token=args.token),
                       stage / f"attention_heads_{tag}.png")
            plots.save(plots.plot_rollout(images[i], maps["rollout"][i], f"{label}  ({how})", maps["grad_rollout"][i],
                                          f"why '{pred[i]}' (gradient rollout)", box=boxes[i]),
                       stage / f"attention_rollout_{tag}.png")
            plots.save(plots.plot_layers(images[i], maps["layers"][i], label, args.head_fusion, token=args.token),
                       stage / f"attention_layers_{tag}.png")
    known = [t for t in truth if t is not None]
    right = sum(t == p for t, p in zip(truth, pred) if t is not None)
    score = f", {right}/{len(known)} predicted right" if known else ""
    n = len(images)
    print(f"visualize: {n} image{'s' if n != 1 else ''}{score}; wrote {1 + 3 * len(images)} PNGs to {out}{note}")
    return 0
