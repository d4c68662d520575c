"""Matplotlib figures of attention maps. Each helper returns a Figure; nothing is shown.

Images are given as displayed: (C, H, W) uint8, or float in [0, 1], with C = 1
(grayscale) or 3. Maps are patch grids (gh, gw); they are upsampled to the
image's H x W (bilinear by default) and drawn with the image's own extent,
so a patch's value sits exactly over that patch.
"""

from __future__ import annotations

import math
from typing import Sequence

import matplotlib

matplotlib.use("Agg")  # files only: never open a window, work on headless machines
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from .attention import fuse_heads, normalize_for_display, upsample  # noqa: E402

CMAP = "jet"  # the conventional rollout colouring: blue = ignored, red = attended
PANEL = 2.2  # inches per image panel


def to_display(image) -> np.ndarray:
    """(C, H, W) uint8 or [0, 1] float -> (H, W, 3) or (H, W) float numpy in [0, 1]. Also takes an
    image as numpy and PIL hold it, (H, W, C) or (H, W)."""
    x = (image if isinstance(image, torch.Tensor) else torch.from_numpy(np.array(image))).detach().cpu()
    if x.ndim == 2:
        x = x[None]
    if x.ndim == 3 and x.shape[0] not in (1, 3) and x.shape[-1] in (1, 3):
        x = x.permute(2, 0, 1)
    if x.ndim != 3 or x.shape[0] not in (1, 3):
        raise ValueError(f"expected one image (C, H, W) with 1 or 3 channels, got shape {tuple(x.shape)}")
    x = x.float() / 255.0 if x.dtype == torch.uint8 else x.float().clamp(0, 1)
    x = x.permute(1, 2, 0).numpy()  # (H, W, C)
    return x[..., 0] if x.shape[-1] == 1 else x


def _heat(map_, size, mode="bilinear", normalize=True) -> np.ndarray:
    """(gh, gw) grid -> (H, W) numpy heatmap over the image."""
    m = upsample(torch.as_tensor(map_).float(), size, mode)  # (H, W)
    return (normalize_for_display(m) if normalize else m).numpy()


def draw_image(ax, image, title: str | None = None) -> None:
    img = to_display(image)
    ax.imshow(img, cmap="gray" if img.ndim == 2 else None, vmin=0, vmax=1, interpolation="nearest")
    _clean(ax, title)


def draw_overlay(ax, image, map_, title: str | None = None, alpha: float = 0.5, mode: str = "bilinear",
                 vrange: tuple[float, float] | None = None):
    """The image (desaturated) with the map on top.

    vrange None: the map is scaled to its own [min, max]; else (lo, hi) in the
    map's units, so several panels can share one colour scale.
    """
    img = to_display(image)
    size = img.shape[:2]
    # A gray base keeps the heatmap's colours readable on colour images.
    base = img if img.ndim == 2 else img.mean(axis=-1)
    ax.imshow(base, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    if vrange is None:
        heat, (lo, hi) = _heat(map_, size, mode), (0.0, 1.0)
    else:
        heat, (lo, hi) = _heat(map_, size, mode, normalize=False), vrange
    im = ax.imshow(heat, cmap=CMAP, alpha=alpha, vmin=lo, vmax=hi, interpolation="nearest")
    _clean(ax, title)
    return im


def draw_grid(ax, image_size, map_, title: str | None = None):
    """The raw patch grid, blocks of patch size, on the image's pixel extent."""
    h, w = image_size
    # extent in pixel-edge coordinates, the same as imshow uses for the image.
    # Colour range = the map's own min..max (a rollout is rarely far from uniform);
    # the colorbar gives the actual weights.
    im = ax.imshow(torch.as_tensor(map_).float().numpy(), cmap=CMAP, interpolation="nearest",
                   extent=(-0.5, w - 0.5, h - 0.5, -0.5))
    _clean(ax, title)
    return im


def draw_box(ax, box) -> None:
    """An (x0, y0, x1, y1) box, x1/y1 exclusive, in pixel coordinates (pixel centres at integers)."""
    if box is None:
        return
    from matplotlib.patches import Rectangle

    x0, y0, x1, y1 = (float(v) for v in box)
    ax.add_patch(Rectangle((x0 - 0.5, y0 - 0.5), x1 - x0, y1 - y0, fill=False, edgecolor="white",
                           linewidth=1.2, linestyle="--"))


def _clean(ax, title):
    ax.set_xticks([])
    ax.set_yticks([])
    if title:
        ax.set_title(title, fontsize=9)


def _colorbar(fig, im, ax, label=None):
    cb = fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    cb.ax.tick_params(labelsize=7)
    if label:
        cb.set_label(label, fontsize=8)
    return cb


def _grid(rows: int, cols: int, extra=(0.6, 0.6)):
    """A rows x cols grid of PANEL-inch panels plus room for titles and a colorbar."""
    size = (PANEL * cols + extra[0], PANEL * rows + extra[1])
    return plt.subplots(rows, cols, figsize=size, squeeze=False, layout="constrained")


def _class_title(true: str | None, pred: str | None) -> str:
    if true is None:
        return f"pred: {pred}"
    return f"true: {true}\npred: {pred}"


def plot_summary(images: Sequence, maps: Sequence, true: Sequence[str | None], pred: Sequence[str],
                 title: str = "Attention rollout", boxes: Sequence | None = None, per_row: int = 8) -> Figure:
    """Originals on the top row, their (rollout) maps over them on the bottom row.

    true[i] None: no label known (an image file). boxes: optional object boxes,
    drawn dashed on the maps. More than `per_row` images wrap into further row pairs.
    """
    n = len(images)
    pairs = math.ceil(n / per_row)
    cols = math.ceil(n / pairs)  # balanced rows: 10 images -> 2 x 5, not 8 + 2
    fig, axes = plt.subplots(2 * pairs, cols, figsize=(PANEL * cols + 0.6, (2 * PANEL + 0.35) * pairs + 0.35),
                             squeeze=False, layout="constrained")
    im = None
    for i in range(n):
        top, bottom = axes[2 * (i // cols), i % cols], axes[2 * (i // cols) + 1, i % cols]
        draw_image(top, images[i], _class_title(true[i], pred[i]))
        if true[i] is not None:  # wrong predictions in red, so they are seen at once
            top.title.set_color("tab:green" if true[i] == pred[i] else "tab:red")
        im = draw_overlay(bottom, images[i], maps[i])
        draw_box(bottom, boxes[i] if boxes is not None else None)
    for j in range(n, pairs * cols):  # empty cells of the last row pair
        axes[2 * (j // cols), j % cols].axis("off")
        axes[2 * (j // cols) + 1, j % cols].axis("off")
    for r in range(pairs):
        axes[2 * r, 0].set_ylabel("image", fontsize=9)
        axes[2 * r + 1, 0].set_ylabel("attention", fontsize=9)
    fig.suptitle(title, fontsize=11)
    _colorbar(fig, im, list(axes[-1]), "relative attention")  # beside the last row of maps
    return fig


def plot_heads(image, heads, title: str = "", layer: int | None = None, token: str = "cls") -> Figure:
    """Every head's token-to-patch attention (h, gh, gw) over the image.

    All heads share one colour scale (the raw softmax weights, min..max over
    the heads), so a head that looks elsewhere (at [CLS] itself) shows up dim
    instead of being stretched into false contrast; each title gives the
    share of that head's mass that lands on patches at all.
    """
    heads = torch.as_tensor(heads).float()
    h = heads.shape[0]
    cols = min(h + 1, 5)
    rows = math.ceil((h + 1) / cols)
    fig, axes = _grid(rows, cols)
    axes = axes.ravel()
    draw_image(axes[0], image, "image")
    vrange = (float(heads.min()), float(heads.max()))
    im = None
    for k in range(h):
        im = draw_overlay(axes[k + 1], image, heads[k], f"head {k}  (patches {heads[k].sum():.2f})", vrange=vrange)
    for ax in axes[h + 1:]:
        ax.axis("off")
    where = f"layer {layer}" if layer is not None else "last layer"
    fig.suptitle(f"{title}\n{where}: [{token.upper()}] attention of each head".strip(), fontsize=10)
    _colorbar(fig, im, list(axes[1:h + 1]), "attention weight")
    return fig


def plot_rollout(image, rollout_map, title: str = "", grad_map=None, grad_label: str | None = None,
                 box=None) -> Figure:
    """Original | raw rollout grid | overlay [| class-specific (gradient) rollout overlay]."""
    n = 4 if grad_map is not None else 3
    fig, axes = _grid(1, n, extra=(1.2, 0.8))
    axes = axes[0]
    size = to_display(image).shape[:2]
    draw_image(axes[0], image, "original")
    im = draw_grid(axes[1], size, rollout_map, "rollout (raw)")
    _colorbar(fig, im, axes[1])
    draw_overlay(axes[2], image, rollout_map, "overlay")
    draw_box(axes[2], box)
    if grad_map is not None:
        draw_overlay(axes[3], image, grad_map, grad_label or "gradient rollout")
        draw_box(axes[3], box)
    fig.suptitle(title, fontsize=10)
    return fig


def plot_layers(image, layers, title: str = "", head_fusion: str = "mean", token: str = "cls") -> Figure:
    """The token's attention at every layer (L, h, gh, gw), heads fused, each scaled to its own max."""
    layers = torch.as_tensor(layers).float()
    L = layers.shape[0]
    g = layers.flatten(-2)  # (L, h, gh*gw)
    # fuse_heads works on (B, h, N, N): layers as the batch, the grid as one row.
    fused = fuse_heads(g[:, :, None, :], head_fusion)[:, 0].reshape(L, *layers.shape[-2:])  # (L, gh, gw)
    cols = min(L + 1, 7)
    rows = math.ceil((L + 1) / cols)
    fig, axes = _grid(rows, cols)
    axes = axes.ravel()
    draw_image(axes[0], image, "image")
    im = None
    for l in range(L):
        # peak relative to a uniform map (1 / patches): how concentrated this layer is.
        peak = float(fused[l].max()) * fused[l].numel()
        im = draw_overlay(axes[l + 1], image, fused[l], f"layer {l}  (peak {peak:.1f}x uniform)")
    for ax in axes[L + 1:]:
        ax.axis("off")
    what = f"[{token.upper()}] attention by layer (heads: {head_fusion}, each layer scaled to its max)"
    fig.suptitle(f"{title}\n{what}".strip(), fontsize=10)
    _colorbar(fig, im, list(axes[1:L + 1]), "relative attention")
    return fig


def save(fig: Figure, path, dpi: int = 100) -> None:
    """Write a figure as PNG, whole or not at all (an interrupted save leaves no 0-byte picture), and
    free it (figures are not garbage-collected by pyplot otherwise)."""
    from ..errors import raise_if_stopped
    from ..utils import atomic_write

    try:
        raise_if_stopped()  # a Ctrl-C Python dropped while collecting an earlier figure (errors.py)
        atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=dpi, format="png"))
    finally:
        plt.close(fig)
