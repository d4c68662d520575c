"""Attention visualisation: maps and rollout as tensors, figures as matplotlib Figures.

    from vitlab.viz import attention_maps, plot_rollout
    maps = attention_maps(model, images)          # dict of tensors, see attention_maps
    fig = plot_rollout(raw_image, maps["rollout"][0])

Works on any model whatever attention kernel it trained or scores with: the weights
are requested per call from the model's explicit attention path. Importing this package does
not import matplotlib; the plotting names load it on first use.
"""

from .attention import (
    attention_maps,
    discard_lowest,
    fuse_heads,
    gradient_rollout,
    normalize_for_display,
    rollout,
    rollout_matrix,
    upsample,
)

_PLOTS = ("plot_summary", "plot_heads", "plot_rollout", "plot_layers", "save")


def __getattr__(name):  # lazy: `vitlab.viz.plot_rollout` imports matplotlib only when asked for
    if name in _PLOTS:
        from . import plots

        return getattr(plots, name)
    raise AttributeError(f"module 'vitlab.viz' has no attribute {name!r}")


__all__ = ["attention_maps", "discard_lowest", "fuse_heads", "gradient_rollout", "normalize_for_display",
           "rollout", "rollout_matrix", "upsample", *_PLOTS]
