"""Conversion's verification of B is shown to catch what it exists to catch.

Every bundle that exists passed verification, so checking a bundle's ``report.json``
cannot show that verification works. Here ``convert``'s writer (``write_bundle``) runs
on digits-cnn with the torch B it exported broken in one way each -- one weight
perturbed, a kernel in the wrong layout, a BatchNormalization dropped from the graph, a
BatchNormalization with the wrong momentum -- and must refuse, naming the Keras tensor
that disagrees, and leave no bundle behind. Verification checks B's
variables as loaded and that its graph uses each of them before it runs a step, so a
changed, mislaid or orphaned tensor is named alone; a wrong momentum shows in the
step's moving statistics. The unbroken conversion of the same model passes (the test
is not vacuous), with torch B's float32 gradients as close to the
float64 reference as Keras' own float32 gradients are.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from converters import bundle as bundle_module
from converters._exceptions import ConverterError
from converters.bundle import write_bundle
from converters.models import DIGITS_CUTS, digits_cnn
from server_torch.keras_compat import KerasBatchNorm
from shared_schema import SGDSpec

# Torch B's float32 gradients may be this many times further from the float64 reference
# than Keras' own float32 gradients are (both are float32 rounding of one computation),
# or this absolute relative error, whichever is larger.
FLOAT32_FACTOR = 4.0
FLOAT32_FLOOR = 1e-6


def _variable(spec, keras_name: str):
    return next(v for v in spec.variables if v.keras == keras_name)


def _bn_module(module, spec, keras_layer: str) -> tuple[str, KerasBatchNorm]:
    name = next(n for n, b in spec.batchnorm.items() if b.keras_layer == keras_layer)
    bn = module.get_submodule(name)
    assert isinstance(bn, KerasBatchNorm)
    return name, bn


def perturb_one_weight(module, spec) -> None:
    """One entry of b_conv2's kernel off by 1e-2 (its largest entry is ~0.1)."""
    param = module.get_parameter(_variable(spec, "b_conv2/kernel").torch)
    with torch.no_grad():
        param.view(-1)[17] += 1e-2


def kernel_in_wrong_layout(module, spec) -> None:
    """b_conv1's kernel with its spatial axes swapped (same shape, wrong layout)."""
    param = module.get_parameter(_variable(spec, "b_conv1/kernel").torch)
    with torch.no_grad():
        param.copy_(param.transpose(2, 3).contiguous())


def drop_batchnorm(module, spec) -> None:
    """b_bn2 cut out of the graph: its input flows on, its tensors stay in the module."""
    name, _ = _bn_module(module, spec, "b_bn2")
    [node] = [n for n in module.graph.nodes if n.op == "call_module" and n.target == name]
    node.replace_all_uses_with(node.args[0])
    module.graph.erase_node(node)
    module.recompile()


def wrong_momentum(module, spec) -> None:
    """b_bn1 with torch's default convention (0.1 for the new batch) read as Keras' 0.9."""
    _, bn = _bn_module(module, spec, "b_bn1")
    bn.momentum = 0.1


LOADED = "torch B's variables as loaded differ from Keras B's: "
STEP = "torch B disagrees with Keras B: "
CASES: dict[str, tuple[Callable, str, str]] = {
    # fault -> how the error starts, and the culprit it must name
    "one-weight-perturbed": (perturb_one_weight, LOADED, r"b_conv2/kernel: relative error \S+ > "),
    "wrong-layout": (kernel_in_wrong_layout, LOADED, r"b_conv1/kernel: relative error \S+ > "),
    "dropped-batchnorm": (
        drop_batchnorm,
        "torch B's graph never uses Keras variable(s) ",
        r"b_bn2/gamma, b_bn2/beta, b_bn2/moving_mean, b_bn2/moving_variance \(their layer was dropped",
    ),
    "wrong-bn-momentum": (wrong_momentum, STEP, r"moving statistic b_bn1/moving_mean: relative error \S+ > "),
}  # fmt: skip


@pytest.mark.parametrize("case", list(CASES))
def test_a_broken_torch_b_fails_convert_naming_the_tensor(case, tmp_path, monkeypatch):
    fault, start, culprit = CASES[case]
    real_export = bundle_module.export_server_slice

    def broken_export(*args, **kwargs):
        exported = real_export(*args, **kwargs)
        fault(exported.module, exported.spec)
        return exported

    monkeypatch.setattr(bundle_module, "export_server_slice", broken_export)
    out = tmp_path / "bundle"
    with pytest.raises(ConverterError) as err:
        write_bundle(digits_cnn(), list(DIGITS_CUTS), out, model_name="digits-cnn",
                     optimizer=SGDSpec(learning_rate=0.01, momentum=0.9))  # fmt: skip
    message = str(err.value)
    print(f"\n{case}: {message}")
    assert message.startswith(start), message
    assert re.search(culprit, message), message
    if start == LOADED:  # the culprit alone, not what it disturbs downstream
        assert message.count("relative error") == 1, message
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name != "bundle"]


def test_the_unbroken_conversion_passes_with_float32_gradients_at_keras_own_level(
    digits_bundle_dir: Path,
):
    """The control for the cases above, and the float32 figures the report only printed:
    torch B's float32 gradients are as close to the float64 reference as Keras' own."""
    import json

    v = json.loads((digits_bundle_dir / "report.json").read_text())["verification"]
    assert v["reference"] == "keras-float64" and v["gradients_checked_in"] == "float64"
    keras32 = v["keras_float32_max_grad_rel_err"]
    limit = max(FLOAT32_FACTOR * keras32, FLOAT32_FLOOR)
    print(
        f"\ndigits-cnn: torch float32 grads {v['float32']['max_param_grad_rel_err']:.1e}, input "
        f"grad {v['float32']['input_grad_rel_err']:.1e}; Keras float32 {keras32:.1e}"
    )
    assert 0 < keras32 < 1e-4
    assert v["float32"]["max_param_grad_rel_err"] <= limit
    assert v["float32"]["input_grad_rel_err"] <= limit
    assert np.isfinite(list(v["param_grad_rel_err"].values())).all()
