"""Batched augmentation: every op takes a whole batch and draws per-sample randomness.

Conventions. Images are (B, C, H, W), C = 1 or 3, either uint8 in [0, 255] or
float in [0, 1]; an op returns the dtype it was given (uint8 results are
rounded). All random numbers come from the `torch.Generator` passed in, drawn
on the generator's device and moved to the images' device, so batch t of
epoch e is reproducible on any device. The ops are plain tensor code: index
maps for crops and flips, one `grid_sample` for every geometric op of a
RandAugment layer, a batched 256-bin histogram for equalize. No Python loop
runs over images; the loops that remain run over the 14 op kinds.

The transforms the engine uses are built by `build_train_transform` and
`build_eval_transform` at the bottom of this file.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..errors import UserError

# -- helpers ----------------------------------------------------------------------


def _rand(shape, g: torch.Generator, device) -> torch.Tensor:
    return torch.rand(shape, generator=g, device=g.device).to(device)


def _randint(high: int, shape, g: torch.Generator, device) -> torch.Tensor:
    return torch.randint(high, shape, generator=g, device=g.device).to(device)


def _sign(n: int, g: torch.Generator, device) -> torch.Tensor:
    return _randint(2, (n,), g, device).float() * 2 - 1  # (n,) of +-1


def to_float(x: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] -> float32 [0, 1]; float passes through."""
    return x.float().div_(255) if x.dtype == torch.uint8 else x


def _like(y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Return float result `y` (in [0, 1]) in the dtype of the op's input `x`."""
    if x.dtype == torch.uint8:
        return y.mul(255).round_().clamp_(0, 255).to(torch.uint8)
    return y


def _gray(x: torch.Tensor) -> torch.Tensor:
    """Luminance (B, 1, H, W) of float images; a 1-channel image is its own luminance."""
    if x.shape[1] == 1:
        return x
    return (0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3])


def _blend(x: torch.Tensor, degenerate: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """PIL ImageEnhance: degenerate + factor * (x - degenerate), per-sample factor (B,)."""
    f = factor.view(-1, 1, 1, 1)
    return (degenerate + f * (x - degenerate)).clamp_(0, 1)


def resize(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear (antialiased when shrinking) resize to (H, W); keeps the dtype."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    y = F.interpolate(to_float(x), size=size, mode="bilinear", align_corners=False, antialias=True)
    return _like(y.clamp_(0, 1), x)


def center_crop(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    H, W = x.shape[-2:]
    h, w = size
    top, left = (H - h) // 2, (W - w) // 2
    return x[..., top:top + h, left:left + w]


def normalize(x: torch.Tensor, mean, std) -> torch.Tensor:
    """uint8 or [0,1] float -> (x - mean) / std per channel, float32, in one fused multiply-add."""
    C = x.shape[1]
    if len(mean) != C or len(std) != C:
        raise UserError(f"normalisation has {len(mean)} channel(s) but the images have {C}")
    scale = 255.0 if x.dtype == torch.uint8 else 1.0
    m = torch.tensor(mean, device=x.device, dtype=torch.float32).view(1, C, 1, 1)
    s = torch.tensor(std, device=x.device, dtype=torch.float32).view(1, C, 1, 1)
    return torch.addcmul(-m / s, x.float(), 1.0 / (s * scale))  # x / (scale s) - m / s


# -- crops and flips --------------------------------------------------------------


def _reflect(i: torch.Tensor, n: int) -> torch.Tensor:
    """Reflect integer coordinates into [0, n) like F.pad(mode='reflect') (edge not repeated)."""
    if n == 1:
        return torch.zeros_like(i)
    period = 2 * (n - 1)
    i = i.remainder(period)
    return torch.where(i >= n, period - i, i)


def random_crop(x: torch.Tensor, size: tuple[int, int], padding: int, g: torch.Generator,
                pad_mode: str = "reflect") -> torch.Tensor:
    """Pad by `padding` on each side, then crop `size` at a per-sample random offset.

    Implemented as one gather with per-sample row/column index maps, so the padded
    image is never materialised and uint8 stays uint8. (B, C, H, W) -> (B, C, h, w).
    """
    if pad_mode not in ("reflect", "zeros"):
        raise UserError(f"aug.pad_mode must be 'reflect' or 'zeros', got {pad_mode!r}")
    B, C, H, W = x.shape
    h, w = size
    if h > H + 2 * padding or w > W + 2 * padding:
        raise UserError(f"cannot crop {h}x{w} from {H}x{W} images padded by {padding}")
    dev = x.device
    oy = _randint(H + 2 * padding - h + 1, (B,), g, dev) - padding  # (B,) top-left in unpadded coords
    ox = _randint(W + 2 * padding - w + 1, (B,), g, dev) - padding
    rows = oy.view(B, 1) + torch.arange(h, device=dev)  # (B, h) may fall outside [0, H)
    cols = ox.view(B, 1) + torch.arange(w, device=dev)  # (B, w)
    if pad_mode == "reflect":
        if padding >= min(H, W):
            raise UserError(f"reflect padding {padding} must be smaller than the image side {min(H, W)}")
        r, c = _reflect(rows, H), _reflect(cols, W)
    else:
        r, c = rows.clamp(0, H - 1), cols.clamp(0, W - 1)
    bi = torch.arange(B, device=dev).view(B, 1, 1)
    out = x[bi, :, r.view(B, h, 1), c.view(B, 1, w)]  # advanced indexing puts C last: (B, h, w, C)
    out = out.permute(0, 3, 1, 2)  # (B, C, h, w)
    if pad_mode == "zeros":
        inside = ((rows >= 0) & (rows < H)).view(B, 1, h, 1) & ((cols >= 0) & (cols < W)).view(B, 1, 1, w)
        out = out * inside.to(out.dtype)
    return out.contiguous()


def hflip(x: torch.Tensor, p: float, g: torch.Generator) -> torch.Tensor:
    """Mirror each image left-right with probability p."""
    if p <= 0:
        return x
    flip = (_rand((x.shape[0],), g, x.device) < p).view(-1, 1, 1, 1)
    return torch.where(flip, x.flip(3), x)


def random_resized_crop(x: torch.Tensor, size: tuple[int, int], g: torch.Generator, scale=(0.08, 1.0),
                        ratio=(3 / 4, 4 / 3)) -> torch.Tensor:
    """Inception-style crop: per-sample area share in `scale`, log-uniform aspect in `ratio`,
    resized to `size` with bilinear sampling (one batched grid_sample).

    Boxes that would not fit are shrunk to fit rather than retried (torchvision
    retries 10 times, then falls back to a centre crop); the distribution is close.
    """
    B, C, H, W = x.shape
    dev = x.device
    area = (scale[0] + (scale[1] - scale[0]) * _rand((B,), g, dev))  # (B,) share of H*W
    logr = math.log(ratio[0]) + (math.log(ratio[1]) - math.log(ratio[0])) * _rand((B,), g, dev)
    ar = logr.exp()  # w / h in pixels
    cw = (area * H * W * ar).sqrt().clamp(max=W)  # crop size in pixels
    ch = (area * H * W / ar).sqrt().clamp(max=H)
    cx = (W - cw) * _rand((B,), g, dev) + cw / 2  # centre in pixels
    cy = (H - ch) * _rand((B,), g, dev) + ch / 2
    theta = torch.zeros(B, 2, 3, device=dev)
    theta[:, 0, 0] = cw / W
    theta[:, 1, 1] = ch / H
    theta[:, 0, 2] = cx / W * 2 - 1
    theta[:, 1, 2] = cy / H * 2 - 1
    grid = F.affine_grid(theta, (B, C, *size), align_corners=False)  # (B, h, w, 2)
    y = F.grid_sample(to_float(x), grid, mode="bilinear", padding_mode="border", align_corners=False)
    return _like(y, x)


# -- RandAugment ops ----------------------------------------------------------------
# Each op: (x float (B, C, H, W) in [0, 1], mag (B,) in [0, 1] = M / 30, g) -> float (B, C, H, W).
# Magnitude scales follow torchvision's RandAugment (31 bins, M in 0..30); signed ops
# draw a random sign per sample.

RA_OPS = ("identity", "auto_contrast", "equalize", "rotate", "solarize", "color", "posterize", "contrast",
          "brightness", "sharpness", "shear_x", "shear_y", "translate_x", "translate_y")
AFFINE_OPS = ("rotate", "shear_x", "shear_y", "translate_x", "translate_y")
MAX_MAGNITUDE = 30

# Maximum strengths: RandAugment's standard ones, and TrivialAugment's wider ones.
STANDARD = dict(rotate=30.0, shear=0.3, translate=150 / 331, enhance=0.9, posterize_bits=4)
# translate is a fraction of the side (torchvision: 150/331 of it for RandAugment; TrivialAugmentWide's
# 32 px is the whole side at CIFAR size, which we cap at half of it).
WIDE = dict(rotate=135.0, shear=0.99, translate=0.5, enhance=0.99, posterize_bits=6)
AFFINE_FILL = 0.5  # grey for pixels that geometric ops bring in from outside


def auto_contrast(x, mag=None, g=None):
    """Stretch each channel of each image to the full [0, 1] range (flat channels unchanged)."""
    lo = x.amin((2, 3), keepdim=True)
    hi = x.amax((2, 3), keepdim=True)
    span = hi - lo
    ok = span > 1e-6
    return torch.where(ok, (x - lo) / torch.where(ok, span, torch.ones_like(span)), x)


def equalize(x, mag=None, g=None):
    """Histogram equalisation per image and channel (PIL/torchvision's algorithm), batched.

    Histograms of all B*C channels are built with one scatter_add into a (B*C, 256)
    table; each channel's lookup table is then applied with one gather.
    """
    B, C, H, W = x.shape
    q = (x * 255).round_().long().view(B * C, H * W)  # (BC, HW) integer levels
    hist = torch.zeros(B * C, 256, device=x.device).scatter_add_(1, q, torch.ones_like(q, dtype=torch.float))
    # PIL's step ignores the count of the brightest level present in the channel.
    top = hist.gather(1, q.amax(1, keepdim=True))  # (BC, 1)
    step = torch.div(H * W - top, 255, rounding_mode="floor")  # (BC, 1)
    safe = step.clamp(min=1)
    lut = torch.div(hist.cumsum(1) + torch.div(safe, 2, rounding_mode="floor"), safe, rounding_mode="floor")
    lut = F.pad(lut, (1, 0))[:, :-1].clamp_(0, 255)  # (BC, 256): level v -> cumulative count below v
    out = lut.gather(1, q).view(B, C, H, W) / 255
    return torch.where((step > 0).view(B, C, 1, 1), out, x)  # a near-constant channel stays as is


def solarize(x, mag, g=None):
    """Invert pixels at or above a threshold that falls from 256 (identity, M=0) to 0 (all inverted)."""
    thr = (256 * (1 - mag)).view(-1, 1, 1, 1) / 255
    return torch.where(x >= thr - 1e-6, 1 - x, x)


def posterize(x, mag, g=None, max_bits=4):
    """Keep the top bits of each 8-bit level: 8 bits at M=0 (identity) down to 8 - max_bits."""
    bits = 8 - (mag * max_bits).round()  # (B,)
    step = (2 ** (8 - bits)).view(-1, 1, 1, 1)  # quantisation step in levels
    q = (x * 255).round()
    return torch.div(q, step, rounding_mode="floor").mul_(step).div_(255)


def color(x, mag, g, max_f=0.9):
    """Saturation: blend with the grey image by factor 1 +- mag * max_f. No-op on 1-channel images."""
    if x.shape[1] == 1:
        return x
    return _blend(x, _gray(x), 1 + mag * max_f * _sign(x.shape[0], g, x.device))


def contrast(x, mag, g, max_f=0.9):
    """Blend with the image's mean grey level (a per-image scalar), like PIL."""
    mean = _gray(x).mean((1, 2, 3), keepdim=True)
    return _blend(x, mean, 1 + mag * max_f * _sign(x.shape[0], g, x.device))


def brightness(x, mag, g, max_f=0.9):
    """Blend with black: x * factor."""
    return _blend(x, torch.zeros_like(x[:, :1, :1, :1]), 1 + mag * max_f * _sign(x.shape[0], g, x.device))


_SMOOTH = torch.tensor([[1.0, 1.0, 1.0], [1.0, 5.0, 1.0], [1.0, 1.0, 1.0]]) / 13


def sharpness(x, mag, g, max_f=0.9):
    """Blend with PIL's SMOOTH-filtered image (border pixels kept), factor 1 +- mag * max_f."""
    B, C, H, W = x.shape
    k = _SMOOTH.to(x.device, x.dtype).expand(C, 1, 3, 3)
    smooth = F.conv2d(x, k, groups=C)  # (B, C, H-2, W-2)
    degenerate = x.clone()
    degenerate[:, :, 1:-1, 1:-1] = smooth
    return _blend(x, degenerate, 1 + mag * max_f * _sign(B, g, x.device))


def identity(x, mag=None, g=None):
    return x


def _affine_theta(op: str, mag: torch.Tensor, sign: torch.Tensor, H: int, W: int, ranges: dict) -> torch.Tensor:
    """(B, 2, 3) matrices for F.affine_grid: output normalised coords -> input normalised coords.

    Written in pixel units and converted with the aspect ratio, so a rotation stays
    a rotation on non-square images. Everything is about the image centre.
    """
    B = mag.shape[0]
    theta = torch.zeros(B, 2, 3, device=mag.device)
    theta[:, 0, 0] = 1
    theta[:, 1, 1] = 1
    s = mag * sign
    if op == "rotate":
        a = s * ranges["rotate"] * math.pi / 180
        theta[:, 0, 0], theta[:, 0, 1] = a.cos(), a.sin() * H / W
        theta[:, 1, 0], theta[:, 1, 1] = -a.sin() * W / H, a.cos()
    elif op == "shear_x":
        theta[:, 0, 1] = s * ranges["shear"] * H / W
    elif op == "shear_y":
        theta[:, 1, 0] = s * ranges["shear"] * W / H
    elif op == "translate_x":  # a shift of frac * W pixels is 2 * frac in normalised units
        theta[:, 0, 2] = -2 * s * ranges["translate"]
    elif op == "translate_y":
        theta[:, 1, 2] = -2 * s * ranges["translate"]
    return theta


def affine(x: torch.Tensor, theta: torch.Tensor, fill: float = AFFINE_FILL) -> torch.Tensor:
    """Warp float images by per-sample (B, 2, 3) matrices; outside pixels become `fill`."""
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)  # (B, H, W, 2)
    # grid_sample pads with zeros; shifting by `fill` first makes the padding `fill`.
    return F.grid_sample(x - fill, grid, mode="bilinear", padding_mode="zeros", align_corners=False).add_(fill)


def apply_op(op: str, x: torch.Tensor, mag: torch.Tensor, g: torch.Generator, ranges: dict = STANDARD):
    """Apply one named op to every image of a batch. x uint8 or float, mag (B,) in [0, 1] or a float."""
    xf = to_float(x)
    B, C, H, W = xf.shape
    mag = torch.as_tensor(mag, dtype=torch.float32, device=xf.device).expand(B).contiguous()
    if op in AFFINE_OPS:
        theta = _affine_theta(op, mag, _sign(B, g, xf.device), H, W, ranges)
        y = affine(xf, theta)
    elif op in ("color", "contrast", "brightness", "sharpness"):
        y = _ENHANCE[op](xf, mag, g, ranges["enhance"])
    elif op == "posterize":
        y = posterize(xf, mag, g, ranges["posterize_bits"])
    elif op in ("identity", "auto_contrast", "equalize", "solarize"):
        y = _PLAIN[op](xf, mag, g)
    else:
        raise UserError(f"unknown augmentation op {op!r} (choose from {', '.join(RA_OPS)})")
    return _like(y, x)


_ENHANCE = dict(color=color, contrast=contrast, brightness=brightness, sharpness=sharpness)
_PLAIN = dict(identity=identity, auto_contrast=auto_contrast, equalize=equalize, solarize=solarize)


def _rand_augment_layer(x: torch.Tensor, mag: torch.Tensor, g: torch.Generator, ranges: dict) -> torch.Tensor:
    """One op per image, chosen uniformly from RA_OPS. x float (B, C, H, W), mag (B,).

    Every geometric op is folded into one per-sample affine matrix, so a layer costs
    one grid_sample for all the images that drew a geometric op; the other ops run
    on the subset of images that drew them.
    """
    B, C, H, W = x.shape
    dev = x.device
    choice = _randint(len(RA_OPS), (B,), g, dev)  # (B,)
    sign = _sign(B, g, dev)
    out = x.clone()
    # Geometric ops: one matrix per image, identity for the others.
    theta = torch.zeros(B, 2, 3, device=dev)
    theta[:, 0, 0] = theta[:, 1, 1] = 1
    is_affine = torch.zeros(B, dtype=torch.bool, device=dev)
    for op in AFFINE_OPS:
        sel = choice == RA_OPS.index(op)
        theta = torch.where(sel.view(B, 1, 1), _affine_theta(op, mag, sign, H, W, ranges), theta)
        is_affine |= sel
    idx = is_affine.nonzero().squeeze(1)
    if idx.numel():
        out[idx] = affine(x[idx], theta[idx])
    for op in RA_OPS:
        if op in AFFINE_OPS or op == "identity":
            continue
        idx = (choice == RA_OPS.index(op)).nonzero().squeeze(1)
        if idx.numel():
            if op in _ENHANCE:
                out[idx] = _ENHANCE[op](x[idx], mag[idx], g, ranges["enhance"])
            elif op == "posterize":
                out[idx] = posterize(x[idx], mag[idx], g, ranges["posterize_bits"])
            else:
                out[idx] = _PLAIN[op](x[idx], mag[idx], g)
    return out


def rand_augment(x: torch.Tensor, n: int, m: float, g: torch.Generator) -> torch.Tensor:
    """RandAugment (Cubuk et al. 2020): n layers, each one uniformly chosen op per image, magnitude m/30."""
    if not 0 <= m <= MAX_MAGNITUDE:
        raise UserError(f"RandAugment magnitude must be in 0..{MAX_MAGNITUDE}, got {m}")
    xf = to_float(x)
    mag = torch.full((xf.shape[0],), m / MAX_MAGNITUDE, device=xf.device)
    for _ in range(n):
        xf = _rand_augment_layer(xf, mag, g, STANDARD)
    return _like(xf, x)


def trivial_augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """TrivialAugment (Mueller & Hutter 2021): one op per image, magnitude uniform per image, wide ranges."""
    xf = to_float(x)
    # Uniform over the 31 magnitude bins, as TrivialAugmentWide.
    mag = _randint(MAX_MAGNITUDE + 1, (xf.shape[0],), g, xf.device).float() / MAX_MAGNITUDE
    return _like(_rand_augment_layer(xf, mag, g, WIDE), x)


# -- colour jitter and erasing ------------------------------------------------------


def color_jitter(x: torch.Tensor, strength: float, g: torch.Generator) -> torch.Tensor:
    """Brightness, contrast, saturation factors each uniform in [1 - s, 1 + s] per image.

    Applied in that fixed order (torchvision shuffles it; the difference is second-order).
    Saturation is skipped on 1-channel images.
    """
    if strength <= 0:
        return x
    xf = to_float(x)
    B = xf.shape[0]

    def factor():
        return 1 + strength * (2 * _rand((B,), g, xf.device) - 1)

    xf = _blend(xf, torch.zeros_like(xf[:, :1, :1, :1]), factor())
    xf = _blend(xf, _gray(xf).mean((1, 2, 3), keepdim=True), factor())
    f = factor()  # drawn even for grey images, so the stream does not depend on C
    if xf.shape[1] > 1:
        xf = _blend(xf, _gray(xf), f)
    return _like(xf, x)


def random_erasing(x: torch.Tensor, p: float, g: torch.Generator, area=(0.02, 1 / 3),
                   log_ratio=(math.log(0.3), math.log(1 / 0.3))) -> torch.Tensor:
    """Random erasing (Zhong et al. 2017; timm's 'pixel' mode) on normalised float images.

    With probability p per image, one box of random area share and aspect is filled
    with standard-normal noise (the normalised data's own scale). Boxes that would
    not fit are clipped to the image instead of being redrawn.
    """
    if p <= 0:
        return x
    B, C, H, W = x.shape
    dev = x.device
    on = _rand((B,), g, dev) < p
    a = (area[0] + (area[1] - area[0]) * _rand((B,), g, dev)) * H * W
    r = (log_ratio[0] + (log_ratio[1] - log_ratio[0]) * _rand((B,), g, dev)).exp()
    eh = (a * r).sqrt().round().clamp(1, H)
    ew = (a / r).sqrt().round().clamp(1, W)
    y0 = ((H - eh + 1) * _rand((B,), g, dev)).floor()
    x0 = ((W - ew + 1) * _rand((B,), g, dev)).floor()
    ys = torch.arange(H, device=dev).view(1, H, 1)
    xs = torch.arange(W, device=dev).view(1, 1, W)
    box = ((ys >= y0.view(B, 1, 1)) & (ys < (y0 + eh).view(B, 1, 1))
           & (xs >= x0.view(B, 1, 1)) & (xs < (x0 + ew).view(B, 1, 1)) & on.view(B, 1, 1))  # (B, H, W)
    noise = torch.randn(x.shape, generator=g, device=g.device).to(dev, x.dtype)
    return torch.where(box.unsqueeze(1), noise, x)


# -- the transforms the engine uses ---------------------------------------------------


def _size(img_size) -> tuple[int, int]:
    if isinstance(img_size, int):
        return (img_size, img_size)
    h, w = img_size
    return (int(h), int(w))


def fit_size(x: torch.Tensor, size: tuple[int, int], g: torch.Generator | None) -> torch.Tensor:
    """Bring data to `size`: crop when larger (random with g, else centre), resize otherwise."""
    H, W = x.shape[-2:]
    if (H, W) == size:
        return x
    if H >= size[0] and W >= size[1]:
        return random_crop(x, size, 0, g) if g is not None else center_crop(x, size)
    return resize(x, size)


class EvalTransform:
    """uint8 (B, C, H, W) -> float32 normalised (B, C, h, w): centre crop when larger, else resize."""

    def __init__(self, mean, std, img_size):
        self.mean, self.std, self.size = tuple(mean), tuple(std), _size(img_size)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return normalize(fit_size(images, self.size, None), self.mean, self.std)

    def __repr__(self):
        return f"EvalTransform(size={self.size}, mean={self.mean}, std={self.std})"


class TrainTransform:
    """The training recipe, in torchvision's order:

    (random resized crop | fit to size, then padded random crop) -> horizontal flip
    -> RandAugment / TrivialAugment -> colour jitter -> normalise -> random erasing
    -> Mixup / CutMix.

    __call__(images uint8 (B, C, H, W), labels int64 (B,), generator) ->
    (float32 (B, C, h, w), targets): labels as given when the batch was not mixed,
    else soft float (B, num_classes) rows summing to 1.
    """

    def __init__(self, aug, mean, std, img_size, num_classes: int):
        from .mix import Mixer

        self.aug, self.mean, self.std, self.size = aug, tuple(mean), tuple(std), _size(img_size)
        self.num_classes = num_classes
        if aug.pad_mode not in ("reflect", "zeros"):
            raise UserError(f"aug.pad_mode must be 'reflect' or 'zeros', got {aug.pad_mode!r}")
        # The seed project's --autoaugment flag meant RandAugment with n=2, m=9; an
        # explicit randaugment_n wins over it.
        self.ra_n = aug.randaugment_n or (2 if aug.autoaugment else 0)
        self.ra_m = aug.randaugment_m if aug.randaugment_n else (9 if aug.autoaugment else aug.randaugment_m)
        if self.ra_n and aug.trivialaugment:
            raise UserError("choose one of RandAugment (aug.randaugment_n / aug.autoaugment) and aug.trivialaugment")
        if not 0 <= self.ra_m <= MAX_MAGNITUDE:
            raise UserError(f"aug.randaugment_m must be in 0..{MAX_MAGNITUDE}, got {self.ra_m}")
        self.mixer = Mixer(aug.mixup_alpha, aug.cutmix_alpha, aug.mix_prob, aug.switch_prob, num_classes)

    def __call__(self, images: torch.Tensor, labels: torch.Tensor, generator: torch.Generator):
        a, g = self.aug, generator
        if a.random_resized_crop:
            x = random_resized_crop(images, self.size, g, scale=(a.rrc_scale_min, 1.0))
        else:
            x = fit_size(images, self.size, g)
            if a.crop_padding > 0:
                x = random_crop(x, self.size, a.crop_padding, g, a.pad_mode)
        x = hflip(x, a.hflip, g)
        x = to_float(x)
        if self.ra_n:
            x = rand_augment(x, self.ra_n, self.ra_m, g)
        elif a.trivialaugment:
            x = trivial_augment(x, g)
        x = color_jitter(x, a.color_jitter, g)
        x = normalize(x, self.mean, self.std)
        x = random_erasing(x, a.erasing, g)
        return self.mixer(x, labels, g)

    def __repr__(self):
        return f"TrainTransform(size={self.size}, randaugment=({self.ra_n}, {self.ra_m}), {self.mixer})"


def build_train_transform(aug, info, img_size, num_classes: int | None = None) -> TrainTransform:
    """The training transform of `aug` (an AugConfig) for a dataset (its DatasetInfo) at img_size."""
    return TrainTransform(aug, info.mean, info.std, img_size, num_classes or info.num_classes)


def build_eval_transform(info, img_size) -> EvalTransform:
    return EvalTransform(info.mean, info.std, img_size)

