"""Typed configuration: nested dataclasses, YAML presets, dotted overrides.

A run is fully described by one `TrainConfig`. Presets in `configs/*.yaml`
set some fields; the command line overrides any field by its dotted name
(`--optim.lr 3e-4`) or by one of the short aliases the seed project used
(`--mixup-alpha 0.2`). A misspelt key is an error that names the closest
valid key. The resolved config is written beside every run and inside every
checkpoint, so a result can always be traced to its settings.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .errors import UserError


class ConfigError(UserError):
    """A bad key or value in a config file or on the command line."""


@dataclass
class ModelConfig:
    name: str = "vit_tiny_patch4_32"
    num_classes: int | None = None  # default: the dataset's class count
    img_size: int | None = None  # default: the dataset's image size if the patch size divides it
    drop_rate: float = 0.0
    attn_drop_rate: float = 0.0
    drop_path_rate: float = 0.1
    pos_embed_init: str | None = None  # trunc_normal | sincos (ViTs; default: the preset's, trunc_normal)
    pretrained: str | None = None  # HF dir / hub id, timm/npz/torchvision file, or a vitlab run
    freeze: str = "none"  # none | backbone (train the head(s) only: a linear probe)
    grad_checkpointing: bool = False


@dataclass
class DataConfig:
    name: str = "shapes"  # shapes, cifar10, cifar100, mnist, fashion-mnist, flowers102, imagefolder:PATH
    dir: str | None = None  # data root; default $VITLAB_DATA, then ~/.cache/vitlab
    img_size: int | None = None  # decode/resize size for the large-image path
    val_fraction: float = 0.0  # hold out this share of train for validation (0: use the val/test split)
    subset: int | None = None  # use only this many training images (quick experiments)
    num_workers: int | None = None  # decoding processes for image files; None: 2 on a CPU, up to 8 with a GPU
    on_corrupt: str = "skip"  # skip | fail: what an unreadable image does
    download: bool = True


@dataclass
class AugConfig:
    crop_padding: int = 4  # random crop after padding by this many pixels (0: off)
    pad_mode: str = "reflect"  # reflect | zeros
    random_resized_crop: bool = False
    rrc_scale_min: float = 0.08
    hflip: float = 0.5  # probability
    color_jitter: float = 0.0  # brightness/contrast/saturation strength
    randaugment_n: int = 0  # RandAugment ops per image (0: off)
    randaugment_m: int = 9  # RandAugment magnitude, 0..30
    autoaugment: bool = False  # the seed's --autoaugment: RandAugment n=2, m=9
    trivialaugment: bool = False
    erasing: float = 0.0  # random-erasing probability
    mixup_alpha: float = 0.2
    cutmix_alpha: float = 0.0
    mix_prob: float = 1.0  # probability a batch is mixed at all
    switch_prob: float = 0.5  # when both are on: each image's chance of CutMix instead of Mixup
    repeated_aug: int = 1  # DeiT's repeated augmentation: k copies of each drawn image; epoch length unchanged
    # Fractions of the schedule, at its start and its end, trained on clean images (flips only): weak
    # augmentation early fits faster (EfficientNetV2's progressive learning), none at the end is YOLOX's.
    clean_head: float = 0.0
    clean_tail: float = 0.0


@dataclass
class OptimConfig:
    name: str = "adamw"  # adamw | sgd | muon (Muon for the blocks' weight matrices, AdamW for the rest)
    lr: float = 3e-4  # at batch 128; scaled linearly with the batch size (see scale_lr)
    scale_lr: bool = True
    weight_decay: float = 0.05
    momentum: float = 0.9
    nesterov: bool = True
    beta1: float = 0.9
    beta2: float = 0.999
    muon_momentum: float = 0.95  # optim.name muon: the matrices' momentum (Nesterov)
    clip_grad: float | None = 1.0
    accum_steps: int = 1
    label_smoothing: float = 0.1
    layer_decay: float = 1.0  # < 1: layer-wise lr decay for fine-tuning (head full rate, embeddings least)


@dataclass
class ScheduleConfig:
    name: str = "cosine"  # cosine | constant
    warmup_epochs: float = 5.0
    warmup_lr: float = 1e-6
    min_lr: float = 1e-6
    by_time: bool = False  # with run.time_limit: schedule progress = elapsed / limit (fits any machine's speed)


@dataclass
class DistillConfig:
    teacher: str | None = None  # a vitlab run dir / checkpoint, or a Hugging Face classifier dir
    kind: str = "none"  # none | soft | hard
    alpha: float = 0.5  # weight of the distillation term
    tau: float = 1.0  # temperature for soft distillation


@dataclass
class RunConfig:
    epochs: int = 100
    batch_size: int = 128
    seed: int = 0
    out: str = "runs"  # runs are written to OUT/NAME
    name: str | None = None  # default: model-data-timestamp
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    precision: str = "auto"  # auto (bf16 where fast) | bf16 | fp16 | fp32
    compile: bool | None = None  # torch.compile the training step; none = auto: on for runs of 2,000+ steps
    threads: int | None = None  # CPU threads; default: all cores
    ema: bool = False
    ema_decay: float = 0.999  # the ceiling: early updates use min(this, (1+n)/(10+n)) at step n
    eval_every: int = 1
    tta: bool = False  # also score each evaluation with flip test-time augmentation (<split>_acc_tta)
    log_every: int = 20  # steps between progress-bar refreshes (each costs a sync)
    time_limit: float | None = None  # minutes: stop (after evaluating) once this much time has passed
    stop_after: int | None = None  # stop after this many epochs without changing the schedule (resume tests, pausing)
    debug: bool = False  # tiny, fast run: few images, small eval
    tensorboard: bool = False


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    aug: AugConfig = field(default_factory=AugConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    sched: ScheduleConfig = field(default_factory=ScheduleConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    run: RunConfig = field(default_factory=RunConfig)


# Short flags shared by every command, and the seed project's spellings.
ALIASES: dict[str, str] = {
    "model": "model.name",
    "data": "data.name",
    "data-dir": "data.dir",
    "epochs": "run.epochs",
    "batch-size": "run.batch_size",
    "seed": "run.seed",
    "out": "run.out",
    "debug": "run.debug",
    "lr": "optim.lr",
    "mixup-alpha": "aug.mixup_alpha",
    "cutmix-alpha": "aug.cutmix_alpha",
    "label-smoothing": "optim.label_smoothing",
    "drop-path": "model.drop_path_rate",
    "dropout": "model.drop_rate",
    "autoaugment": "aug.autoaugment",
    "randaugment": "aug.randaugment_n",
    "weight-decay": "optim.weight_decay",
    "warmup-epochs": "sched.warmup_epochs",
    "precision": "run.precision",
    "compile": "run.compile",
    "ema": "run.ema",
    "pretrained": "model.pretrained",
    "time-limit": "run.time_limit",
}


# -- dict <-> dataclass -------------------------------------------------------

def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def _field_types(cls) -> dict[str, typing.Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _strip_optional(tp):
    """`int | None` -> (int, True); `int` -> (int, False)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def _coerce(value, tp, key: str):
    """Check/convert one value to the field's type; strings come from the CLI."""
    base, optional = _strip_optional(tp)
    # an optional switch's None is "decide for me": `--compile auto` says so as eval's --compile does
    unset = ("none", "null", "auto") if base is bool else ("none", "null")
    if value is None or (isinstance(value, str) and value.lower() in unset and optional):
        if optional:
            return None
        raise ConfigError(f"{key} cannot be empty (expected {base.__name__})")
    try:
        if base is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("1", "true", "yes", "on"):
                return True
            if isinstance(value, str) and value.lower() in ("0", "false", "no", "off"):
                return False
            if isinstance(value, int) and value in (0, 1):
                return bool(value)
            raise ValueError
        if base is int:
            if isinstance(value, bool):
                raise ValueError
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(float(value)) if isinstance(value, str) and "e" in value.lower() else int(value)
        if base is float:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if base is str:
            if not isinstance(value, (str, int, float)) or isinstance(value, bool):
                raise ValueError
            return str(value)
    except (TypeError, ValueError):
        unset_word = (" or auto" if base is bool else " or none") if optional else ""
        raise ConfigError(f"{key} expects {base.__name__}{unset_word}, got {value!r}") from None
    return value


def _closest(key: str, valid: typing.Iterable[str]) -> str:
    valid = list(valid)
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    if not close:  # try matching the last part alone: "lr" -> "optim.lr"
        tail = key.split(".")[-1]
        close = [v for v in valid if v.split(".")[-1] == tail] or difflib.get_close_matches(
            tail, [v.split(".")[-1] for v in valid], n=1, cutoff=0.6)
        if close and "." not in close[0]:
            close = [v for v in valid if v.endswith("." + close[0])]
    return f"; did you mean {close[0]!r}?" if close else ""


def all_keys(cfg_or_cls=TrainConfig) -> list[str]:
    cls = cfg_or_cls if isinstance(cfg_or_cls, type) else type(cfg_or_cls)
    keys = []
    for name, tp in _field_types(cls).items():
        if dataclasses.is_dataclass(tp):
            keys += [f"{name}.{k}" for k in all_keys(tp)]
        else:
            keys.append(name)
    return keys


def key_table(cfg=None) -> str:
    """Every config key with its type and default (cfg's values: a preset's), one per line (--list-keys)."""
    cfg = cfg if cfg is not None else TrainConfig()
    rows = []
    for key in all_keys(cfg):
        tp = _key_type(cfg, key)
        name = getattr(tp, "__name__", None) if not typing.get_args(tp) else None
        rows.append((key, name or str(tp).replace("typing.", ""), repr(get_key(cfg, key))))
    w0, w1 = (max(len(r[i]) for r in rows) for i in (0, 1))
    return "\n".join(f"{k:{w0}s}  {t:{w1}s}  {d}" for k, t, d in rows)


def get_key(cfg, key: str):
    """The value of a dotted key (one set_key accepts) on a nested config."""
    obj = cfg
    for part in key.split("."):
        obj = getattr(obj, part)
    return obj


def _key_type(cfg, key: str):
    obj, parts = cfg, key.split(".")
    for part in parts[:-1]:
        obj = getattr(obj, part)
    return _field_types(type(obj))[parts[-1]]


# What a resumed run cannot change: the keys that decide the shapes of the state it saved (the
# weights, the optimizer's state), the optimizer settings that state carries (loading it puts the
# saved ones back, so a new value would be ignored), and which images it trains on. The rest may
# change (--epochs, the lr and its schedule, the time limit, threads, workers, the data's folder).
# Value: a hint after "start a new run".
_FROM_RUN = " (or fine-tune this one on it: vitlab finetune --pretrained RUN_DIR)"
FIXED_ON_RESUME = {
    "model.name": "", "model.num_classes": _FROM_RUN, "model.img_size": _FROM_RUN, "model.freeze": "",
    "data.name": _FROM_RUN, "data.img_size": _FROM_RUN, "data.subset": "", "data.val_fraction": "",
    "run.debug": "", "optim.name": "", "optim.layer_decay": "", "optim.weight_decay": "", "optim.beta1": "",
    "optim.beta2": "", "optim.momentum": "", "optim.nesterov": "", "optim.muon_momentum": "",
}


def _same_data(a: str, b: str) -> bool:
    """imagefolder:PATH names the same data wherever the folder now lives (moved, or typed relative to
    another working directory): its classes are checked against the weights when the state loads."""
    return a == b or (a.startswith("imagefolder:") and b.startswith("imagefolder:"))


def check_resume_config(saved, cfg, run) -> None:
    """A UserError (one line) if `cfg` changes a FIXED_ON_RESUME key of the run's `saved` config."""
    for key, hint in FIXED_ON_RESUME.items():
        before, now = get_key(saved, key), get_key(cfg, key)
        if before == now or (key == "data.name" and _same_data(before, now)):
            continue
        had = "left it unset, for its data and preset to decide" if before is None else f"has {before!r}"
        raise ConfigError(f"--resume {run}: {key} cannot change on a resume (the run {had}; asked for "
                          f"{now!r}); start a new run{hint}")


DEBUG_EPOCHS = 2  # --debug's epochs unless --epochs is given (build_config)


def apply_debug(cfg) -> None:
    """The seed's --debug: a tiny, fast run through every code path (at most 512 training images;
    build_config caps the epochs at DEBUG_EPOCHS when the flag is given without --epochs). Applied by
    the engine before the config is saved, so a debug run's config.yaml holds the cap."""
    if cfg.run.debug:
        cfg.data.subset = 512 if cfg.data.subset is None else min(cfg.data.subset, 512)  # (0 stays refused)


def set_key(cfg, key: str, value) -> None:
    """Set a dotted key on a nested config, converting the value to the field's type."""
    parts = key.split(".")
    obj = cfg
    for i, part in enumerate(parts):
        types_ = _field_types(type(obj))
        if part not in types_:
            raise ConfigError(f"unknown config key {key!r}{_closest(key, all_keys(cfg))}")
        if i == len(parts) - 1:
            if dataclasses.is_dataclass(types_[part]):
                raise ConfigError(f"{key!r} is a section; set one of its fields, e.g. {key}.{all_keys(types_[part])[0]}")
            setattr(obj, part, _coerce(value, types_[part], key))
        else:
            if not dataclasses.is_dataclass(types_[part]):
                raise ConfigError(f"unknown config key {key!r}{_closest(key, all_keys(cfg))}")
            obj = getattr(obj, part)


def update_from_dict(cfg, data: dict, prefix: str = "") -> None:
    """Apply a (nested) dict, e.g. a YAML preset, onto a config."""
    if not isinstance(data, dict):
        raise ConfigError(f"expected a mapping at {prefix or 'top level'}, got {type(data).__name__}")
    for k, v in data.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            update_from_dict(cfg, v, key + ".")
        else:
            set_key(cfg, key, v)


def from_dict(data: dict) -> TrainConfig:
    cfg = TrainConfig()
    update_from_dict(cfg, data)
    return cfg


# -- files --------------------------------------------------------------------

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"


def find_preset(name_or_path: str) -> Path:
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml") and p.is_file():
        return p
    for d in (CONFIG_DIR, Path.cwd() / "configs"):
        cand = d / f"{name_or_path}.yaml"
        if cand.is_file():
            return cand
    names = sorted({q.stem for d in (CONFIG_DIR, Path.cwd() / "configs") if d.is_dir() for q in d.glob("*.yaml")})
    close = difflib.get_close_matches(name_or_path, names, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else (f"; presets: {', '.join(names)}" if names else "")
    raise ConfigError(f"no config preset or file {name_or_path!r}{hint}")


def load_yaml(path: str | Path) -> dict:
    try:
        with open(path) as f:
            data = yaml.safe_load(f) or {}
    except OSError as e:
        raise ConfigError(f"cannot read config {path}: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"config {path} is not valid YAML: {str(e).splitlines()[0]}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"config {path} is not a text (UTF-8) file") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config {path} must be a mapping of sections")
    return data


def save_yaml(cfg, path: str | Path) -> None:
    from .utils import atomic_write_text

    atomic_write_text(path, yaml.safe_dump(to_dict(cfg), sort_keys=False))


# -- command line ---------------------------------------------------------------

def parse_overrides(args: list[str], cfg=None, aliases: dict[str, str] = ALIASES) -> dict[str, object]:
    """Turn `--optim.lr 3e-4 --debug --mixup-alpha=0.2` into {dotted_key: value}.

    A flag with no value (or followed by another flag) means True for a
    boolean field. Keys are checked against the config so typos fail early.
    """
    cfg = cfg if cfg is not None else TrainConfig()
    valid = set(all_keys(cfg))
    out: dict[str, object] = {}
    i = 0
    while i < len(args):
        tok = args[i]
        if not tok.startswith("--"):
            raise ConfigError(f"unexpected argument {tok!r}; options look like --section.key VALUE")
        body = tok[2:]
        value: object
        if "=" in body:
            body, value = body.split("=", 1)
            i += 1
        elif i + 1 < len(args) and not (args[i + 1].startswith("--") and not _is_number(args[i + 1])):
            value = args[i + 1]
            i += 2
        else:
            value = True
            i += 1
        key = aliases.get(body, body.replace("-", "_") if "." not in body else body)
        if "." in body:
            section, _, leaf = body.partition(".")
            key = f"{section}.{leaf.replace('-', '_')}"
        if key not in valid:
            raise ConfigError(f"unknown option --{body}{_closest(key, sorted(valid) + ['--' + a for a in aliases])}")
        if value is True and _strip_optional(_key_type(cfg, key))[0] is not bool:
            # a bare flag switches a boolean on; any other field needs its value
            raise ConfigError(f"--{body} needs a value (--{body} VALUE)")
        out[key] = value
    return out


def _is_number(s: str) -> bool:
    try:
        float(s)
        return True
    except ValueError:
        return False


def build_config(preset: str | None, overrides: dict[str, object]) -> TrainConfig:
    cfg = TrainConfig()
    if preset:
        update_from_dict(cfg, load_yaml(find_preset(preset)))
    for k, v in overrides.items():
        set_key(cfg, k, v)
    if overrides.get("run.debug") and "run.epochs" not in overrides:  # (a config file states its own epochs)
        cfg.run.epochs = min(cfg.run.epochs, DEBUG_EPOCHS)  # the preset's 100 epochs are not a quick check
    check_values(cfg)
    return cfg


# -- value ranges ---------------------------------------------------------------

def _within(lo, hi, *, lo_open=False, hi_open=False, none_ok=False):
    """A test for numbers in [lo, hi] (an end open where asked); NaN and infinities fail it."""
    def test(v):
        if v is None:
            return none_ok
        if not math.isfinite(v):
            return False
        return (v > lo if lo_open else v >= lo) and (hi is None or (v < hi if hi_open else v <= hi))
    ends = f"{'(' if lo_open else '['}{lo}, {'inf' if hi is None else hi}{')' if hi_open or hi is None else ']'}"
    return test, (f"a number in {ends}" if hi is not None or lo_open else f"a number >= {lo}") + (
        " or none" if none_ok else "")


def _one_of(*choices):
    return (lambda v: v in choices), "one of " + ", ".join(str(c) for c in choices)


_PROBABILITY = _within(0, 1)
_RATE = _within(0, 1, hi_open=True)  # dropout-like rates: 1 would drop everything
_COUNT = _within(1, None)
_NONNEG = _within(0, None)

# Each numeric or named field's allowed values, checked once the preset and the overrides are
# merged: a bad value stops the command in one line before a run directory exists, instead of a
# traceback from torch mid-run (a negative lr) or a run that silently does something else (0 epochs).
# Fields checked where they are used (names of models, datasets, devices, precisions, optimizers,
# augmentation strengths with their own messages) are not repeated here.
VALUE_RULES: dict[str, tuple] = {
    "model.num_classes": _within(1, None, none_ok=True),
    "model.img_size": _within(1, None, none_ok=True),
    "model.drop_rate": _RATE,
    "model.attn_drop_rate": _RATE,
    "model.drop_path_rate": _RATE,
    "model.pos_embed_init": _one_of(None, "trunc_normal", "sincos"),
    "data.img_size": _within(1, None, none_ok=True),
    "data.on_corrupt": _one_of("skip", "fail"),
    "aug.crop_padding": _NONNEG,
    "aug.pad_mode": _one_of("reflect", "zeros"),
    "aug.rrc_scale_min": _within(0, 1, lo_open=True),
    "aug.hflip": _PROBABILITY,
    "aug.color_jitter": _NONNEG,
    "aug.randaugment_n": _NONNEG,
    "aug.erasing": _PROBABILITY,
    "aug.mixup_alpha": _NONNEG,
    "aug.cutmix_alpha": _NONNEG,
    "aug.mix_prob": _PROBABILITY,
    "aug.switch_prob": _PROBABILITY,
    "aug.repeated_aug": _COUNT,
    "aug.clean_head": _PROBABILITY,
    "aug.clean_tail": _PROBABILITY,
    "optim.lr": _within(0, None, lo_open=True),
    "optim.weight_decay": _NONNEG,
    "optim.momentum": _RATE,
    "optim.beta1": _RATE,
    "optim.name": _one_of("adamw", "sgd", "muon"),
    "optim.beta2": _RATE,
    "optim.muon_momentum": _RATE,
    "optim.clip_grad": _within(0, None, none_ok=True),  # 0 or none: no clipping
    "optim.accum_steps": _COUNT,
    "optim.label_smoothing": _RATE,
    "sched.name": _one_of("cosine", "constant"),
    "sched.warmup_epochs": _NONNEG,
    "sched.warmup_lr": _NONNEG,
    "sched.min_lr": _NONNEG,
    "distill.kind": _one_of("none", "soft", "hard"),
    "distill.alpha": _PROBABILITY,
    "distill.tau": _within(0, None, lo_open=True),
    "run.epochs": _COUNT,
    "run.batch_size": _COUNT,
    "run.threads": _within(1, None, none_ok=True),
    "run.ema_decay": _RATE,
    "run.eval_every": _COUNT,
    "run.log_every": _COUNT,
    "run.time_limit": _within(0, None, lo_open=True, none_ok=True),
    "run.stop_after": _within(1, None, none_ok=True),
}


def check_values(cfg: TrainConfig) -> None:
    """Every field in VALUE_RULES within its range; the first that is not is one ConfigError line."""
    for key, (test, want) in VALUE_RULES.items():
        section, leaf = key.split(".")
        value = getattr(getattr(cfg, section), leaf)
        if not test(value):
            raise ConfigError(f"--{key} must be {want}, got {value!r}")
    if cfg.distill.teacher and cfg.distill.kind == "none":
        raise ConfigError("--distill.teacher is set but --distill.kind is none: add --distill.kind soft (or hard)")
