"""`vitlab predict IMAGE...`: top-k classes with names, from a run dir or .safetensors file."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from ..data.files import read_image_file
from ..errors import UserError
from .checkpoint import load_model


def add_arguments(p):
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files, or folders (their images, sorted)")
    p.add_argument("--checkpoint", required=True, metavar="RUN_DIR_OR_FILE",
                   help="a run folder (its best weights, model.safetensors) or a .safetensors file")
    p.add_argument("--top-k", type=int, default=5, help="classes shown per image (default: 5)")
    p.add_argument("--batch-size", type=int, default=64,
                   help="images read and classified at a time (default: 64; memory grows with it, not with the "
                        "image count)")
    p.add_argument("--tta", choices=["none", "flip", "flip-shift"], default="none",
                   help="test-time augmentation, as vitlab eval --tta: average the logits over the image and its "
                        "mirror (flip, 2x the cost) or also their 1-pixel shifts (flip-shift, 10x)")
    p.add_argument("--device", default="auto", help="auto (a GPU if there is one) | cpu | cuda | cuda:N")
    p.add_argument("--precision", default="fp32",
                   help="fp32 (default: the probabilities printed exactly as the fp32 model gives them) | bf16 | "
                        "fp16 | auto (bf16 where it is fast, as vitlab eval; faster on many images)")


def expand_paths(args: list[str]) -> list[str]:
    """IMAGE arguments -> image files: a folder stands for the image files directly in it, sorted."""
    from ..data.sources import IMAGE_EXTS, image_files

    out = []
    for a in args:
        p = Path(a)
        if p.is_dir():
            found = image_files(p, recursive=False)
            if not found:
                subs = sum(1 for q in p.iterdir() if q.is_dir())
                also = (f"; its {subs} subfolder{'s are' if subs != 1 else ' is'} not searched: name "
                        f"{'them' if subs != 1 else 'it'} instead") if subs else ""
                raise UserError(f"no image files ({', '.join(sorted(IMAGE_EXTS))}) in the folder {a}{also}")
            out += found
        else:
            out.append(a)
    return out


# Images decoded by the up-front check are kept (uint8, at the model's size) up to this many bytes,
# so a typical call decodes each file once; past it (tens of thousands of 224-px images) the rest
# are decoded again when their chunk comes.
CACHE_BYTES = 256 * 2**20


def crops_like_training(meta: dict, img_size: tuple[int, int]) -> bool:
    """A model trained on image files (flowers102, imagefolder:PATH) saw them as 'resize the shorter
    side to 256/224 of the input, centre crop' (vitlab.data.files): predict prepares them the same
    way. The tensor datasets (CIFAR, MNIST, shapes) and imported checkpoints are whole images
    resized to the input size, as Hugging Face's ViT image processor does."""
    data = str(meta.get("data") or "")
    return (data == "flowers102" or data.startswith("imagefolder:")) and img_size[0] == img_size[1]


def check_images(paths: list[str], read) -> list[torch.Tensor | None]:
    """Decode every file before any answer is printed, so a bad file among thousands fails the
    command up front (a full decode: Pillow's verify() passes a truncated JPEG). -> each image
    (uint8 (C, H, W)), kept while they fit in CACHE_BYTES, else None (decoded again in its chunk)."""
    kept, used = [], 0
    for p in paths:
        x = read(p)
        fits = used + x.nbytes <= CACHE_BYTES
        kept.append(x if fits else None)
        used += x.nbytes if fits else 0
    return kept


def to_batch(images: list[torch.Tensor], mean, std) -> torch.Tensor:
    """uint8 (C, H, W) images -> normalised float batch (B, C, H, W)."""
    x = torch.stack(images).float().div_(255)
    m = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    return (x - m) / s


def classify(model, x: torch.Tensor, tta: str = "none", amp_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Logits (B, num_classes) in fp32 (computed under autocast to amp_dtype if given); with TTA the
    mean over the views, as `vitlab eval` scores them."""
    from .engine import autocast, tta_views

    with autocast(x.device, amp_dtype):
        if tta == "none":
            return model(x).float()
        return torch.stack([model(v).float() for v in tta_views(x, tta)]).mean(0)


def run(args) -> int:
    if args.batch_size < 1:
        raise UserError(f"--batch-size must be positive, got {args.batch_size}")
    if args.top_k < 1:
        raise UserError(f"--top-k must be positive, got {args.top_k}")
    from .engine import resolve_device, resolve_precision

    device = resolve_device(args.device, flag="--device")
    amp_dtype, _ = resolve_precision(args.precision, device)
    model, meta = load_model(args.checkpoint, map_location=device)
    classes = meta.get("classes") or [str(i) for i in range(model.num_classes)]
    mean = meta.get("mean") or [0.5] * model.in_chans
    std = meta.get("std") or [0.5] * model.in_chans
    k = max(1, min(args.top_k, model.num_classes))
    images = expand_paths(args.images)
    size = tuple(model.img_size)
    crop = crops_like_training(meta, size)

    def read(p):
        return read_image_file(p, model.in_chans, size, crop)

    kept = check_images(images, read)
    names = [Path(q).name for q in images]
    if len(set(names)) < len(names):  # a/x.png and b/x.png: each answer headed by its path instead
        names = list(images)
    # a chunk at a time: a folder of thousands of images must not become one giant batch; each
    # chunk's answers are printed as it finishes
    for start in range(0, len(images), args.batch_size):
        paths = images[start:start + args.batch_size]
        chunk = kept[start:start + args.batch_size]
        x = to_batch([a if a is not None else read(p) for p, a in zip(paths, chunk)], mean, std).to(device)
        with torch.no_grad():
            probs = F.softmax(classify(model, x, args.tta, amp_dtype), dim=-1).cpu()
        top = probs.topk(k, dim=-1)
        for name, p, idx in zip(names[start:start + args.batch_size], top.values, top.indices):
            print(f"{name}:")
            for pi, ii in zip(p.tolist(), idx.tolist()):
                print(f"  {pi * 100:6.2f}%  {classes[ii]}")
    return 0
