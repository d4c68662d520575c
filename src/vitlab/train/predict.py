"""`vitlab predict IMAGE...`: top-k classes with names, from a run dir or .safetensors file."""

from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import UserError
from .checkpoint import load_model


def add_arguments(p):
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files, or folders (their images, sorted)")
    p.add_argument("--checkpoint", required=True, metavar="RUN_DIR_OR_FILE")
    p.add_argument("--top-k", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=64,
                   help="images read and classified at a time (memory grows with it, not with the image count)")


def expand_paths(args: list[str]) -> list[str]:
    """IMAGE arguments -> image files: a folder stands for the image files directly in it, sorted."""
    from ..data.sources import IMAGE_EXTS, image_files

    out = []
    for a in args:
        p = Path(a)
        if p.is_dir():
            found = image_files(p, recursive=False)
            if not found:
                raise UserError(f"no image files ({', '.join(sorted(IMAGE_EXTS))}) in the folder {a}")
            out += found
        else:
            out.append(a)
    return out


@contextlib.contextmanager
def reading(p: str):
    """Pillow's errors while reading image p -> one UserError line naming the file."""
    from PIL import Image, UnidentifiedImageError

    try:
        yield
    except FileNotFoundError:
        raise UserError(f"image not found: {p}") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError,  # a bad or truncated file
            Image.DecompressionBombError) as e:  # a header claiming an absurd size
        raise UserError(f"cannot read image {p}: {e}") from None


def check_images(paths: list[str], size: tuple[int, int]) -> None:
    """Every file exists and decodes as an image, before any answer is printed: a bad file among
    thousands fails the command up front. A full decode, because Pillow's verify() passes a
    truncated JPEG; draft() lets a JPEG decode at a reduced scale near the model's input size
    (its whole bitstream is still read, so truncation is still found), which keeps this pass cheap."""
    from PIL import Image

    for p in paths:
        with reading(p), Image.open(p) as im:
            im.draft(None, (size[1], size[0]))  # JPEG only; other formats ignore it
            im.load()


def load_images(paths: list[str], in_chans: int, img_size: tuple[int, int], mean, std) -> torch.Tensor:
    """Image files -> normalised float batch (B, C, H, W) at the model's size.

    Any Pillow mode is converted to RGB (or L for 1-channel models); images are
    resized to the model's input size (bilinear, antialiased).
    """
    from PIL import Image

    batch = []
    for p in paths:
        with reading(p), Image.open(p) as im:
            im = im.convert("L" if in_chans == 1 else "RGB")
            im = im.resize((img_size[1], img_size[0]), Image.BILINEAR)
            arr = np.asarray(im, dtype=np.float32) / 255.0
        t = torch.from_numpy(arr)
        t = t[None] if t.ndim == 2 else t.permute(2, 0, 1)  # (C, H, W)
        batch.append(t)
    x = torch.stack(batch)
    m = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    return (x - m) / s


def run(args) -> int:
    if args.batch_size < 1:
        raise UserError(f"--batch-size must be positive, got {args.batch_size}")
    model, meta = load_model(args.checkpoint)
    classes = meta.get("classes") or [str(i) for i in range(model.num_classes)]
    mean = meta.get("mean") or [0.5] * model.in_chans
    std = meta.get("std") or [0.5] * model.in_chans
    k = max(1, min(args.top_k, model.num_classes))
    images = expand_paths(args.images)
    check_images(images, tuple(model.img_size))
    # a chunk at a time: a folder of thousands of images must not become one giant batch; each
    # chunk's answers are printed as it finishes
    for start in range(0, len(images), args.batch_size):
        paths = images[start:start + args.batch_size]
        x = load_images(paths, model.in_chans, tuple(model.img_size), mean, std)
        with torch.no_grad():
            probs = F.softmax(model(x).float(), dim=-1)
        top = probs.topk(k, dim=-1)
        for path, p, idx in zip(paths, top.values, top.indices):
            print(f"{Path(path).name}:")
            for pi, ii in zip(p.tolist(), idx.tolist()):
                print(f"  {pi * 100:6.2f}%  {classes[ii]}")
    return 0
