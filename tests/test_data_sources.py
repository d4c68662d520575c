"""Dataset sources on small files written in the real on-disk formats, downloads, errors."""

import gzip
import io
import os
import pickle
import struct
import tarfile
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from vitlab.config import DataConfig
from vitlab.data import FileSplit, TensorSplit, build_data, make_loader
from vitlab.data import download as dl
from vitlab.data import sources
from vitlab.data.matfile import loadmat
from vitlab.errors import UserError

# The real files, where this project's machines keep them (beside the checkout), where
# Debian's dataset-fashion-mnist package puts them, or wherever $VITLAB_FASHION_MNIST says.
_FASHION_CANDIDATES = [Path(p) for p in (os.environ.get("VITLAB_FASHION_MNIST"),) if p] + [
    Path(__file__).resolve().parents[2] / "shared" / "data" / "fashion-mnist",
    Path("/usr/share/datasets/fashion-mnist"),
]
REAL_FASHION = next((p for p in _FASHION_CANDIDATES if p.is_dir()), _FASHION_CANDIDATES[0])


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(autouse=True)
def no_system_dirs(monkeypatch):
    # The automatic /usr/share/datasets lookup must not leak into tests on machines that have it.
    monkeypatch.setattr(sources, "SYSTEM_DIRS", {k: () for k in sources.SYSTEM_DIRS})
    monkeypatch.delenv("VITLAB_DATA", raising=False)


def one_line_user_error(excinfo):
    msg = str(excinfo.value)
    assert isinstance(excinfo.value, UserError) and "\n" not in msg and msg
    return msg


# -- CIFAR ---------------------------------------------------------------------------


def write_cifar10(folder: Path, n_per_batch=6, protocol=2, seed=0):
    """The python-version layout: pickled dicts with bytes keys, data (N, 3072) uint8 R|G|B planes."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    all_x, all_y = {}, {}
    for name in names:
        x = rng.integers(0, 256, (n_per_batch, 3072), dtype=np.uint8)
        y = [int(v) for v in rng.integers(0, 10, n_per_batch)]
        all_x[name], all_y[name] = x, y
        with open(folder / name, "wb") as f:
            pickle.dump({b"batch_label": b"x", b"labels": y, b"data": x, b"filenames": [b"a.png"] * n_per_batch}, f,
                        protocol=protocol)
    meta = {b"label_names": [b"airplane", b"automobile", b"bird", b"cat", b"deer", b"dog", b"frog", b"horse",
                             b"ship", b"truck"], b"num_vis": 3072}
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump(meta, f, protocol=protocol)
    return all_x, all_y


@pytest.mark.parametrize("protocol", [2, pickle.HIGHEST_PROTOCOL])
def test_cifar10_from_extracted_folder(tmp_path, protocol):
    xs, ys = write_cifar10(tmp_path / "cifar-10-batches-py", protocol=protocol)
    b = build_data(DataConfig(name="cifar10", dir=str(tmp_path), download=False))
    assert isinstance(b.train, TensorSplit) and len(b.train) == 30 and len(b.test) == 6
    assert b.info.classes[0] == "airplane" and b.info.num_classes == 10 and b.info.in_chans == 3
    # pixel (c, y, x) of image 0 is data[0, c*1024 + y*32 + x]
    x0 = xs["data_batch_1"][0]
    assert b.train.images[0, 2, 5, 7] == x0[2 * 1024 + 5 * 32 + 7]
    assert b.train.labels[:6].tolist() == ys["data_batch_1"]
    assert b.test.labels.tolist() == ys["test_batch"]


def _tar(folder: Path, archive: Path):
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(folder, arcname=folder.name)


def test_cifar10_from_archive_and_download(tmp_path, monkeypatch):
    src = tmp_path / "src"
    write_cifar10(src / "cifar-10-batches-py")
    archive = src / "cifar-10-python.tar.gz"
    _tar(src / "cifar-10-batches-py", archive)
    # read straight from an archive in the data dir
    local = tmp_path / "local"
    local.mkdir()
    (local / archive.name).write_bytes(archive.read_bytes())
    assert len(build_data(DataConfig(name="cifar10", dir=str(local), download=False)).train) == 30

    # download from a file:// URL with the right checksum
    monkeypatch.setattr(sources, "CIFAR_URL", src.as_uri() + "/")
    monkeypatch.setitem(sources.CIFAR["cifar10"], "md5", dl.file_hash(archive))
    fresh = tmp_path / "fresh"
    b = build_data(DataConfig(name="cifar10", dir=str(fresh)))
    assert len(b.test) == 6 and (fresh / archive.name).is_file()
    assert sorted(os.listdir(fresh)) == [archive.name]  # no part files left


def test_checksum_failure_deletes_the_download(tmp_path, monkeypatch):
    src = tmp_path / "src"
    write_cifar10(src / "cifar-10-batches-py")
    _tar(src / "cifar-10-batches-py", src / "cifar-10-python.tar.gz")
    monkeypatch.setattr(sources, "CIFAR_URL", src.as_uri() + "/")
    # the real official md5 stays in place: our fake archive cannot match it
    fresh = tmp_path / "fresh"
    with pytest.raises(UserError) as e:
        build_data(DataConfig(name="cifar10", dir=str(fresh)))
    msg = one_line_user_error(e)
    assert "checksum" in msg and "c58f30108f718f92721af3b95e74349a" in msg and dl.file_hash(
        src / "cifar-10-python.tar.gz") in msg and src.as_uri() in msg
    assert not fresh.exists() or os.listdir(fresh) == []  # nothing that looks like data is left


def test_interrupted_download_leaves_nothing(tmp_path, monkeypatch):
    def broken(url, out, desc):
        out.write(b"half a file")
        raise ConnectionResetError(104, "Connection reset by peer")

    monkeypatch.setattr(dl, "_fetch", broken)
    with pytest.raises(UserError) as e:
        dl.download("https://example.invalid/x.tgz", tmp_path / "x.tgz", "0" * 32)
    assert "Connection reset" in one_line_user_error(e)
    assert os.listdir(tmp_path) == []


def test_existing_good_file_is_not_downloaded_again(tmp_path, monkeypatch):
    f = tmp_path / "a.bin"
    f.write_bytes(b"hello")
    monkeypatch.setattr(dl, "_fetch", lambda *a: pytest.fail("should not download"))
    assert dl.download("https://example.invalid/a.bin", f, dl.file_hash(f)) == f


def test_cifar100_layout(tmp_path):
    rng = np.random.default_rng(1)
    d = tmp_path / "cifar-100-python"
    d.mkdir()
    for name, n in (("train", 8), ("test", 4)):
        with open(d / name, "wb") as f:
            pickle.dump({b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                         b"fine_labels": [int(v) for v in rng.integers(0, 100, n)],
                         b"coarse_labels": [0] * n}, f, protocol=2)
    with open(d / "meta", "wb") as f:
        pickle.dump({b"fine_label_names": [f"c{i}".encode() for i in range(100)], b"coarse_label_names": []}, f)
    b = build_data(DataConfig(name="cifar100", dir=str(tmp_path), download=False))
    assert b.info.num_classes == 100 and len(b.train) == 8 and len(b.test) == 4


def test_cifar_pickle_cannot_run_code(tmp_path):
    d = tmp_path / "cifar-10-batches-py"
    write_cifar10(d)

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    with open(d / "test_batch", "wb") as f:
        pickle.dump({b"data": Evil(), b"labels": []}, f)
    with pytest.raises(UserError) as e:
        build_data(DataConfig(name="cifar10", dir=str(tmp_path), download=False))
    assert "not a CIFAR python batch" in one_line_user_error(e)


# -- idx (MNIST, Fashion-MNIST) ---------------------------------------------------------


def idx_bytes(a: np.ndarray) -> bytes:
    return bytes([0, 0, 8, a.ndim]) + struct.pack(f">{a.ndim}i", *a.shape) + a.astype(np.uint8).tobytes()


def write_idx_set(d: Path, n_train=20, n_test=10, gz=True, size=28, seed=0):
    rng = np.random.default_rng(seed)
    d.mkdir(parents=True, exist_ok=True)
    arrays = {"train-images-idx3-ubyte": rng.integers(0, 256, (n_train, size, size)),
              "train-labels-idx1-ubyte": np.arange(n_train) % 10,
              "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, size, size)),
              "t10k-labels-idx1-ubyte": rng.integers(0, 10, n_test)}
    for name, a in arrays.items():
        data = idx_bytes(a)
        if gz:
            (d / (name + ".gz")).write_bytes(gzip.compress(data))
        else:
            (d / name).write_bytes(data)
    return arrays


@pytest.mark.parametrize("gz", [True, False])
@pytest.mark.parametrize("name", ["mnist", "fashion-mnist"])
def test_idx_files_gz_and_raw(tmp_path, name, gz):
    arrays = write_idx_set(tmp_path / name, gz=gz)
    b = build_data(DataConfig(name=name, dir=str(tmp_path), download=False))
    assert b.info.in_chans == 1 and b.info.img_size == (28, 28) and b.info.num_classes == 10
    assert b.train.images.shape == (20, 1, 28, 28) and b.train.images.dtype == torch.uint8
    assert torch.equal(b.train.images[:, 0], torch.from_numpy(arrays["train-images-idx3-ubyte"]).to(torch.uint8))
    assert b.test.labels.tolist() == arrays["t10k-labels-idx1-ubyte"].tolist()
    ld = make_loader(b.train, 8, train=True, seed=0, device="cpu")
    x, y = next(iter(ld))
    assert x.shape == (8, 1, 28, 28)


def test_idx_download_and_system_dir(tmp_path, monkeypatch):
    src = tmp_path / "mirror"
    write_idx_set(src, gz=True)
    md5 = tuple(dl.file_hash(src / (f + ".gz")) for f in sources.IDX_FILES)
    monkeypatch.setitem(sources.MNIST["fashion-mnist"], "url", src.as_uri() + "/")
    monkeypatch.setitem(sources.MNIST["fashion-mnist"], "md5", md5)
    b = build_data(DataConfig(name="fashion-mnist", dir=str(tmp_path / "root")))
    assert len(b.train) == 20 and (tmp_path / "root" / "fashion-mnist" / "train-images-idx3-ubyte.gz").is_file()
    # the Debian location is found with nothing in the data root
    monkeypatch.setattr(sources, "SYSTEM_DIRS", {"fashion-mnist": (src,), "mnist": ()})
    assert len(build_data(DataConfig(name="fashion-mnist", dir=str(tmp_path / "empty"), download=False)).test) == 10


def test_bad_idx_file_is_a_clear_error(tmp_path):
    write_idx_set(tmp_path, gz=False)
    (tmp_path / "t10k-images-idx3-ubyte").write_bytes(b"\x00\x00\x08\x03" + struct.pack(">3i", 10, 28, 28) + b"x")
    with pytest.raises(UserError) as e:
        build_data(DataConfig(name="mnist", dir=str(tmp_path), download=False))
    assert "t10k-images-idx3-ubyte" in one_line_user_error(e)


@pytest.mark.parametrize("name", ["cifar10", "cifar100", "mnist", "fashion-mnist", "flowers102"])
def test_missing_data_is_one_line_naming_where_and_how(tmp_path, name):
    with pytest.raises(UserError) as e:
        build_data(DataConfig(name=name, dir=str(tmp_path), download=False))
    msg = one_line_user_error(e)
    assert str(tmp_path) in msg and "--data-dir" in msg and name in msg


def test_missing_data_when_download_fails(tmp_path, monkeypatch):
    def offline(url, out, desc):
        raise dl.urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(dl, "_fetch", offline)
    with pytest.raises(UserError) as e:
        build_data(DataConfig(name="mnist", dir=str(tmp_path)))
    msg = one_line_user_error(e)
    assert "ossci-datasets" in msg and "Name or service not known" in msg and str(tmp_path) in msg
    assert list(tmp_path.iterdir()) == []  # no empty mnist/ folder left (in an image folder it would be a class)
    with pytest.raises(UserError):  # a --data-dir that does not exist is not created either
        build_data(DataConfig(name="mnist", dir=str(tmp_path / "typo" / "deeper")))
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "keep.txt").write_text("a user's file")
    with pytest.raises(UserError):
        build_data(DataConfig(name="mnist", dir=str(tmp_path / "mine")))
    assert sorted(p.name for p in (tmp_path / "mine").iterdir()) == ["keep.txt"]


def test_data_root_falls_back_to_env(tmp_path, monkeypatch):
    write_idx_set(tmp_path / "mnist", gz=True)
    monkeypatch.setenv("VITLAB_DATA", str(tmp_path))
    assert len(build_data(DataConfig(name="mnist", download=False)).train) == 20


@pytest.mark.skipif(not REAL_FASHION.is_dir(), reason=f"the real Fashion-MNIST is not at {REAL_FASHION}")
def test_real_fashion_mnist():
    b = build_data(DataConfig(name="fashion-mnist", dir=str(REAL_FASHION), download=False))
    assert len(b.train) == 60000 and len(b.test) == 10000
    assert b.train.images.shape == (60000, 1, 28, 28)
    assert torch.bincount(b.train.labels).tolist() == [6000] * 10
    assert torch.bincount(b.test.labels).tolist() == [1000] * 10
    # the published mean/std describe these pixels
    x = b.train.images[::20].float() / 255
    assert abs(float(x.mean()) - b.info.mean[0]) < 0.01 and abs(float(x.std()) - b.info.std[0]) < 0.01


# -- MATLAB files and Flowers102 -----------------------------------------------------------


@pytest.mark.parametrize("compress", [False, True])
def test_matfile_reader_matches_scipy(tmp_path, compress):
    sio = pytest.importorskip("scipy.io")
    data = {"labels": np.array([[1, 5, 102, 7]], dtype=np.float64), "ids": np.arange(1, 40, dtype=np.uint16)[None],
            "m": np.arange(12.0).reshape(3, 4), "big": np.arange(5000, dtype=np.int32)[None], "txt": "skip me"}
    sio.savemat(tmp_path / "a.mat", data, do_compression=compress)
    got = loadmat(tmp_path / "a.mat")
    ref = sio.loadmat(tmp_path / "a.mat")
    assert set(got) == {"labels", "ids", "m", "big"}
    for k, v in got.items():
        assert v.shape == ref[k].shape and np.array_equal(v, ref[k]), k


def test_matfile_rejects_other_files(tmp_path):
    (tmp_path / "x.mat").write_bytes(b"not a mat file" * 20)
    with pytest.raises(UserError) as e:
        loadmat(tmp_path / "x.mat")
    assert "x.mat" in one_line_user_error(e)


def write_flowers(d: Path, n=12, classes=3):
    from PIL import Image

    sio = pytest.importorskip("scipy.io")
    (d / "jpg").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(1, n + 1):
        a = rng.integers(0, 256, (30 + i, 40, 3), dtype=np.uint8)  # varied, non-square sizes
        Image.fromarray(a).save(d / "jpg" / f"image_{i:05d}.jpg", quality=90)
    labels = (np.arange(n) % classes + 1).astype(np.float64)[None]  # 1-based, (1, N) as in the real file
    sio.savemat(d / "imagelabels.mat", {"labels": labels})
    ids = np.arange(1, n + 1)
    sio.savemat(d / "setid.mat", {"trnid": ids[0::3][None].astype(np.uint16), "valid": ids[1::3][None].astype(
        np.uint16), "tstid": ids[2::3][None].astype(np.uint16)}, do_compression=True)
    return labels[0].astype(int) - 1


def test_flowers102_official_layout(tmp_path):
    labels = write_flowers(tmp_path / "flowers-102")
    b = build_data(DataConfig(name="flowers102", dir=str(tmp_path), img_size=32, download=False))
    assert isinstance(b.train, FileSplit) and len(b.train) == len(b.val) == len(b.test) == 4
    assert b.info.num_classes == 3 and b.info.img_size == (32, 32) and b.info.in_chans == 3
    assert b.train.paths[0].endswith("image_00001.jpg") and b.val.paths[0].endswith("image_00002.jpg")
    assert b.train.labels.tolist() == labels[0::3].tolist()
    ld = make_loader(b.test, 3, train=False, seed=0, device="cpu", img_size=32, num_workers=0)
    batches = list(ld)
    assert [x.shape for x, _ in batches] == [(3, 3, 32, 32), (1, 3, 32, 32)]
    assert batches[0][0].dtype == torch.uint8
    train = list(make_loader(b.train, 2, train=True, seed=0, device="cpu", img_size=32, num_workers=0))
    assert train[0][0].shape == (2, 3, 37, 37)  # 32 * 256 / 224: room for the random crop


def test_flowers102_download_and_extract(tmp_path, monkeypatch):
    src = tmp_path / "mirror"
    write_flowers(src)
    with tarfile.open(src / "102flowers.tgz", "w:gz") as tar:
        tar.add(src / "jpg", arcname="jpg")
    md5 = {n: dl.file_hash(src / n) for n in sources.FLOWERS_FILES}
    monkeypatch.setattr(sources, "FLOWERS_URL", src.as_uri() + "/")
    monkeypatch.setattr(sources, "FLOWERS_FILES", md5)
    root = tmp_path / "root"
    b = build_data(DataConfig(name="flowers102", dir=str(root), img_size=32))
    assert len(b.test) == 4 and Path(b.test.paths[0]).is_file()
    assert sorted(p.name for p in (root / "flowers-102").iterdir()) == ["102flowers.tgz", "imagelabels.mat", "jpg",
                                                                      "setid.mat"]


# -- image folders and the decoding loader ------------------------------------------------------


def write_odd_folder(d: Path):
    """Two classes of images in every awkward mode, plus one corrupt file."""
    from PIL import Image

    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (20, 28, 3), dtype=np.uint8)
    (d / "cat").mkdir(parents=True)
    (d / "dog").mkdir()
    Image.fromarray(rgb).save(d / "cat" / "rgb.png")
    Image.fromarray(rgb[..., 0]).save(d / "cat" / "gray.png")  # L
    rgba = np.concatenate([rgb, np.full((20, 28, 1), 128, np.uint8)], 2)
    Image.fromarray(rgba, "RGBA").save(d / "cat" / "alpha.png")
    Image.fromarray(rgb).convert("P").save(d / "dog" / "palette.gif")  # P
    Image.fromarray(rgb).convert("CMYK").save(d / "dog" / "cmyk.jpg")  # CMYK JPEG
    Image.fromarray((rgb[..., 0].astype(np.uint16) * 200)).save(d / "dog" / "deep.png")  # I;16
    (d / "dog" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg")
    good = io.BytesIO()
    Image.fromarray(rgb).save(good, "JPEG")
    (d / "cat" / "truncated.jpg").write_bytes(good.getvalue()[: len(good.getvalue()) // 2])  # cut-off download
    (d / "dog" / "notes.txt").write_text("not an image, ignored")


def test_imagefolder_modes_and_corrupt_file(tmp_path):
    write_odd_folder(tmp_path / "pets")
    b = build_data(DataConfig(name=f"imagefolder:{tmp_path / 'pets'}", img_size=16))
    assert b.info.classes == ["cat", "dog"] and b.info.num_classes == 2
    # 8 images (the .txt is not one); a seeded 10% per-class hold-out becomes the test split
    assert len(b.train) + len(b.test) == 8 and len(b.test) == 2
    assert "no test/ folder: 2 of its images" in b.info.note  # said in the run's log
    both = FileSplit(b.train.paths + b.test.paths, torch.cat([b.train.labels, b.test.labels]))
    ld = make_loader(both, 4, train=False, seed=0, device="cpu", img_size=16, num_workers=0)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        batches = list(ld)
    xs = torch.cat([x for x, _ in batches])
    assert xs.shape == (6, 3, 16, 16) and xs.dtype == torch.uint8  # every mode became RGB; 2 skipped
    assert ld.num_corrupt == 2 and {Path(p).name for p in ld.corrupt} == {"broken.jpg", "truncated.jpg"}
    assert any("broken.jpg" in str(x.message) for x in w) and any("truncated" in str(x.message) for x in w)
    with pytest.raises(UserError) as e:
        list(make_loader(both, 4, train=False, seed=0, device="cpu", img_size=16, num_workers=0, on_corrupt="fail"))
    assert ".jpg" in one_line_user_error(e)


def test_imagefolder_with_workers_matches_single_process(tmp_path):
    write_odd_folder(tmp_path / "pets")
    b = build_data(DataConfig(name=f"imagefolder:{tmp_path / 'pets'}", img_size=16))
    kw = dict(train=True, seed=3, device="cpu", img_size=16, drop_last=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        a = list(make_loader(b.train, 2, num_workers=0, **kw))
        c = list(make_loader(b.train, 2, num_workers=2, **kw))
    assert len(a) == len(c) and all(torch.equal(x1, x2) and torch.equal(y1, y2) for (x1, y1), (x2, y2) in zip(a, c))


def test_imagefolder_train_val_test_layout(tmp_path):
    from PIL import Image

    for split, n in (("train", 3), ("val", 1), ("test", 2)):
        for c in ("a", "b"):
            (tmp_path / split / c).mkdir(parents=True)
            for i in range(n):
                Image.new("RGB", (10, 12), (i * 40, 0, 0)).save(tmp_path / split / c / f"{i}.png")
    b = build_data(DataConfig(name=f"imagefolder:{tmp_path}", img_size=8))
    assert (len(b.train), len(b.val), len(b.test)) == (6, 2, 4) and b.info.note == ""
    (tmp_path / "val" / "zebra").mkdir()
    with pytest.raises(UserError, match="zebra"):
        build_data(DataConfig(name=f"imagefolder:{tmp_path}"))


def test_imagefolder_errors(tmp_path):
    with pytest.raises(UserError) as e:
        build_data(DataConfig(name=f"imagefolder:{tmp_path / 'nope'}"))
    assert "nope" in one_line_user_error(e)
    (tmp_path / "empty" / "a").mkdir(parents=True)
    with pytest.raises(UserError, match="no images"):
        build_data(DataConfig(name=f"imagefolder:{tmp_path / 'empty'}"))
    with pytest.raises(UserError, match="needs a path"):
        build_data(DataConfig(name="imagefolder"))
    # an empty class folder beside real ones: refused by name (it would be a class never seen)
    from PIL import Image

    for c in ("cat", "dog"):
        (tmp_path / "pets" / c).mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(tmp_path / "pets" / "cat" / "0.png")
    (tmp_path / "pets" / "dog" / "notes.txt").write_text("no image here")
    with pytest.raises(UserError) as e:
        build_data(DataConfig(name=f"imagefolder:{tmp_path / 'pets'}"))
    assert f"class folder {tmp_path / 'pets' / 'dog'} has no images" in one_line_user_error(e)


def test_file_loader_order_follows_the_epoch_with_persistent_workers(tmp_path):
    from PIL import Image

    d = tmp_path / "imgs"
    for c in ("a", "b"):
        (d / c).mkdir(parents=True)
        for i in range(6):
            Image.new("RGB", (8, 8), (i * 40, 0 if c == "a" else 255, 0)).save(d / c / f"{i}.png")
    b = build_data(DataConfig(name=f"imagefolder:{d}", img_size=8))
    ld = make_loader(b.train, 3, train=True, seed=0, device="cpu", img_size=8, num_workers=1, drop_last=False)
    epochs = []
    for e in (0, 1, 0):
        ld.set_epoch(e)
        epochs.append(torch.cat([x[:, :, 0, 0].long() for x, _ in ld]))  # (N, 3) pixel colours in order
    assert torch.equal(epochs[0], epochs[2]) and not torch.equal(epochs[0], epochs[1])
    assert sorted(map(tuple, epochs[0].tolist())) == sorted(map(tuple, epochs[1].tolist()))
    # close() stops the persistent workers at once (not at interpreter exit); iterating again restarts them
    workers = list(ld._loader._iterator._workers)
    assert workers and all(w.is_alive() for w in workers)
    ld.close()
    assert ld._loader is None and not any(w.is_alive() for w in workers)
    ld.set_epoch(0)
    assert torch.equal(torch.cat([x[:, :, 0, 0].long() for x, _ in ld]), epochs[0])
    ld.close()
    # a loader dropped without close() (a failed run inside a longer-lived process) stops its workers
    # as soon as its last reference goes, not when the cycle collector runs
    import gc

    list(ld)
    workers = list(ld._loader._iterator._workers)
    gc.disable()
    try:
        del ld
        assert not any(w.is_alive() for w in workers)
    finally:
        gc.enable()
