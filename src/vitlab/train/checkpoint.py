"""Checkpoint files: weights in safetensors, everything else as JSON metadata.

`model.safetensors` holds the weights plus string metadata: the architecture
record (`arch`, enough to rebuild the network), the resolved training config,
the class names and the normalisation. Loading it executes no code. The full
resumable state (`last.ckpt`) is a torch file read with `weights_only=True`.
Every write goes through `atomic_write`, so a crash never leaves a half file.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch
import torch.nn as nn
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..errors import UserError, brief
from ..models import build_from_arch
from ..utils import atomic_write, torch_file_kind

WEIGHTS = "model.safetensors"
LAST = "last.ckpt"


class CheckpointError(UserError):
    pass


def unwrap(model: nn.Module) -> nn.Module:
    """The plain model under DDP / torch.compile wrappers."""
    model = getattr(model, "module", model)
    return getattr(model, "_orig_mod", model)


def save_model(path: str | Path, model: nn.Module, meta: dict | None = None) -> None:
    """Save weights + architecture (+ any JSON-able meta) to a .safetensors file, atomically.

    The model must carry the architecture record (`model.arch`) that `vitlab.create_model`,
    `load_model` and `load_pretrained` attach; `reset_classifier` / `set_img_size` keep it true."""
    model = unwrap(model)
    if not isinstance(getattr(model, "arch", None), dict):
        raise ValueError(f"save_model needs a model built by vitlab.create_model (it records the architecture "
                         f"load_model rebuilds from); this {type(model).__name__} has no .arch")
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    info = {"format": "vitlab", "arch": json.dumps(model.arch)}
    for k, v in (meta or {}).items():
        info[k] = json.dumps(v)
    atomic_write(path, lambda tmp: save_file(state, tmp, metadata=info))


def resolve_weights(path: str | Path) -> Path:
    """A run directory or a file -> the .safetensors file to read."""
    p = Path(path)
    if p.is_dir():
        if (p / WEIGHTS).is_file():
            return p / WEIGHTS
        raise CheckpointError(f"{p} has no {WEIGHTS}; is it a vitlab run directory?")
    if not p.exists():
        raise CheckpointError(f"checkpoint not found: {p}")
    return p


def read_meta(path: str | Path) -> dict:
    """The metadata of a vitlab .safetensors file, JSON-decoded."""
    from safetensors import safe_open

    path = resolve_weights(path)
    try:
        with safe_open(str(path), "pt") as f:
            raw = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as e:
        if path.name == LAST:  # a run's training state: the weights are beside it
            raise CheckpointError(f"{path} is a resumable training state (for --resume); pass the run folder "
                                  f"{path.parent} or its {WEIGHTS}") from None
        if path.suffix != ".safetensors":
            raise CheckpointError(f"{path} is not a vitlab weights file (a .safetensors); for a run, pass its "
                                  f"folder or its {WEIGHTS}") from None
        raise CheckpointError(f"{path} is not a readable safetensors file ({e})") from None
    if raw.get("format") != "vitlab" or "arch" not in raw:
        raise CheckpointError(f"{path} is a safetensors file but not a vitlab checkpoint (no architecture record); "
                              f"Hugging Face or timm weights load as --pretrained (vitlab.load_pretrained in Python)")
    meta = {}
    for k, v in raw.items():
        try:
            meta[k] = json.loads(v)
        except json.JSONDecodeError:
            meta[k] = v
    return meta


def load_model(path: str | Path, map_location: str | torch.device = "cpu") -> tuple[nn.Module, dict]:
    """Rebuild a model from a run directory or .safetensors file; returns (model in eval mode, meta)."""
    path = resolve_weights(path)
    meta = read_meta(path)
    try:
        model = build_from_arch(meta["arch"])
    except (ValueError, TypeError, KeyError) as e:
        raise CheckpointError(f"{path}: cannot rebuild the model: {e}") from None
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path} is corrupt ({e})") from None
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as e:  # a tensor of another shape than the record builds: torch's message is many lines
        first = next((line.strip() for line in str(e).splitlines() if "size mismatch" in line), brief(e))
        raise CheckpointError(f"{path}: weights do not match the architecture it records ({first})") from None
    if missing or unexpected:
        raise CheckpointError(f"{path}: weights do not match the architecture "
                              f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    # load_state_dict copies into the model's own tensors, so the model is moved, not the state:
    # (tensors loaded onto a GPU left a CPU model, and the GPU test pass after fine-tuning failed)
    return model.to(map_location).eval(), meta


def save_state(path: str | Path, state: dict) -> None:
    """Save a full training state (resumable) atomically."""
    atomic_write(path, lambda tmp: torch.save(state, tmp))


def load_state(path: str | Path) -> dict:
    """Load a training state without executing code (weights_only=True)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no resumable state at {path}")
    try:
        with warnings.catch_warnings():  # torch's notes on old pickle protocols: the error line says enough
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any failure here means a bad file
        why = torch_file_kind(path) or f"{type(e).__name__}: {brief(e)}"
        raise CheckpointError(f"{path} is not a loadable training state ({why})") from None
