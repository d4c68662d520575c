"""`vitlab finetune`: `vitlab train` from pretrained weights, with a fine-tuning preset.

    vitlab finetune --pretrained google/vit-base-patch16-224 --data flowers102
    vitlab finetune --pretrained path/to/hf_dir --data imagefolder:photos --epochs 5
    vitlab finetune --pretrained runs/x/model.safetensors --model.freeze backbone   # linear probe

The weights come with their own resolution and normalisation, which the run
uses (a new head is put on when the class count differs). The default preset
is configs/finetune.yaml; `--config finetune_flowers102_seed` is the seed
notebook's recipe, kept for comparison.
"""

from __future__ import annotations

from ..config import parse_overrides
from ..errors import UserError
from . import command

ACCEPTS_OVERRIDES = True
DEFAULT_PRESET = "finetune"

EPILOG = """\
Every `vitlab train` option works here but --model (the weights set the architecture). Fine-tuning switches:
  --pretrained ID_OR_PATH   Hugging Face dir or hub id, timm/torchvision .pth/.safetensors, Google .npz, vitlab run
  --optim.layer_decay 0.75  layer-wise lr decay (head full rate, embeddings least); 1 turns it off
  --model.freeze backbone   train the head only (linear probe)
  --model.img_size 384      fine-tune at another resolution (position embeddings resampled)
Examples:
  vitlab finetune --pretrained google/vit-base-patch16-224 --data flowers102
  vitlab finetune --pretrained ./vit-base-patch16-224 --data imagefolder:my_photos --epochs 5 --batch-size 16
"""


def add_arguments(p):
    command.add_arguments(p)
    p.epilog = EPILOG
    p.set_defaults(config=DEFAULT_PRESET)


def run(args) -> int:
    if args.list_keys:
        return command.run(args)
    cfg = command.resolve(args)
    if "model.name" in parse_overrides(args.overrides) and cfg.model.pretrained:
        raise UserError("--model is not used by finetune: the --pretrained weights set the architecture")
    if not cfg.model.pretrained:
        raise UserError("finetune needs weights to start from: --pretrained HUB_ID_OR_PATH "
                        "(e.g. google/vit-base-patch16-224 or a local Hugging Face directory)")
    if args.print_config:
        return command.run(args)
    from .engine import train

    train(cfg, resume=args.resume, finish=args.finish, go_on="vitlab finetune --resume {run}")
    return 0
