"""What the clipper needs to know about a model: its layers, and what it refuses outright."""

from __future__ import annotations

from typing import Any

import keras

from ...errors import TrainingError

__all__ = ["check_model", "flatten_layers"]


def flatten_layers(model: Any) -> list[Any]:
    """Every layer nested in ``model`` (not ``model`` itself), each once."""
    if hasattr(model, "_flatten_layers"):
        return list(model._flatten_layers(include_self=False, recursive=True))
    out, seen, stack = [], set(), list(getattr(model, "layers", []))
    while stack:
        layer = stack.pop(0)
        if id(layer) in seen:
            continue
        seen.add(id(layer))
        out.append(layer)
        stack.extend(getattr(layer, "layers", []))
    return out


def check_model(model: Any) -> None:
    """Refuse models DP-SGD can't train per example (BatchNormalization, activity regularizers)
    and weights held in half precision."""
    for weight in getattr(model, "trainable_weights", []):
        dtype = str(getattr(weight, "dtype", "float32"))
        if dtype != "float32":
            raise TrainingError(
                f"weight {weight.path if hasattr(weight, 'path') else weight.name!r} is held in "
                f"{dtype}: per-example clipping and noise need float32 weights. Build the model "
                "in float32; for half-precision compute use a mixed policy "
                "(keras.mixed_precision.set_global_policy('mixed_bfloat16')), whose weights "
                "stay float32"
            )
    for layer in flatten_layers(model):
        if isinstance(layer, keras.layers.BatchNormalization):
            raise TrainingError(
                f"layer {layer.name!r} is BatchNormalization, which mixes the examples of a batch: "
                "per-example gradients (and so DP-SGD) are not defined for it. Replace it with "
                "keras.layers.LayerNormalization() or keras.layers.GroupNormalization(groups=…)"
            )
        if getattr(layer, "activity_regularizer", None) is not None:
            raise TrainingError(
                f"layer {layer.name!r} has an activity regularizer: that loss depends on the data "
                "but is not clipped per example, which would break the privacy guarantee. Remove it"
            )
