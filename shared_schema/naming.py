"""How spliteasy names a model's variables: ``layer/variable``.

The names are part of the contract (bundle weights, device state ``A/<layer>/<var>``,
the exported model), so they live here, where the converters, the device and the server
all read them, instead of in one runtime that the others would then have to import.
Duck-typed: no framework is imported (a tf_keras model is what callers pass).
"""

from __future__ import annotations

from typing import Any


def named_variables(model: Any) -> dict[str, Any]:
    """Variables keyed ``layer/variable`` (e.g. ``b_bn1/moving_mean``), in model order.

    Keras' own ``variable.name`` depends on the name scope a layer was built in (a model
    rebuilt from config loses it), so spliteasy names variables by layer itself; the
    names are equal in the unsplit model and in the slice that holds the layer.
    """
    out: dict[str, Any] = {}
    for layer in model.layers:
        for var in layer.weights:
            out[variable_key(layer.name, var.name)] = var
    return out


def variable_key(layer_name: str, variable_name: str) -> str:
    """``layer/short`` from a layer name and a Keras variable name such as
    ``scope/b_bn1/moving_mean:0`` (only the last path part, without the ``:0``)."""
    short = variable_name.split("/")[-1].split(":")[0]
    return f"{layer_name}/{short}"
