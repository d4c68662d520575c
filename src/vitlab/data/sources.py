"""The file-based sources: CIFAR-10/100, MNIST, Fashion-MNIST, Flowers102, image folders.

Each `source(cfg)` returns (DatasetInfo, train, val or None, test). Local data
is checked by its format (sizes, magic numbers), not by checksum, so a
re-compressed copy (e.g. Debian's dataset-fashion-mnist) is fine; downloads
are checked against the official md5s.
"""

from __future__ import annotations

import gzip
import io
import pickle
import tarfile
from pathlib import Path

import numpy as np
import torch

from ..config import DataConfig
from .base import DataError, DatasetInfo, FileSplit, TensorSplit
from .datasets import (CIFAR10_MEAN, CIFAR10_STD, CIFAR100_MEAN, CIFAR100_STD, FASHION_MEAN, FASHION_STD,
                       IMAGENET_MEAN, IMAGENET_STD, MNIST_MEAN, MNIST_STD, data_root)
from .download import DownloadError, download


def _missing(name: str, looked: list[Path], what: str, how: str) -> DataError:
    places = ", ".join(str(p) for p in dict.fromkeys(looked))
    return DataError(f"{name} not found (looked for {what} in {places}); {how}")


def _fetch_all(name: str, files: list[tuple[str, str, Path]], looked: list[Path], what: str, cfg: DataConfig):
    """Download [(url, md5, dest)], or say in one line where we looked and how to supply the data.

    A checksum mismatch is reported as such (download.py deletes the file).
    """
    dest_dir = files[0][2].parent
    if not cfg.download:
        raise _missing(name, looked, what, f"downloading is off (data.download=false): put them in {dest_dir} "
                                           f"or pass --data-dir DIR")
    for url, md5, dest in files:
        try:
            download(url, dest, md5)
        except DownloadError as e:
            raise _missing(name, looked, what, f"downloading {e.url} failed ({e.reason}): put them in {dest_dir} "
                                               f"or pass --data-dir DIR") from None


# -- CIFAR ------------------------------------------------------------------------

CIFAR_URL = "https://www.cs.toronto.edu/~kriz/"
CIFAR = {
    "cifar10": dict(archive="cifar-10-python.tar.gz", md5="c58f30108f718f92721af3b95e74349a",
                    folder="cifar-10-batches-py", train=[f"data_batch_{i}" for i in range(1, 6)], test=["test_batch"],
                    meta="batches.meta", names=b"label_names", labels=b"labels",
                    mean=CIFAR10_MEAN, std=CIFAR10_STD),
    "cifar100": dict(archive="cifar-100-python.tar.gz", md5="eb9058c3a382ffc7106e4002c42a8d85",
                     folder="cifar-100-python", train=["train"], test=["test"], meta="meta",
                     names=b"fine_label_names", labels=b"fine_labels", mean=CIFAR100_MEAN, std=CIFAR100_STD),
}


class _SafeUnpickler(pickle.Unpickler):
    """CIFAR batches are pickles; allow only the numpy array machinery, so a tampered
    file cannot run code on load."""

    _ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
                ("numpy._core.numeric", "_frombuffer"), ("numpy.core.numeric", "_frombuffer"),
                ("numpy", "ndarray"), ("numpy", "dtype"), ("builtins", "bytes"),
                ("_codecs", "encode")}  # how protocol-2 pickles written by Python 3 spell bytes

    def find_class(self, module, name):
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"unexpected object {module}.{name} in a CIFAR batch")


def _unpickle(data: bytes, where: str) -> dict:
    try:
        d = _SafeUnpickler(io.BytesIO(data), encoding="bytes").load()
    except Exception as e:  # any unpickling failure means a bad file
        raise DataError(f"{where} is not a CIFAR python batch ({e})") from None
    if not isinstance(d, dict):
        raise DataError(f"{where} is not a CIFAR python batch (not a dict)")
    return d


def _cifar_arrays(batches: list[dict], spec: dict, where: str):
    xs, ys = [], []
    for b in batches:
        if b"data" not in b or spec["labels"] not in b:
            raise DataError(f"{where}: a batch lacks 'data' or {spec['labels'].decode()!r}")
        x = np.asarray(b[b"data"], dtype=np.uint8)
        if x.ndim != 2 or x.shape[1] != 3072:
            raise DataError(f"{where}: batch data has shape {x.shape}, expected (N, 3072)")
        xs.append(x)
        ys.append(np.asarray(b[spec["labels"]], dtype=np.int64))
    x = torch.from_numpy(np.concatenate(xs)).view(-1, 3, 32, 32)  # rows are R plane, G plane, B plane
    y = torch.from_numpy(np.concatenate(ys))
    if len(x) != len(y):
        raise DataError(f"{where}: {len(x)} images but {len(y)} labels")
    return TensorSplit(x, y)


def _cifar(key: str, cfg: DataConfig):
    spec = CIFAR[key]
    root = data_root(cfg)
    dirs = [root / spec["folder"], root, root / key / spec["folder"], root / key]
    names = spec["train"] + spec["test"] + [spec["meta"]]

    def read_dir(d: Path):
        batches = {n: _unpickle((d / n).read_bytes(), str(d / n)) for n in names}
        return batches, str(d)

    def read_archive(a: Path):
        try:
            with tarfile.open(a, "r:gz") as tar:
                members = {Path(m.name).name: m for m in tar.getmembers() if m.isfile()}
                missing = [n for n in names if n not in members]
                if missing:
                    raise DataError(f"{a} lacks {', '.join(missing)}; is it the python version of {key}?")
                return {n: _unpickle(tar.extractfile(members[n]).read(), f"{a}:{n}") for n in names}, str(a)
        except (tarfile.TarError, OSError, EOFError) as e:
            raise DataError(f"cannot read {a} ({e}); delete it to download again") from None

    found = None
    for d in dirs:
        if all((d / n).is_file() for n in names):
            found = read_dir(d)
            break
    if found is None:
        archives = [d / spec["archive"] for d in (root, root / key)]
        archive = next((a for a in archives if a.is_file()), None)
        if archive is None:
            archive = root / spec["archive"]
            _fetch_all(key, [(CIFAR_URL + spec["archive"], spec["md5"], archive)], [root, root / key],
                       f"{spec['folder']}/ or {spec['archive']}", cfg)
        found = read_archive(archive)
    batches, where = found
    train = _cifar_arrays([batches[n] for n in spec["train"]], spec, where)
    test = _cifar_arrays([batches[n] for n in spec["test"]], spec, where)
    classes = [c.decode() if isinstance(c, bytes) else str(c) for c in batches[spec["meta"]].get(spec["names"], [])]
    if not classes:
        raise DataError(f"{where}: {spec['meta']} has no {spec['names'].decode()!r}")
    for split in (train, test):
        if split.labels.min() < 0 or split.labels.max() >= len(classes):
            raise DataError(f"{where}: labels outside 0..{len(classes) - 1}")
    info = DatasetInfo(key, len(classes), classes, 3, (32, 32), spec["mean"], spec["std"])
    return info, train, None, test


def cifar10(cfg: DataConfig):
    return _cifar("cifar10", cfg)


def cifar100(cfg: DataConfig):
    return _cifar("cifar100", cfg)


# -- MNIST and Fashion-MNIST ----------------------------------------------------------

IDX_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
MNIST = {
    "mnist": dict(
        url="https://ossci-datasets.s3.amazonaws.com/mnist/",
        md5=("f68b3c2dcbeaaa9fbdd348bbdeb94873", "d53e105ee54ea40749a09fcbcd1e9432",
             "9fb629c4189551a2d022fa330f9573f3", "ec29112dd5afa0611ce80d1b7f02629c"),
        classes=[str(i) for i in range(10)], mean=MNIST_MEAN, std=MNIST_STD,
        dirs=("mnist", "MNIST/raw"), system=()),
    "fashion-mnist": dict(
        url="http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
        md5=("8d4fb7e6c68d591d4c3dfef9ec88bf0d", "25c81989df183df01b3e8a0aad5dffbe",
             "bef4ecab320f06d8554ea6380940ec79", "bb300cfdad3c16e7a12a480ee83cd310"),
        classes=["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                 "Ankle boot"],
        mean=FASHION_MEAN, std=FASHION_STD,
        # Debian's dataset-fashion-mnist package installs the files here.
        dirs=("fashion-mnist", "FashionMNIST/raw"), system=(Path("/usr/share/datasets/fashion-mnist"),)),
}
# Where the system path is looked up; a module attribute so tests can point it elsewhere.
SYSTEM_DIRS = {k: v["system"] for k, v in MNIST.items()}


def read_idx(path: Path) -> np.ndarray:
    """Read an idx file (gzipped or raw): magic 0 0 <type> <ndim>, big-endian int32 dims, then data."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
    except (OSError, EOFError) as e:
        raise DataError(f"cannot read {path} ({e})") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise DataError(f"{path} is not an unsigned-byte idx file (bad magic number)")
    ndim = raw[3]
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">i4", count=ndim, offset=4))
    start = 4 + 4 * ndim
    if len(raw) - start != int(np.prod(dims)):
        raise DataError(f"{path} holds {len(raw) - start} bytes of data for dimensions {dims}")
    return np.frombuffer(raw, dtype=np.uint8, offset=start).reshape(dims)


def _find_idx(d: Path, base: str) -> Path | None:
    for name in (base + ".gz", base):
        if (d / name).is_file():
            return d / name
    return None


def _mnist_like(key: str, cfg: DataConfig):
    spec = MNIST[key]
    root = data_root(cfg)
    dirs = [root] + [root / s for s in spec["dirs"]] + list(SYSTEM_DIRS[key])
    found = None
    for d in dirs:
        paths = [_find_idx(d, b) for b in IDX_FILES]
        if all(paths):
            found = paths
            break
    if found is None:
        dest = root / spec["dirs"][0]
        _fetch_all(key, [(spec["url"] + b + ".gz", md5, dest / (b + ".gz")) for b, md5 in zip(IDX_FILES, spec["md5"])],
                   dirs, "the four idx files (train-images-idx3-ubyte[.gz], ...)", cfg)
        found = [dest / (b + ".gz") for b in IDX_FILES]
    xtr, ytr, xte, yte = (read_idx(p) for p in found)
    splits = []
    for x, y, p in ((xtr, ytr, found[0]), (xte, yte, found[2])):
        if x.ndim != 3 or y.ndim != 1 or len(x) != len(y):
            raise DataError(f"{p}: {x.shape} images do not match {y.shape} labels")
        if y.max() >= len(spec["classes"]):
            raise DataError(f"{p}: labels outside 0..{len(spec['classes']) - 1}")
        splits.append(TensorSplit(torch.from_numpy(x.copy()).unsqueeze(1), torch.from_numpy(y.astype(np.int64))))
    info = DatasetInfo(key, len(spec["classes"]), list(spec["classes"]), 1, tuple(xtr.shape[1:]), spec["mean"],
                       spec["std"])
    return info, splits[0], None, splits[1]


def mnist(cfg: DataConfig):
    return _mnist_like("mnist", cfg)


def fashion_mnist(cfg: DataConfig):
    return _mnist_like("fashion-mnist", cfg)


# -- Flowers102 -------------------------------------------------------------------------

FLOWERS_URL = "https://www.robots.ox.ac.uk/~vgg/data/flowers/102/"
# The official files number the classes 1..102 without names; these are the names in common
# use (the order of imagelabels.mat), so plots and predictions can say "sunflower", not "54".
FLOWERS102_CLASSES = [
    "pink primrose", "hard-leaved pocket orchid", "canterbury bells", "sweet pea", "english marigold", "tiger lily",
    "moon orchid", "bird of paradise", "monkshood", "globe thistle", "snapdragon", "colt's foot", "king protea",
    "spear thistle", "yellow iris", "globe-flower", "purple coneflower", "peruvian lily", "balloon flower",
    "giant white arum lily", "fire lily", "pincushion flower", "fritillary", "red ginger", "grape hyacinth",
    "corn poppy", "prince of wales feathers", "stemless gentian", "artichoke", "sweet william", "carnation",
    "garden phlox", "love in the mist", "mexican aster", "alpine sea holly", "ruby-lipped cattleya", "cape flower",
    "great masterwort", "siam tulip", "lenten rose", "barbeton daisy", "daffodil", "sword lily", "poinsettia",
    "bolero deep blue", "wallflower", "marigold", "buttercup", "oxeye daisy", "common dandelion", "petunia",
    "wild pansy", "primula", "sunflower", "pelargonium", "bishop of llandaff", "gaura", "geranium", "orange dahlia",
    "pink-yellow dahlia", "cautleya spicata", "japanese anemone", "black-eyed susan", "silverbush",
    "californian poppy", "osteospermum", "spring crocus", "bearded iris", "windflower", "tree poppy", "gazania",
    "azalea", "water lily", "rose", "thorn apple", "morning glory", "passion flower", "lotus", "toad lily",
    "anthurium", "frangipani", "clematis", "hibiscus", "columbine", "desert-rose", "tree mallow", "magnolia",
    "cyclamen", "watercress", "canna lily", "hippeastrum", "bee balm", "ball moss", "foxglove", "bougainvillea",
    "camellia", "mallow", "mexican petunia", "bromelia", "blanket flower", "trumpet creeper", "blackberry lily",
]
FLOWERS_FILES = {"102flowers.tgz": "52808999861908f626f3c1f4e79d11fa",
                 "imagelabels.mat": "e0620be6f572b9609742df49c70aed4d",
                 "setid.mat": "a5357ecc9cb78c4bef273ce3793fc85c"}


def _extract_jpgs(archive: Path, dest: Path) -> None:
    """Unpack 102flowers.tgz's jpg/ into dest/jpg via a temporary folder renamed at the end,
    so an interrupted extraction never looks like a complete dataset."""
    import shutil
    import tempfile

    tmp = Path(tempfile.mkdtemp(prefix=".jpg-", dir=dest))
    try:
        with tarfile.open(archive, "r:gz") as tar:
            for m in tar.getmembers():
                name = Path(m.name)
                # only plain files named jpg/<file>.jpg: no links, no paths outside the folder
                if m.isfile() and len(name.parts) == 2 and name.parts[0] == "jpg" and name.suffix == ".jpg":
                    with tar.extractfile(m) as src, open(tmp / name.name, "wb") as out:
                        shutil.copyfileobj(src, out)
        (tmp).rename(dest / "jpg")
    except (tarfile.TarError, OSError, EOFError) as e:
        raise DataError(f"cannot unpack {archive} ({e}); delete it to download again") from None
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def flowers102(cfg: DataConfig):
    from .matfile import loadmat

    root = data_root(cfg)
    dirs = [root / "flowers-102", root / "flowers102", root]
    what = "jpg/ with imagelabels.mat and setid.mat"
    d = next((d for d in dirs if (d / "jpg").is_dir() and (d / "imagelabels.mat").is_file()
              and (d / "setid.mat").is_file()), None)
    if d is None:
        d = next((d for d in dirs if (d / "102flowers.tgz").is_file()), dirs[0])
        need = [(FLOWERS_URL + n, md5, d / n) for n, md5 in FLOWERS_FILES.items()
                if not (d / n).is_file() and not (n == "102flowers.tgz" and (d / "jpg").is_dir())]
        if need:
            _fetch_all("flowers102", need, dirs, what, cfg)
        if not (d / "jpg").is_dir():
            _extract_jpgs(d / "102flowers.tgz", d)
    labels = loadmat(d / "imagelabels.mat").get("labels")
    setid = loadmat(d / "setid.mat")
    if labels is None or not all(k in setid for k in ("trnid", "valid", "tstid")):
        raise DataError(f"{d}: imagelabels.mat needs 'labels' and setid.mat 'trnid', 'valid', 'tstid'")
    labels = labels.reshape(-1).astype(np.int64) - 1  # 1-based class ids in the file
    K = int(labels.max()) + 1
    if labels.min() < 0:
        raise DataError(f"{d / 'imagelabels.mat'}: labels must be 1-based class numbers")

    def split(key):
        ids = setid[key].reshape(-1).astype(np.int64)  # 1-based image numbers
        if ids.min() < 1 or ids.max() > len(labels):
            raise DataError(f"{d / 'setid.mat'}: {key} refers to images outside 1..{len(labels)}")
        return FileSplit([str(d / "jpg" / f"image_{i:05d}.jpg") for i in ids], torch.from_numpy(labels[ids - 1]))

    size = cfg.img_size or 224
    names = FLOWERS102_CLASSES if K == len(FLOWERS102_CLASSES) else [f"flower {i + 1}" for i in range(K)]
    info = DatasetInfo("flowers102", K, list(names), 3, (size, size), IMAGENET_MEAN, IMAGENET_STD)
    return info, split("trnid"), split("valid"), split("tstid")


# -- image folders ------------------------------------------------------------------------

IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm", ".pbm"}
DEFAULT_TEST_FRACTION = 0.1


def image_files(d: Path, recursive: bool = True) -> list[str]:
    """The image files (by extension, IMAGE_EXTS) in folder d, or under it when recursive; sorted."""
    return [str(p) for p in sorted(d.rglob("*") if recursive else d.iterdir())
            if p.suffix.lower() in IMAGE_EXTS and p.is_file()]


def _scan(d: Path, classes: list[str] | None = None):
    """Images in d/<class>/... -> (classes, paths, labels). `classes` fixes the class list."""
    found = sorted(p.name for p in d.iterdir() if p.is_dir() and not p.name.startswith("."))
    if classes is None:
        classes = found
    else:
        extra = sorted(set(found) - set(classes))
        if extra:
            raise DataError(f"{d} has class folders not in the training set: {', '.join(extra[:5])}")
    paths, labels = [], []
    for k, c in enumerate(classes):
        if not (d / c).is_dir():
            continue
        found = image_files(d / c)
        paths += found
        labels += [k] * len(found)
    return classes, paths, labels


def _holdout(paths: list[str], labels: list[int], fraction: float, seed: int):
    """Seeded per-class split: `fraction` of each class (at least one image of classes with
    two or more) goes to the held-out part, so small classes stay represented on both sides."""
    lab = torch.tensor(labels, dtype=torch.long)
    g = torch.Generator().manual_seed(seed)
    held = torch.zeros(len(labels), dtype=torch.bool)
    for k in lab.unique().tolist():
        idx = (lab == k).nonzero().squeeze(1)
        idx = idx[torch.randperm(len(idx), generator=g)]
        n = round(len(idx) * fraction) if len(idx) > 1 else 0
        held[idx[:max(n, 1 if len(idx) > 1 else 0)]] = True
    keep = FileSplit([p for p, h in zip(paths, held.tolist()) if not h], lab[~held])
    out = FileSplit([p for p, h in zip(paths, held.tolist()) if h], lab[held])
    return keep, out


def imagefolder(cfg: DataConfig):
    path = Path(cfg.name.split(":", 1)[1]).expanduser()
    if not path.is_dir():
        raise DataError(f"image folder {path} does not exist; give imagefolder:PATH with one subfolder per class")
    base = path / "train" if (path / "train").is_dir() else path
    classes, paths, labels = _scan(base)
    if base == path:  # a flat folder: 'val' / 'test' would be taken for classes
        classes_ = [c for c in classes if c not in ("val", "test")]
        if classes_ != classes:
            raise DataError(f"{path} has val/ or test/ but no train/; put the training classes under {path / 'train'}")
    if not classes or not paths:
        raise DataError(f"no images found in {base}; expected {base}/<class>/<image>.jpg (or .png, ...)")
    present = set(labels)
    empty = [c for k, c in enumerate(classes) if k not in present]
    if empty:  # a class the model would learn never to predict, and one more output than the data has
        raise DataError(f"class folder{'s' if len(empty) > 1 else ''} {', '.join(str(base / c) for c in empty[:3])}"
                        f"{' ...' if len(empty) > 3 else ''} {'have' if len(empty) > 1 else 'has'} no images; "
                        f"add some or remove the folder")
    train = FileSplit(paths, labels)
    val = test = None
    if (path / "val").is_dir() and base != path:
        val = FileSplit(*_scan(path / "val", classes)[1:])
    if (path / "test").is_dir() and base != path:
        test = FileSplit(*_scan(path / "test", classes)[1:])
    note = ""
    if test is None:
        train, test = _holdout(train.paths, train.labels.tolist(), DEFAULT_TEST_FRACTION, seed=12345)
        note = (f"{path} has no test/ folder: {len(test)} of its images ({DEFAULT_TEST_FRACTION:.0%}, the same "
                f"ones every run) are held out as the test split")
    size = cfg.img_size or 224
    info = DatasetInfo(path.name or "imagefolder", len(classes), classes, 3, (size, size), IMAGENET_MEAN,
                       IMAGENET_STD, note)
    return info, train, val, test
