"""Batched augmentations: invariants, agreement with PIL where the op is PIL's, reproducibility."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from vitlab.config import AugConfig
from vitlab.data import DatasetInfo, build_eval_transform, build_train_transform, make_shapes
from vitlab.data import augment as A
from vitlab.data.mix import Mixer, cutmix_boxes
from vitlab.errors import UserError


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def rgb():
    return make_shapes(16, seed=1)[0]  # uint8 (16, 3, 32, 32)


@pytest.fixture(scope="module")
def gray(rgb):
    return rgb.float().mean(1, keepdim=True).round().to(torch.uint8)  # uint8 (16, 1, 32, 32)


RGB_INFO = DatasetInfo("t", 10, [str(i) for i in range(10)], 3, (32, 32), (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
GRAY_INFO = DatasetInfo("t", 10, [str(i) for i in range(10)], 1, (32, 32), (0.3,), (0.35,))


# -- flips and crops ------------------------------------------------------------------


def test_flip_twice_is_identity(rgb):
    assert torch.equal(A.hflip(A.hflip(rgb, 1.0, gen()), 1.0, gen()), rgb)
    assert torch.equal(A.hflip(rgb, 1.0, gen()), rgb.flip(3))
    # with p = 0.5 the same generator state flips the same images, so twice is identity again
    once = A.hflip(rgb, 0.5, gen(7))
    flipped = (once != rgb).flatten(1).any(1)
    assert 0 < int(flipped.sum()) < len(rgb)
    assert torch.equal(A.hflip(once, 0.5, gen(7)), rgb)


@pytest.mark.parametrize("mode", ["reflect", "zeros"])
@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32])
def test_random_crop_is_a_window_of_the_padded_image(rgb, mode, dtype):
    x = rgb[:6] if dtype == torch.uint8 else rgb[:6].float() / 255
    out = A.random_crop(x, (32, 32), 4, gen(3), mode)
    assert out.shape == x.shape and out.dtype == dtype
    padded = F.pad(x.float(), (4, 4, 4, 4), mode="reflect" if mode == "reflect" else "constant")
    for i in range(len(x)):  # each output must equal one 32x32 window of the padded image
        hits = [(dy, dx) for dy in range(9) for dx in range(9)
                if torch.equal(padded[i, :, dy:dy + 32, dx:dx + 32], out[i].float())]
        assert hits, f"image {i} is not a crop of its padded version"
    smaller = A.random_crop(x, (24, 20), 0, gen(), mode)
    assert smaller.shape == (6, 3, 24, 20)


def test_random_crop_offsets_vary_per_sample(rgb):
    x = rgb[:1].expand(32, -1, -1, -1)
    out = A.random_crop(x, (32, 32), 4, gen(0))
    assert len({bytes(o.numpy()) for o in out}) > 10


def test_random_resized_crop_shapes_and_full_scale(rgb):
    out = A.random_resized_crop(rgb, (24, 24), gen(), scale=(0.08, 1.0))
    assert out.shape == (16, 3, 24, 24) and out.dtype == torch.uint8
    # scale 1 and ratio 1 is the whole image: same size in, same image out
    same = A.random_resized_crop(rgb, (32, 32), gen(), scale=(1.0, 1.0), ratio=(1.0, 1.0))
    assert (same.int() - rgb.int()).abs().max() <= 1


# -- RandAugment ops --------------------------------------------------------------------


@pytest.mark.parametrize("op", A.RA_OPS)
@pytest.mark.parametrize("channels", [3, 1])
def test_every_op_runs_at_magnitude_zero_and_max(rgb, gray, op, channels):
    x = rgb if channels == 3 else gray
    sign = torch.tensor([1.0, -1.0]).repeat(8)
    for mag in (0.0, 1.0):
        v = A.op_values(op, torch.full((16,), mag), sign)
        out = A.apply_op(op, x, v)
        assert out.shape == x.shape and out.dtype == torch.uint8
        outf = A.apply_op(op, x.float() / 255, v)
        assert outf.dtype == torch.float32 and 0 <= float(outf.min()) and float(outf.max()) <= 1
        assert (outf * 255 - out.float()).abs().max() <= 1  # uint8 and float paths agree
        changed = not torch.equal(out, x)
        if mag == 0 and op not in ("auto_contrast", "equalize"):
            assert not changed, f"{op} at magnitude 0 must leave the image unchanged"
        if mag == 1 and op != "identity" and not (op == "color" and channels == 1):
            assert changed, f"{op} at the maximum magnitude did nothing"
    if op == "color" and channels == 1:
        assert torch.equal(A.apply_op(op, x, 1.9), x)  # saturation is a no-op on grey images


def _pil(x):
    from PIL import Image

    a = x.permute(1, 2, 0).numpy()
    return Image.fromarray(a[..., 0] if a.shape[2] == 1 else a)


def _from_pil(img, like):
    a = torch.from_numpy(np.asarray(img).copy())
    return (a.unsqueeze(0) if a.ndim == 2 else a.permute(2, 0, 1)).to(like.dtype)


@pytest.mark.parametrize("channels", [3, 1])
def test_ops_agree_with_pil(rgb, gray, channels):
    from PIL import ImageEnhance, ImageOps

    x = (rgb if channels == 3 else gray)[:4]
    exact = {
        "equalize": (None, ImageOps.equalize),
        "solarize": (128.0, lambda im: ImageOps.solarize(im, 128)),
        "posterize": (3.0, lambda im: ImageOps.posterize(im, 3)),
    }
    for op, (v, ref) in exact.items():
        ours = A.apply_op(op, x, 0.0 if v is None else v)
        theirs = torch.stack([_from_pil(ref(_pil(im)), x) for im in x])
        assert torch.equal(ours, theirs), op
    close = {"auto_contrast": (0.0, ImageOps.autocontrast),
             "brightness": (1.6, lambda im: ImageEnhance.Brightness(im).enhance(1.6)),
             "contrast": (0.4, lambda im: ImageEnhance.Contrast(im).enhance(0.4)),
             "sharpness": (1.8, lambda im: ImageEnhance.Sharpness(im).enhance(1.8))}
    if channels == 3:
        close["color"] = (0.3, lambda im: ImageEnhance.Color(im).enhance(0.3))
    for op, (v, ref) in close.items():
        ours = A.apply_op(op, x, v).int()
        theirs = torch.stack([_from_pil(ref(_pil(im)), x) for im in x]).int()
        # PIL rounds in integer steps (truncating LUTs, an integer mean); allow a level or two
        assert (ours - theirs).abs().float().quantile(0.99) <= 2, op


def test_geometric_ops_move_pixels_the_documented_way(rgb):
    x = rgb[:4].float() / 255
    # 90 degrees counter-clockwise on a square image is torch.rot90 (sample points land on pixel centres)
    assert torch.allclose(A.apply_op("rotate", x, 90.0), torch.rot90(x, 1, (2, 3)), atol=1e-4)
    # a positive translation by 2 px moves content right / down; the vacated strip is grey
    tx = A.apply_op("translate_x", x, 2 / 32)
    assert torch.allclose(tx[..., 2:], x[..., :-2], atol=1e-5)
    assert torch.allclose(tx[..., :2], torch.full_like(tx[..., :2], A.AFFINE_FILL))
    ty = A.apply_op("translate_y", x, -3 / 32)
    assert torch.allclose(ty[..., :-3, :], x[..., 3:, :], atol=1e-5)
    # shear keeps the mean level roughly and moves rows by amounts that grow with the distance from the centre
    sx = A.apply_op("shear_x", x, 0.2)
    assert not torch.allclose(sx, x) and abs(float(sx.mean() - x.mean())) < 0.05


def test_rand_augment_and_trivial_augment_are_seeded_and_per_sample(rgb, gray):
    x = rgb[:1].expand(64, -1, -1, -1)
    for f in (lambda t, g: A.rand_augment(t, 2, 9, g), A.trivial_augment):
        a, b = f(x, gen(1)), f(x, gen(1))
        assert torch.equal(a, b) and a.dtype == torch.uint8
        assert not torch.equal(a, f(x, gen(2)))
        assert len({bytes(o.numpy()) for o in a}) > 20  # the same image gets different ops
        assert f(gray, gen(0)).shape == gray.shape
    with pytest.raises(UserError):
        A.rand_augment(rgb, 1, 31, gen())


def test_color_jitter_and_erasing(rgb, gray):
    for x in (rgb, gray):
        j = A.color_jitter(x, 0.4, gen())
        assert j.shape == x.shape and not torch.equal(j, x)
        assert torch.equal(A.color_jitter(x, 0.0, gen()), x)
    xn = A.normalize(rgb, (0.5,) * 3, (0.25,) * 3)
    e = A.random_erasing(xn, 1.0, gen())
    diff = (e != xn).any(1).flatten(1).float().mean(1)  # (B,) erased share of each image
    assert (diff > 0.015).all() and (diff < 0.40).all()
    assert torch.equal(A.random_erasing(xn, 0.0, gen()), xn)


def test_normalize_matches_the_formula(rgb):
    mean, std = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)
    ref = (rgb.float() / 255 - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    assert torch.allclose(A.normalize(rgb, mean, std), ref, atol=1e-5)
    assert torch.allclose(A.normalize(rgb.float() / 255, mean, std), ref, atol=1e-5)
    with pytest.raises(UserError, match="channel"):
        A.normalize(rgb, (0.5,), (0.5,))


# -- Mixup / CutMix --------------------------------------------------------------------------


def _constant_batch(B=32, C=3, H=16, W=16):
    # image i is filled with the value i, so every output pixel says which image it came from
    return torch.arange(B, dtype=torch.float32).view(B, 1, 1, 1).expand(B, C, H, W).contiguous()


def test_cutmix_label_weight_is_the_pasted_area():
    B, K = 32, 5
    x, labels = _constant_batch(B), torch.arange(B) % K
    out, t = Mixer(0.0, 1.0, 1.0, 0.5, K)(x, labels, gen(4))
    assert t.shape == (B, K) and torch.allclose(t.sum(1), torch.ones(B))
    own = (out == x).float().mean((1, 2, 3))  # share of each image that is still its own
    partner = (out == x.flip(0)).float().mean((1, 2, 3))
    assert torch.allclose(own + partner, torch.ones(B))
    onehot = F.one_hot(labels, K).float()
    expected = own.view(B, 1) * onehot + partner.view(B, 1) * onehot.flip(0)
    assert torch.allclose(t, expected, atol=1e-6)
    assert ((own > 0) & (own < 1)).any()


def test_cutmix_boxes_clip_at_the_border():
    lam = torch.full((500,), 0.3)
    y0, y1, x0, x1, lam_actual = cutmix_boxes(lam, 10, 10, gen())
    assert (y0 >= 0).all() and (y1 <= 10).all() and (x0 >= 0).all() and (x1 <= 10).all()
    area = ((y1 - y0) * (x1 - x0)).float() / 100
    assert torch.allclose(lam_actual, 1 - area)
    assert (lam_actual > 0.3).any()  # clipped boxes paste less than asked, and the label says so


def test_mixup_blends_images_and_labels_with_the_same_weight():
    B, K = 16, 4
    x, labels = _constant_batch(B, H=4, W=4), torch.arange(B) % K
    out, t = Mixer(0.8, 0.0, 1.0, 0.5, K)(x, labels, gen(2))
    lam = (out[:, 0, 0, 0] - x.flip(0)[:, 0, 0, 0]) / (x[:, 0, 0, 0] - x.flip(0)[:, 0, 0, 0])  # (B,)
    onehot = F.one_hot(labels, K).float()
    assert torch.allclose(t, lam.view(B, 1) * onehot + (1 - lam.view(B, 1)) * onehot.flip(0), atol=1e-5)
    assert torch.allclose(t.sum(1), torch.ones(B)) and lam.std() > 0  # per-sample weights


def test_mixer_switch_and_probability():
    B, K = 64, 10
    x, labels = _constant_batch(B, H=8, W=8), torch.arange(B) % K
    out, t = Mixer(0.8, 1.0, 1.0, 0.5, K)(x, labels, gen(0))
    is_blend = ((out != x) & (out != x.flip(0))).flatten(1).any(1)  # mixup leaves in-between values
    assert 10 < int(is_blend.sum()) < 54 and torch.allclose(t.sum(1), torch.ones(B))
    never = Mixer(0.8, 1.0, 0.0, 0.5, K)
    out, t = never(x, labels, gen(0))
    assert torch.equal(out, x) and torch.equal(t, labels)  # not mixed: the int labels come back
    mixed = sum(Mixer(0.8, 0.0, 0.5, 0.5, K)(x, labels, gen(s))[1].dtype == torch.float32 for s in range(40))
    assert 8 < mixed < 32


# -- the train transform --------------------------------------------------------------------


CIFAR_RECIPE = AugConfig(crop_padding=4, hflip=0.5, randaugment_n=2, randaugment_m=9, erasing=0.25,
                         mixup_alpha=0.8, cutmix_alpha=1.0)


def test_train_transform_same_seed_same_batch(rgb):
    labels = torch.arange(16) % 10
    tf = build_train_transform(CIFAR_RECIPE, RGB_INFO, (32, 32), 10)
    x1, t1 = tf(rgb, labels, gen(5))
    x2, t2 = tf(rgb, labels, gen(5))
    assert x1.dtype == torch.float32 and x1.shape == (16, 3, 32, 32) and t1.shape == (16, 10)
    assert torch.equal(x1, x2) and torch.equal(t1, t2)
    x3, _ = tf(rgb, labels, gen(6))
    assert not torch.equal(x1, x3)
    assert torch.allclose(t1.sum(1), torch.ones(16))


def test_train_transform_without_mixing_returns_int_labels_and_resizes(gray):
    labels = torch.arange(16) % 10
    plain = AugConfig(mixup_alpha=0.0, cutmix_alpha=0.0, trivialaugment=True, color_jitter=0.3)
    x, t = build_train_transform(plain, GRAY_INFO, (24, 24), 10)(gray, labels, gen())
    assert x.shape == (16, 1, 24, 24) and torch.equal(t, labels)  # larger data: random 24x24 crop
    x, _ = build_train_transform(plain, GRAY_INFO, (48, 48), 10)(gray, labels, gen())
    assert x.shape == (16, 1, 48, 48)  # smaller data: resized up
    rrc = AugConfig(random_resized_crop=True, mixup_alpha=0.0)
    assert build_train_transform(rrc, GRAY_INFO, (20, 20), 10)(gray, labels, gen())[0].shape == (16, 1, 20, 20)


def test_clean_batches_keep_only_the_flip(gray):
    # aug.clean_head's and clean_tail's batches: every augmentation off but the flip, the labels hard.
    labels = torch.arange(16) % 10
    strong = dict(crop_padding=4, erasing=1.0, mixup_alpha=0.8, cutmix_alpha=1.0, trivialaugment=True,
                  color_jitter=0.4, clean_tail=0.3)
    as_tested = build_eval_transform(GRAY_INFO, (32, 32))(gray)
    x, t = build_train_transform(AugConfig(hflip=0.0, **strong), GRAY_INFO, (32, 32), 10)(gray, labels, gen(), clean=True)
    assert torch.equal(t, labels) and torch.allclose(x, as_tested)
    tf = build_train_transform(AugConfig(hflip=1.0, **strong), GRAY_INFO, (32, 32), 10)
    x, t = tf(gray, labels, gen(), clean=True)
    assert torch.equal(t, labels) and torch.allclose(x, as_tested.flip(3))
    x, t = tf(gray, labels, gen())  # the same transform off the tail: augmented and mixed
    assert t.shape == (16, 10) and not torch.allclose(x, as_tested.flip(3))
    for bad in (-0.1, 1.0):
        with pytest.raises(UserError, match="aug.clean_tail"):
            build_train_transform(AugConfig(clean_tail=bad), GRAY_INFO, (32, 32), 10)
        with pytest.raises(UserError, match="aug.clean_head"):
            build_train_transform(AugConfig(clean_head=bad), GRAY_INFO, (32, 32), 10)
    with pytest.raises(UserError, match="leave part of the schedule"):
        build_train_transform(AugConfig(clean_head=0.5, clean_tail=0.5), GRAY_INFO, (32, 32), 10)


def test_autoaugment_flag_means_randaugment_2_9():
    tf = build_train_transform(AugConfig(autoaugment=True), RGB_INFO, (32, 32), 10)
    assert (tf.ra_n, tf.ra_m) == (2, 9)
    tf = build_train_transform(AugConfig(autoaugment=True, randaugment_n=1, randaugment_m=5), RGB_INFO, (32, 32), 10)
    assert (tf.ra_n, tf.ra_m) == (1, 5)
    with pytest.raises(UserError):
        build_train_transform(AugConfig(randaugment_n=2, trivialaugment=True), RGB_INFO, (32, 32), 10)
    with pytest.raises(UserError):
        build_train_transform(AugConfig(pad_mode="wrap"), RGB_INFO, (32, 32), 10)


def test_transform_runs_on_the_images_device_with_a_cpu_generator(rgb):
    # The generator may live on another device than the images (CUDA images, CPU generator);
    # on a CPU-only machine this checks the same code path with both on CPU.
    tf = build_train_transform(CIFAR_RECIPE, RGB_INFO, (32, 32), 10)
    x, t = tf(rgb.to("cpu"), torch.arange(16) % 10, torch.Generator(device="cpu").manual_seed(0))
    assert x.device == rgb.device and math.isfinite(float(x.sum()))


@pytest.mark.parametrize("ranges", [A.STANDARD, A.WIDE])
def test_dense_and_subset_rand_augment_give_the_same_images(rgb, ranges):
    # The GPU path (every op on the whole batch, picked by torch.where) must equal the CPU path
    # (each op on the images that drew it); compared here on CPU.
    x = rgb.float() / 255
    mag = torch.linspace(0, 1, len(x))
    sparse = A._rand_augment_layer(x, mag, gen(9), ranges, dense=False)
    dense = A._rand_augment_layer(x, mag, gen(9), ranges, dense=True)
    assert torch.allclose(sparse, dense, atol=1e-5)
