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


def _gen_on(g: torch.Generator, device) -> torch.Generator:
    """A generator on `device` for drawing big tensors there (e.g. per-pixel noise) instead of
    drawing on g's device and copying: g itself when it already lives there, else a fresh one
    seeded from g, so the stream stays a function of g's state."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    if g.device == device:
        return g
    seed = int(torch.randint(2**62, (1,), generator=g, device=g.device))
    return torch.Generator(device=device).manual_seed(seed)


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
# Each op works on float images (B, C, H, W) in [0, 1] with one value per image (B,):
# an enhance factor, an angle, a shear, a shift... `op_values` maps RandAugment's
# magnitude (M in 0..30, as a share mag = M / 30) and a random sign to those values,
# with torchvision's scales. Ops whose value is neutral (factor 1, angle 0, 8 bits,
# threshold 256) return the image unchanged.

RA_OPS = ("identity", "auto_contrast", "equalize", "rotate", "solarize", "color", "posterize", "contrast",
          "brightness", "sharpness", "shear_x", "shear_y", "translate_x", "translate_y")
AFFINE_OPS = ("rotate", "shear_x", "shear_y", "translate_x", "translate_y")
MAX_MAGNITUDE = 30

# Strength at M = 30: RandAugment's standard ranges, and TrivialAugment's wider ones. translate
# is a share of the side (torchvision: 150/331 for RandAugment; TrivialAugmentWide's 32 px is
# the whole side of a CIFAR image, which we cap at half of it).
STANDARD = dict(rotate=30.0, shear=0.3, translate=150 / 331, enhance=0.9, posterize_bits=4)
WIDE = dict(rotate=135.0, shear=0.99, translate=0.5, enhance=0.99, posterize_bits=6)
AFFINE_FILL = 0.5  # grey for pixels that geometric ops bring in from outside the image


def op_values(op: str, mag: torch.Tensor, sign: torch.Tensor, ranges: dict = STANDARD) -> torch.Tensor:
    """Per-image op argument from magnitude share mag (B,) in [0, 1] and sign (B,) of +-1."""
    if op in ("color", "contrast", "brightness", "sharpness"):
        return 1 + mag * ranges["enhance"] * sign  # enhance factor; 1 = unchanged
    if op == "rotate":
        return mag * ranges["rotate"] * sign  # degrees, counter-clockwise
    if op in ("shear_x", "shear_y"):
        return mag * ranges["shear"] * sign
    if op in ("translate_x", "translate_y"):
        return mag * ranges["translate"] * sign  # share of the side
    if op == "posterize":
        return 8 - (mag * ranges["posterize_bits"]).round()  # bits kept; 8 = unchanged
    if op == "solarize":
        return 256 * (1 - mag)  # threshold in levels; 256 = unchanged, 0 = all inverted
    return mag  # identity, auto_contrast, equalize take no argument


def auto_contrast(x, v=None):
    """Stretch each channel of each image to the full [0, 1] range (flat channels unchanged)."""
    lo = x.amin((2, 3), keepdim=True)
    hi = x.amax((2, 3), keepdim=True)
    span = hi - lo
    ok = span > 1e-6
    return torch.where(ok, (x - lo) / torch.where(ok, span, torch.ones_like(span)), x)


def equalize(x, v=None):
    """Histogram equalisation per image and channel, PIL's algorithm, batched.

    The histograms of all B*C channels are built by one scatter_add into a (B*C, 256)
    table; each channel's lookup table is then applied by one gather.
    """
    B, C, H, W = x.shape
    q = (x * 255).round_().long().view(B * C, H * W)  # (BC, HW) integer levels
    hist = torch.zeros(B * C, 256, device=x.device).scatter_add_(1, q, torch.ones_like(q, dtype=torch.float))
    # PIL's step leaves out the count of the brightest level present in the channel.
    top = hist.gather(1, q.amax(1, keepdim=True))  # (BC, 1)
    step = torch.div(H * W - top, 255, rounding_mode="floor")  # (BC, 1)
    safe = step.clamp(min=1)
    lut = torch.div(hist.cumsum(1) + torch.div(safe, 2, rounding_mode="floor"), safe, rounding_mode="floor")
    lut = F.pad(lut, (1, 0))[:, :-1].clamp_(0, 255)  # (BC, 256): level v -> from the count below v
    out = lut.gather(1, q).view(B, C, H, W) / 255
    return torch.where((step > 0).view(B, C, 1, 1), out, x)  # a (near-)constant channel stays as is


def solarize(x, threshold):
    """Invert the pixels whose 8-bit level is >= threshold (B,) (PIL's rule; 256: none)."""
    return torch.where(x * 255 >= threshold.view(-1, 1, 1, 1) - 0.5, 1 - x, x)


def posterize(x, bits):
    """Keep the top `bits` (B,) of each 8-bit level."""
    step = (2 ** (8 - bits)).view(-1, 1, 1, 1)  # quantisation step in levels
    q = (x * 255).round()
    return torch.div(q, step, rounding_mode="floor").mul_(step).div_(255)


def color(x, factor):
    """Saturation: blend with the grey image (PIL ImageEnhance.Color). No-op on 1-channel images."""
    if x.shape[1] == 1:
        return x
    return _blend(x, _gray(x), factor)


def contrast(x, factor):
    """Blend with the image's mean grey level, a per-image scalar (PIL ImageEnhance.Contrast)."""
    return _blend(x, _gray(x).mean((1, 2, 3), keepdim=True), factor)


def brightness(x, factor):
    """Blend with black: x * factor (PIL ImageEnhance.Brightness)."""
    return _blend(x, torch.zeros_like(x[:, :1, :1, :1]), factor)


_SMOOTH = torch.tensor([[1.0, 1.0, 1.0], [1.0, 5.0, 1.0], [1.0, 1.0, 1.0]]) / 13


def sharpness(x, factor):
    """Blend with PIL's SMOOTH-filtered image, border pixels kept (PIL ImageEnhance.Sharpness)."""
    C = x.shape[1]
    k = _SMOOTH.to(x.device, x.dtype).expand(C, 1, 3, 3)
    degenerate = x.clone()
    degenerate[:, :, 1:-1, 1:-1] = F.conv2d(x, k, groups=C)  # (B, C, H-2, W-2)
    return _blend(x, degenerate, factor)


def identity(x, v=None):
    return x


def affine_theta(op: str, v: torch.Tensor, H: int, W: int) -> torch.Tensor:
    """(B, 2, 3) matrices for F.affine_grid: output coords -> input coords, normalised to [-1, 1].

    Written in pixel units about the image centre and converted with the aspect
    ratio, so a rotation stays a rotation on non-square images. Positive angles turn
    the image counter-clockwise; positive translations move it right / down.
    """
    B = v.shape[0]
    theta = torch.zeros(B, 2, 3, device=v.device)
    theta[:, 0, 0] = theta[:, 1, 1] = 1
    if op == "rotate":
        a = v * math.pi / 180
        theta[:, 0, 0], theta[:, 0, 1] = a.cos(), -a.sin() * H / W
        theta[:, 1, 0], theta[:, 1, 1] = a.sin() * W / H, a.cos()
    elif op == "shear_x":
        theta[:, 0, 1] = v * H / W
    elif op == "shear_y":
        theta[:, 1, 0] = v * W / H
    elif op == "translate_x":  # a shift of v * W pixels is 2 v in normalised units
        theta[:, 0, 2] = -2 * v
    elif op == "translate_y":
        theta[:, 1, 2] = -2 * v
    return theta


def affine(x: torch.Tensor, theta: torch.Tensor, fill: float = AFFINE_FILL) -> torch.Tensor:
    """Warp float images by per-sample (B, 2, 3) matrices, bilinear; outside pixels become `fill`."""
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)  # (B, H, W, 2)
    # grid_sample pads with zeros; shifting by `fill` first makes the padding `fill`.
    return F.grid_sample(x - fill, grid, mode="bilinear", padding_mode="zeros", align_corners=False).add_(fill)


_OPS = dict(identity=identity, auto_contrast=auto_contrast, equalize=equalize, solarize=solarize,
            posterize=posterize, color=color, contrast=contrast, brightness=brightness, sharpness=sharpness)


def apply_op(op: str, x: torch.Tensor, v) -> torch.Tensor:
    """Apply op `op` with per-image argument v ((B,) or a number) to a batch; keeps x's dtype."""
    if op not in RA_OPS:
        raise UserError(f"unknown augmentation op {op!r} (choose from {', '.join(RA_OPS)})")
    xf = to_float(x)
    B, C, H, W = xf.shape
    v = torch.as_tensor(v, dtype=torch.float32, device=xf.device).expand(B).contiguous()
    y = affine(xf, affine_theta(op, v, H, W)) if op in AFFINE_OPS else _OPS[op](xf, v)
    return _like(y, x)


def _rand_augment_layer(x: torch.Tensor, mag: torch.Tensor, g: torch.Generator, ranges: dict,
                        dense: bool | None = None) -> torch.Tensor:
    """One op per image, chosen uniformly from RA_OPS. x float (B, C, H, W), mag (B,) in [0, 1].

    All geometric ops are folded into one per-image affine matrix, so a layer costs a
    single grid_sample for all of them. The other ops run either on the subset of
    images that drew them (CPU: least arithmetic) or, `dense`, on the whole batch with
    the result picked per image by torch.where (GPU: no data-dependent shapes, so no
    host sync per op). Both give the same images; dense defaults to x.is_cuda.
    """
    B, C, H, W = x.shape
    dev = x.device
    dense = x.is_cuda if dense is None else dense
    choice = _randint(len(RA_OPS), (B,), g, dev)  # (B,)
    sign = _sign(B, g, dev)
    out = x.clone()
    theta = affine_theta("identity", mag, H, W)  # (B, 2, 3) identity
    is_affine = torch.zeros(B, dtype=torch.bool, device=dev)
    for op in AFFINE_OPS:
        sel = choice == RA_OPS.index(op)
        theta = torch.where(sel.view(B, 1, 1), affine_theta(op, op_values(op, mag, sign, ranges), H, W), theta)
        is_affine |= sel
    if dense:
        out = torch.where(is_affine.view(B, 1, 1, 1), affine(x, theta), out)
    else:
        idx = is_affine.nonzero().squeeze(1)
        if idx.numel():
            out[idx] = affine(x[idx], theta[idx])
    for op in RA_OPS:
        if op in AFFINE_OPS or op == "identity":
            continue
        sel = choice == RA_OPS.index(op)
        if dense:
            out = torch.where(sel.view(B, 1, 1, 1), _OPS[op](x, op_values(op, mag, sign, ranges)), out)
            continue
        idx = sel.nonzero().squeeze(1)
        if idx.numel():
            out[idx] = _OPS[op](x[idx], op_values(op, mag[idx], sign[idx], ranges))
    return out


def rand_augment(x: torch.Tensor, n: int, m: float, g: torch.Generator) -> torch.Tensor:
    """RandAugment (Cubuk et al. 2020): n layers of one uniformly chosen op per image at magnitude m/30."""
    if not 0 <= m <= MAX_MAGNITUDE:
        raise UserError(f"RandAugment magnitude must be in 0..{MAX_MAGNITUDE}, got {m}")
    xf = to_float(x)
    mag = torch.full((xf.shape[0],), m / MAX_MAGNITUDE, device=xf.device)
    for _ in range(n):
        xf = _rand_augment_layer(xf, mag, g, STANDARD)
    return _like(xf, x)


def trivial_augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """TrivialAugment (Mueller & Hutter 2021): one op per image at a per-image uniform magnitude, wide ranges."""
    xf = to_float(x)
    mag = _randint(MAX_MAGNITUDE + 1, (xf.shape[0],), g, xf.device).float() / MAX_MAGNITUDE  # 31 bins
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
           & (xs >= x0.view(B, 1, 1)) & (xs < (x0 + ew).view(B, 1, 1)))  # (B, H, W)
    gd = _gen_on(g, dev)
    if x.is_cuda:  # a full batch of noise is cheap on a GPU and avoids nonzero's host sync
        noise = torch.randn(x.shape, generator=gd, device=dev, dtype=x.dtype)
        return torch.where((box & on.view(B, 1, 1)).unsqueeze(1), noise, x)
    # On CPU, noise only for the images that are erased (a quarter of them at p = 0.25):
    # drawing a whole batch of normals would cost more than the rest of the op.
    idx = on.nonzero().squeeze(1)
    if idx.numel() == 0:
        return x
    noise = torch.randn((idx.numel(), C, H, W), generator=gd, device=dev, dtype=x.dtype)
    out = x.clone()
    out[idx] = torch.where(box[idx].unsqueeze(1), noise, x[idx])
    return out


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

    __call__(images uint8 (B, C, H, W), labels int64 (B,), generator, clean=False) ->
    (float32 (B, C, h, w), targets): labels as given when the batch was not mixed,
    else soft float (B, num_classes) rows summing to 1.

    clean=True (the engine sets it in the first aug.clean_head and the last aug.clean_tail of the
    schedule) keeps only the flips: the images as they will be tested, mirrored at random.
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
        for key in ("clean_head", "clean_tail"):
            if not 0.0 <= getattr(aug, key) < 1.0:
                raise UserError(f"aug.{key} is a fraction of the schedule in [0, 1), got {getattr(aug, key)}")
        if aug.clean_head + aug.clean_tail >= 1.0:
            raise UserError(f"aug.clean_head + aug.clean_tail must leave part of the schedule augmented "
                            f"(got {aug.clean_head} + {aug.clean_tail})")
        self.mixer = Mixer(aug.mixup_alpha, aug.cutmix_alpha, aug.mix_prob, aug.switch_prob, num_classes)

    def __call__(self, images: torch.Tensor, labels: torch.Tensor, generator: torch.Generator, clean: bool = False):
        a, g = self.aug, generator
        if clean:
            return normalize(to_float(hflip(fit_size(images, self.size, g), a.hflip, g)), self.mean, self.std), labels
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

