"""`vitlab eval`: top-1/top-5, per-class accuracy and a confusion-matrix picture for a run."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from ..config import DataConfig, update_from_dict
from ..errors import UserError
from ..utils import atomic_write, atomic_write_text, file_part, make_dir
from .checkpoint import load_model, resolve_weights


def add_arguments(p):
    p.add_argument("--checkpoint", required=True, metavar="RUN_DIR_OR_FILE",
                   help="a run folder (its best weights, model.safetensors) or a .safetensors file")
    p.add_argument("--data", help="dataset name (default: the one the run trained on)")
    p.add_argument("--data-dir", help="data root (default: the run's)")
    p.add_argument("--split", choices=["test", "val", "train"], default="test",
                   help="which split to score (default: test); other than the run's test split, the files "
                        "are named by it: eval-train.json, eval-mnist-test.json, ...")
    p.add_argument("--batch-size", type=int, default=256, help="images scored at a time (default: 256)")
    p.add_argument("--out", metavar="DIR", help="where to write eval.json and confusion_matrix.png (default: the "
                                                "checkpoint's folder)")
    p.add_argument("--device", default="auto", help="auto (a GPU if there is one) | cpu | cuda | cuda:N")
    p.add_argument("--precision", default="auto", help="auto (bf16 where it is fast) | bf16 | fp16 | fp32")
    p.add_argument("--data.num_workers", dest="num_workers", type=int, metavar="N",
                   help="image-decoding worker processes (default: the run's setting, else 2 on a CPU and "
                        "more with a GPU)")
    p.add_argument("--compile", choices=["auto", "true", "false"], default="auto",
                   help="score with a frozen, compiled copy of the model, with bf16 weights when scoring in "
                        "bf16 (vitlab.train.inference: faster after several seconds of compiling; README: Throughput); "
                        "auto: a ViT scored in bf16 on a CPU (--precision auto picks bf16 where it is fast) "
                        "in a long job (40 TFLOP of forward passes or more)")
    p.add_argument("--tta", choices=["none", "flip", "flip-shift"], default="none",
                   help="test-time augmentation: flip averages each image's logits with its mirror image's; "
                        "flip-shift also averages both moved 1 px each way (10 views, 10x the cost); written "
                        "to its own eval-flip.json / eval-flip-shift.json")


def data_config_for(meta: dict, name: str | None, data_dir: str | None, num_workers: int | None = None,
                    split: str = "test") -> DataConfig:
    cfg = DataConfig()
    update_from_dict(cfg, (meta.get("config") or {}).get("data", {}), "")
    if split != "train" or (name and not same_data(name, cfg.name)):
        # data.subset thins the training split only: the run's train split is the images it trained on
        # (the same seeded pick), any other split or dataset is scored whole
        cfg.subset = None
    if name and name != cfg.name:
        # a folder named after the run's dataset holds that dataset's files (MNIST's and Fashion-MNIST's
        # share names): not the place to look for another; a root of several datasets still is
        if cfg.dir and Path(cfg.dir).name == cfg.name:
            cfg.dir = None
        cfg.name = name
    if data_dir:
        cfg.dir = data_dir
    if num_workers is not None:
        cfg.num_workers = num_workers
    return cfg


def score(model, meta: dict, data_cfg: DataConfig, split: str = "test", *, device: str = "auto",
          precision: str = "auto", tta: str = "none", batch_size: int = 256, compile: bool | None = None,
          log=None):
    """Score a loaded model on a split, normalised as in its training (the checkpoint's mean/std).

    The one scoring path of `vitlab eval` and the benchmarks. compile: True / False, or None (auto)
    for vitlab.train.inference's frozen path on a long CPU job; log, if given, gets a line saying
    which path ran. -> (evaluate()'s result, the data's info, the class names).
    """
    from ..data import build_data, build_eval_transform, make_loader
    from .engine import check_tta, evaluate, resolve_device, resolve_precision, resolve_workers, tta_views
    from ..models import VisionTransformer
    from .inference import FrozenInference, forward_flops, resolve_inference_compile

    dev = resolve_device(device, flag="--device")
    amp_dtype, _ = resolve_precision(precision, dev)
    data = build_data(data_cfg)
    part = getattr(data, split)
    if part is None:
        raise UserError(f"{data.info.name} has no {split} split")
    if log and data.info.note:  # e.g. an image folder without test/: which of its images are scored
        log(f"note: {data.info.note}")
    if log and split == "train" and data_cfg.subset is not None and len(part.labels) == data_cfg.subset:
        log(f"note: the run trained on {data_cfg.subset:,} of this split's images (data.subset): those are scored")
    classes = meta.get("classes") or data.info.classes
    if data.info.num_classes != model.num_classes:  # labels past the head's width, or a head never asked
        raise UserError(f"the model has {model.num_classes} classes but {data.info.name} has {data.info.num_classes}")
    if data.info.in_chans != model.in_chans:
        raise UserError(f"the model takes {model.in_chans}-channel images but {data.info.name} has "
                        f"{data.info.in_chans}-channel ones")
    if log and meta.get("classes") and list(meta["classes"]) != list(data.info.classes):
        log(f"note: {data.info.name}'s class names are not the model's; label i is scored as the "
            f"model's class i ({classes[0]!r} for the data's {data.info.classes[0]!r}, ...)")
    img_size = tuple(model.img_size)
    loader = make_loader(part, batch_size, train=False, seed=0, device=dev, img_size=img_size,
                         num_workers=resolve_workers(data_cfg.num_workers, dev), on_corrupt=data_cfg.on_corrupt)
    info = data.info
    if meta.get("mean"):  # normalise exactly as in training
        info.mean, info.std = tuple(meta["mean"]), tuple(meta["std"])
    check_tta(tta)
    model = model.to(dev).eval()
    separate = getattr(model, "distilled", False)
    views = len(tta_views(torch.zeros(1, 1, 4, 4), tta))
    if separate:  # evaluate() asks for the two heads apart (model(x, separate=True)), which the frozen copy does not give
        compile, note = False, "eager (a distilled model's two heads are scored separately; --compile is for one head)"
    else:
        x1 = torch.zeros(1, model.in_chans, *img_size, device=dev)
        tflop = len(part.labels) * views * forward_flops(model, x1) / 1e12 if compile is None else 0.0
        compile, note = resolve_inference_compile(compile, tflop, dev, amp_dtype,
                                                  is_vit=isinstance(model, VisionTransformer))
    scorer = model
    if compile and dev.type == "cpu":
        # the frozen copy holds its weights in the precision asked for and runs without autocast
        scorer, amp_dtype = FrozenInference(model, amp_dtype), None
    elif compile:  # a GPU: compiled (not frozen), under the usual autocast
        scorer = FrozenInference(model, None, freeze=False)
    if log:
        log(f"scoring {len(part.labels):,} images x {views} view(s): {note}")
    try:
        res = evaluate(scorer, loader, build_eval_transform(info, img_size), dev, amp_dtype,
                       model.num_classes, separate_heads=separate, tta=tta)
    finally:
        loader.close()  # one pass: its decoding workers are done
    if getattr(scorer, "note", None):
        note += f"; {scorer.note}"
        if log:
            log(f"note: {scorer.note}")
    res["scoring"] = note  # kept in eval.json: which path produced these numbers
    return res, info, classes


def run(args) -> int:
    weights = resolve_weights(args.checkpoint)
    model, meta = load_model(weights)
    out = make_dir(Path(args.out) if args.out else weights.parent)  # before scoring: a bad --out fails at once
    data_cfg = data_config_for(meta, args.data, args.data_dir, args.num_workers, args.split)
    run_data = ((meta.get("config") or {}).get("data") or {}).get("name") or meta.get("data")
    res, info, classes = score(model, meta, data_cfg, args.split,
                               device=args.device, precision=args.precision, tta=args.tta,
                               batch_size=args.batch_size, compile={"auto": None, "true": True, "false": False}[args.compile],
                               log=lambda m: print(m, file=sys.stderr))
    conf = res.pop("confusion").double()
    per_class = (conf.diag() / conf.sum(1).clamp(min=1) * 100).tolist()
    res["tta"] = args.tta
    tta = f" ({args.tta} TTA)" if args.tta != "none" else ""
    top5 = f"top-5 {res['top5']:.2f}%  " if len(classes) > 5 else ""  # 100% by definition with 5 classes or fewer
    print(f"{args.split}{tta}: top-1 {res['acc']:.2f}%  {top5}loss {res['loss']:.4f}  ({res['n']} images)")
    for k in ("acc_cls_head", "acc_dist_head"):
        if k in res:
            plain = " (plain view)" if args.tta != "none" else ""
            print(f"  {k.replace('acc_', '').replace('_', ' ')}{plain}: {res[k]:.2f}%")
    width = max(len(c) for c in classes)
    for c, a, n in zip(classes, per_class, conf.sum(1).long().tolist()):
        print(f"  {c:{width}s}  {a:6.2f}%  (n={n})")
    # the run's own test split keeps the plain names; another split, dataset or TTA gets its own files,
    # so scoring the train split does not overwrite the test score
    parts = [] if same_data(data_cfg.name, run_data) else [safe_name(data_cfg.name)]
    if parts or args.split != "test":
        parts.append(args.split)
    if args.tta != "none":  # and a TTA score sits beside the plain one (eval-flip.json)
        parts.append(args.tta)
    tag = "".join(f"-{part}" for part in parts)
    record = {**res, "split": args.split, "data": data_cfg.name, "checkpoint": str(weights),
              "per_class": dict(zip(classes, per_class))}
    atomic_write_text(out / f"eval{tag}.json", json.dumps(record, indent=1))
    plot_confusion(conf, classes, out / f"confusion_matrix{tag}.png",
                   f"{info.name} {args.split}: top-1 {res['acc']:.2f}%{tta}")
    print(f"wrote {out / f'eval{tag}.json'} and {out / f'confusion_matrix{tag}.png'}")
    return 0


def same_data(a: str | None, b: str | None) -> bool:
    """Two dataset names for the same data: equal, or image folders at the same resolved place."""
    if a == b:
        return True
    if a and b and a.startswith("imagefolder:") and b.startswith("imagefolder:"):
        return Path(a.split(":", 1)[1]).expanduser().resolve() == Path(b.split(":", 1)[1]).expanduser().resolve()
    return False


def safe_name(name: str) -> str:
    """A dataset name as part of a file name: imagefolder:/a/b -> imagefolder-b."""
    if name.startswith("imagefolder:"):
        name = "imagefolder-" + (Path(name.split(":", 1)[1]).name or "root")
    return file_part(name)


def plot_confusion(conf: torch.Tensor, classes: list[str], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k = len(classes)
    norm = (conf / conf.sum(1, keepdim=True).clamp(min=1)).numpy()  # rows: true class, normalised
    size = min(4 + 0.45 * k, 24)
    fig, ax = plt.subplots(figsize=(size, size * 0.9))
    im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    if k <= 30:
        ax.set_xticks(range(k), classes, rotation=60, ha="right", fontsize=8)
        ax.set_yticks(range(k), classes, fontsize=8)
        for i in range(k):
            for j in range(k):
                if conf[i, j] > 0:
                    ax.text(j, i, int(conf[i, j]), ha="center", va="center", fontsize=6,
                            color="white" if norm[i, j] > 0.5 else "black")
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    fig.colorbar(im, ax=ax, fraction=0.046, label="share of the true class")
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)
