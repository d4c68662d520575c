"""The in-memory path: the shapes dataset, build_data's splits, the tensor loader."""

import pytest
import torch

from vitlab.config import DataConfig
from vitlab.data import (SHAPES_CLASSES, TensorSplit, build_data, build_eval_transform, epoch_indices, make_loader,
                         make_shapes)
from vitlab.data.shapes import _object_mask
from vitlab.errors import UserError


@pytest.fixture(autouse=True)
def one_thread():
    # These tests run many small tensor ops; on a shared 2-core machine a second
    # OpenMP thread only adds barrier waits. Restored after each test.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_shapes_is_deterministic_balanced_and_boxed():
    K = len(SHAPES_CLASSES)
    n = 50 * K
    x, y, b = make_shapes(n, seed=3)
    x2, y2, b2 = make_shapes(n, seed=3)
    assert x.dtype == torch.uint8 and x.shape == (n, 3, 32, 32)
    assert y.dtype == torch.int64 and b.dtype == torch.int64 and b.shape == (n, 4)
    assert torch.equal(x, x2) and torch.equal(y, y2) and torch.equal(b, b2)
    assert not torch.equal(x, make_shapes(n, seed=4)[0])
    assert torch.bincount(y, minlength=K).tolist() == [50] * K
    # Boxes are real boxes inside the image, a few pixels across at least.
    x0, y0, x1, y1 = b.unbind(1)
    assert (x0 >= 0).all() and (y0 >= 0).all() and (x1 <= 32).all() and (y1 <= 32).all()
    assert ((x1 - x0) >= 5).all() and ((y1 - y0) >= 5).all()
    # boxes are tight: the largest objects (r = 38% of the side) still fit well inside the image
    assert ((x1 - x0) <= 26).all() and ((y1 - y0) <= 26).all()


def test_shapes_classes_differ_only_in_form():
    # The object masks of different classes on the same grid must differ substantially,
    # otherwise the label would not be decidable from the object.
    r = torch.linspace(-1.2, 1.2, 48)
    v, u = torch.meshgrid(r, r, indexing="ij")
    masks = [_object_mask(k, u[None], v[None])[0] for k in range(len(SHAPES_CLASSES))]
    for i in range(len(masks)):
        assert masks[i].sum() > 100, SHAPES_CLASSES[i]
        for j in range(i):
            assert (masks[i] ^ masks[j]).sum() > 150, (SHAPES_CLASSES[i], SHAPES_CLASSES[j])


def test_shapes_colours_do_not_reveal_the_class():
    # Class means of the colour channels agree to within sampling noise (about 3 levels
    # of 255 at this size); a colour that depended on the class would show up here.
    x, y, _ = make_shapes(6000, seed=0)
    mean_colour = torch.stack([x[y == k].float().mean((0, 2, 3)) for k in range(len(SHAPES_CLASSES))])  # (K, 3)
    assert (mean_colour.max(0).values - mean_colour.min(0).values).max() < 8


def test_build_data_shapes_splits_val_and_subset():
    b = build_data(DataConfig(name="shapes"))
    assert len(b.train) == 10000 and len(b.test) == 2000 and b.val is None
    assert b.info.num_classes == len(b.info.classes) == len(SHAPES_CLASSES)
    assert b.info.in_chans == 3 and b.info.img_size == (32, 32) and len(b.info.mean) == 3
    assert isinstance(b.train, TensorSplit) and b.train.boxes is not None
    # train and test are different images
    assert not torch.equal(b.train.images[:10], b.test.images[:10])

    h = build_data(DataConfig(name="shapes", val_fraction=0.1))
    assert len(h.val) == 1000 and len(h.train) == 9000
    # held-out images are taken from train, disjoint from what is left
    train_keys = {bytes(t.numpy()) for t in h.train.images[:, 0, 10]}
    assert not any(bytes(t.numpy()) in train_keys for t in h.val.images[:200, 0, 10])

    s = build_data(DataConfig(name="shapes", subset=500))
    s2 = build_data(DataConfig(name="shapes", subset=500))
    assert len(s.train) == 500 and torch.equal(s.train.labels, s2.train.labels)
    assert len(s.test) == 2000


def test_build_data_rejects_bad_names_and_values():
    with pytest.raises(UserError, match="did you mean 'cifar10'"):
        build_data(DataConfig(name="cifar1O"))
    with pytest.raises(UserError, match="val_fraction"):
        build_data(DataConfig(name="shapes", val_fraction=1.0))
    with pytest.raises(UserError, match="subset"):
        build_data(DataConfig(name="shapes", subset=0))


def _split(n=103):
    images = torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, 1, 4, 4).contiguous()
    return TensorSplit(images, torch.arange(n))


def test_tensor_loader_order_is_a_function_of_seed_and_epoch():
    split = _split()
    a = make_loader(split, 10, train=True, seed=1, device="cpu")
    b = make_loader(split, 10, train=True, seed=1, device="cpu")
    assert len(a) == 10  # drop_last for training
    a.set_epoch(3), b.set_epoch(3)
    la = torch.cat([y for _, y in a])
    lb = torch.cat([y for _, y in b])
    assert torch.equal(la, lb) and la.unique().numel() == 100
    b.set_epoch(4)
    assert not torch.equal(la, torch.cat([y for _, y in b]))
    c = make_loader(split, 10, train=True, seed=2, device="cpu")
    c.set_epoch(3)
    assert not torch.equal(la, torch.cat([y for _, y in c]))
    # images and labels stay paired, dtypes as promised
    for x, y in a:
        assert x.dtype == torch.uint8 and y.dtype == torch.int64
        assert torch.equal(x[:, 0, 0, 0].long(), y)


def test_eval_loader_visits_every_image_once_in_order():
    split = _split()
    ld = make_loader(split, 10, train=False, seed=0, device="cpu")
    assert len(ld) == 11
    assert torch.equal(torch.cat([y for _, y in ld]), torch.arange(103))
    shards = [torch.cat([y for _, y in make_loader(split, 8, train=False, seed=0, device="cpu", rank=r,
                                                   world_size=3)]) for r in range(3)]
    assert torch.equal(torch.cat(shards).sort().values, torch.arange(103))


@pytest.mark.parametrize("world", [2, 3, 4])
def test_ddp_shards_are_disjoint_and_equal(world):
    n = 103
    shards = [epoch_indices(n, train=True, seed=5, epoch=2, rank=r, world_size=world) for r in range(world)]
    assert len({len(s) for s in shards}) == 1 and len(shards[0]) == n // world
    allidx = torch.cat(shards)
    assert allidx.unique().numel() == allidx.numel()  # disjoint
    loaders = [make_loader(_split(n), 4, train=True, seed=5, device="cpu", rank=r, world_size=world)
               for r in range(world)]
    assert len({len(ld) for ld in loaders}) == 1


def test_repeated_augmentation_spreads_copies_over_ranks():
    n, k, world = 64, 3, 4
    shards = [epoch_indices(n, train=True, seed=0, epoch=0, rank=r, world_size=world, repeated_aug=k)
              for r in range(world)]
    assert all(len(s) == n // world for s in shards)  # the epoch keeps its length (DeiT)
    allidx = torch.cat(shards)
    counts = torch.bincount(allidx, minlength=n)
    # every image in the epoch appears k times, except the one cut at the end
    assert set(counts[counts > 0].tolist()) <= set(range(1, k + 1))
    assert (counts == k).sum() >= n // k - 1
    # each shard sees an image at most once when k <= world: the copies go to different ranks
    assert all(s.unique().numel() == s.numel() for s in shards)


def test_eval_transform_normalises_crops_and_resizes():
    b = build_data(DataConfig(name="shapes"))
    ev = build_eval_transform(b.info, (32, 32))
    x = ev(b.test.images[:256])
    assert x.dtype == torch.float32 and x.shape == (256, 3, 32, 32)
    assert abs(float(x.mean())) < 0.15 and abs(float(x.std()) - 1) < 0.15
    big = build_eval_transform(b.info, (24, 24))(b.test.images[:4])  # centre crop
    assert big.shape == (4, 3, 24, 24) and torch.allclose(big, x[:4, :, 4:28, 4:28])
    up = build_eval_transform(b.info, (48, 48))(b.test.images[:4])  # resize
    assert up.shape == (4, 3, 48, 48)
