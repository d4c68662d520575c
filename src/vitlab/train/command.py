"""`vitlab train`: a preset (optional) + dotted overrides -> a run directory."""

from __future__ import annotations

import os
from pathlib import Path

from ..config import (build_config, check_resume_config, check_values, from_dict, key_table, load_yaml,
                      parse_overrides, set_key)
from ..errors import UserError

ACCEPTS_OVERRIDES = True

EPILOG = """\
Any config field can be set by its dotted name, e.g. --optim.lr 1e-3 --aug.cutmix-alpha 1.0.
Short flags: --model --data --data-dir --epochs --batch-size --seed --out --debug --lr
--mixup-alpha --cutmix-alpha --label-smoothing --drop-path --dropout --autoaugment --randaugment
--weight-decay --warmup-epochs --precision --compile --ema --pretrained --time-limit.
--debug: a quick pass through every code path: at most 512 training images, 2 epochs unless --epochs.
Examples:
  vitlab train --debug --epochs 3
  vitlab train --config fashion_mnist --data-dir ../shared/data/fashion-mnist
  vitlab train --model vit_small_patch4_32 --data cifar10 --mixup-alpha 0.2 --label-smoothing 0.1 --drop-path 0.1 --autoaugment
  torchrun --nproc_per_node 2 -m vitlab.cli train --data cifar10 --batch-size 256
"""


def add_arguments(p):
    p.epilog = EPILOG
    p.formatter_class = __import__("argparse").RawDescriptionHelpFormatter
    p.allow_abbrev = False
    p.add_argument("--config", metavar="PRESET_OR_FILE", help="a preset name from configs/ or a YAML file")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue an interrupted run exactly where its last epoch ended")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.add_argument("--list-keys", action="store_true", help="list every config key with its type and default, and exit")


def resolve(args):
    """The config a train (or finetune) command runs with. Sets args.finish: a resumed run whose
    training is complete and whose final test step is what remains."""
    args.finish = False
    overrides = parse_overrides(args.overrides)
    if args.resume:
        run = Path(args.resume)
        if not run.is_dir():
            raise UserError(f"--resume {run}: " + ("not a folder; pass the run's folder" if run.exists()
                                                   else "no such run folder"))
        if not (run / "last.ckpt").is_file():
            raise UserError(f"--resume {run}: no last.ckpt there (a run saves it at the end of each epoch)")
        cfg = from_dict(load_yaml(run / "config.yaml"))
        cfg.run.stop_after = None  # a pause point applies to the run that set it, not to its continuation
        saved = from_dict(load_yaml(run / "config.yaml"))
        for k, v in overrides.items():
            set_key(cfg, k, v)
        _unset_if_as_run(saved, cfg, run)
        check_resume_config(saved, cfg, run)  # here too (the engine checks it), so nothing is loaded first
        if bool(cfg.model.pretrained) != bool(saved.model.pretrained):  # (a fine-tune's source may move)
            raise UserError(f"--resume {run}: the run was {'fine-tuned' if saved.model.pretrained else 'trained from scratch'}"
                            f"; its weights come from its last.ckpt, so --pretrained cannot be "
                            f"{'dropped' if saved.model.pretrained else 'added'} (start a new run for that)")
        done, clock = _saved_progress(run)
        # the run's own plan complete (its epochs, or its time limit) and nothing more asked for
        complete = done >= saved.run.epochs or clock
        more = cfg.run.time_limit != saved.run.time_limit if clock else cfg.run.epochs > done
        if complete and not more and _test_pending(run):  # stopped in its final step: scoring on test
            args.finish = True
            cfg.run.epochs, cfg.run.time_limit = saved.run.epochs, saved.run.time_limit  # as the run was
        elif not getattr(args, "print_config", False):
            if done >= cfg.run.epochs:
                raise UserError(f"--resume {run}: the run has finished {done} epochs of {cfg.run.epochs}; to "
                                f"train it further pass --epochs above {done}")
            if clock and cfg.run.time_limit == saved.run.time_limit:
                raise UserError(f"--resume {run}: the run used all of its --run.time_limit ({saved.run.time_limit} "
                                f"min); to train it further pass a larger one")
        if (cfg.run.epochs != saved.run.epochs and not getattr(args, "print_config", False) and not args.finish
                and os.environ.get("RANK", "0") == "0"):
            print(f"note: --epochs {cfg.run.epochs} on a run of {saved.run.epochs}: the warmup and cosine schedule "
                  f"are laid out again over {cfg.run.epochs} epochs, so the lr from here follows the new curve")
        check_values(cfg)
        return cfg
    return build_config(args.config, overrides)


def _unset_if_as_run(saved, cfg, run: Path) -> None:
    """model.num_classes / model.img_size left unset by the run (derived from the data and the preset)
    and now given on the resume with the value they were derived to change nothing: they are put back
    to unset rather than refused. The derived values are those the run recorded: in its last.ckpt (a
    run paused before its first evaluation has no weights file yet), else in its weights file."""
    from ..models.vit import _pair

    asked = {"num_classes": cfg.model.num_classes, "img_size": cfg.model.img_size}
    if all(v is None for v in asked.values()):
        return
    derived = _derived_sizes(run)
    for field, now in asked.items():
        was = derived.get(field)
        if now is None or getattr(saved.model, field) is not None or was is None:
            continue
        if (_pair(now) == _pair(was)) if field == "img_size" else now == was:
            setattr(cfg.model, field, None)


def _derived_sizes(run: Path) -> dict:
    """{"num_classes", "img_size"} as the run derived them, from whichever record holds them; a value
    no record holds (or an unreadable file) is left out, and the ordinary check then refuses a change."""
    import torch

    from ..train.checkpoint import LAST, WEIGHTS, read_meta

    found = {}
    try:  # memory-mapped: the weights are not read
        state = torch.load(run / LAST, map_location="cpu", weights_only=True, mmap=True)
        found = {k: state[k] for k in ("num_classes", "img_size") if state.get(k) is not None}
    except Exception:  # noqa: BLE001 - no state or an unreadable one: the weights file may still say
        pass
    if len(found) < 2 and (run / WEIGHTS).is_file():
        try:
            meta = read_meta(run / WEIGHTS)
            found = {"num_classes": meta["arch"]["kwargs"].get("num_classes"), "img_size": meta.get("img_size"),
                     **found}
        except Exception:  # noqa: BLE001 - an unreadable weights file: the ordinary check refuses the change
            pass
    return {k: v for k, v in found.items() if v is not None}


def _saved_progress(run: Path) -> tuple[int, bool]:
    """(epochs the run's last.ckpt holds, whether its time limit ended it), read from the state itself
    (memory-mapped: the weights are not read): metrics.jsonl may be an epoch ahead of a save cut short.
    (0, False) for a state that cannot be read: loading it says why."""
    import torch

    try:
        state = torch.load(run / "last.ckpt", map_location="cpu", weights_only=True, mmap=True)
        history = state.get("history") or []
        return int(state["epoch"]), bool(history) and history[-1].get("stopped") == "time_limit"
    except Exception:  # noqa: BLE001 - any unreadable state: the engine's load reports it
        return 0, False


def _test_pending(run: Path) -> bool:
    """Whether the run chose its best epoch on a validation split but has no test.json: the final
    step, scoring those weights on the test split, was cut short (Ctrl-C, a kill) after the last save."""
    import torch

    if (run / "test.json").is_file():
        return False
    try:
        state = torch.load(run / "last.ckpt", map_location="cpu", weights_only=True, mmap=True)
        return any("val_acc" in h for h in state.get("history") or [])
    except Exception:  # noqa: BLE001 - an unreadable state: the ordinary refusal or the engine's load says why
        return False


def run(args) -> int:
    if args.list_keys:  # the defaults this command starts from: its preset's values (finetune's, --config's)
        print(key_table(build_config(args.config, {})))
        return 0
    cfg = resolve(args)
    if args.print_config:
        import yaml

        from ..config import to_dict

        print(yaml.safe_dump(to_dict(cfg), sort_keys=False), end="")
        return 0
    from .engine import train

    train(cfg, resume=args.resume, finish=args.finish)
    return 0
