"""Device memory options: ``--recompute-a`` (tf.recompute_grad on A) trains exactly as
the plain step.

A real server is not needed to show it: the option changes only how the device computes
A's gradient, so both runtimes are driven through the same steps with the same cut
tensors coming back (a fixed B output and upstream gradient per step), on the cached
``digits-bn`` bundle, whose A holds BatchNormalization (the moving statistics must move
once per step, not twice).
"""

from __future__ import annotations

import numpy as np
import pytest

from split_helpers import SGD_CFG, digits_bundle, fixed_batches, rel


@pytest.fixture(scope="module")
def bn_bundle():
    bundle, _ = digits_bundle(None, "double", SGD_CFG, model="digits-bn")
    return bundle


def _run(bundle, recompute: bool, batches) -> dict[str, dict[str, np.ndarray]]:
    from device_tf.tf_runtime import TFRuntime
    from shared_schema import load_manifest

    manifest = load_manifest(bundle)
    rt = TFRuntime.from_bundle(bundle, manifest, recompute_a=recompute)
    rng = np.random.default_rng(0)
    b_shape = manifest.cuts[1].sample_shape
    for x, y in batches:
        a = rt.a_forward(x)
        b = rng.standard_normal((len(x), *b_shape)).astype(np.float32)
        rt.c_train(b, y)
        g_a = (rng.standard_normal(a.shape) * 1e-2).astype(np.float32)
        rt.a_backward(g_a)
    return rt.weights()


def test_recompute_a_equals_plain_step(bn_bundle) -> None:
    batches = fixed_batches(3, 16)
    plain = _run(bn_bundle, False, batches)
    recomputed = _run(bn_bundle, True, batches)
    worst = 0.0
    for role in ("A", "C"):
        assert plain[role].keys() == recomputed[role].keys()
        for name, value in plain[role].items():
            worst = max(worst, rel(recomputed[role][name], value))
    assert worst <= 1e-6, worst
    # A's BatchNorm moving statistics moved (once per step, as in the plain run).
    moving = [k for k in plain["A"] if "moving_mean" in k]
    assert moving
    from device_tf.tf_runtime import TFRuntime

    fresh = TFRuntime.from_bundle(bn_bundle).weights()["A"]
    assert any(rel(plain["A"][k], fresh[k]) > 1e-3 for k in moving)


def test_recompute_a_refuses_dropout_in_a() -> None:
    import tf_keras as keras

    from device_tf._exceptions import DeviceError
    from device_tf.tf_runtime import _check_recomputable

    inp = keras.Input((4,))
    model = keras.Model(inp, keras.layers.Dropout(0.5, name="drop")(keras.layers.Dense(3)(inp)))
    with pytest.raises(DeviceError, match="drop"):
        _check_recomputable(model)


def test_memory_cap_is_applied_and_failure_reported() -> None:
    """``bench memory``'s cap is real: a child under RLIMIT_AS of 300 MB cannot even
    import TensorFlow (its import alone reserves ~1.9 GB of address space), and the study
    reports the failure with its error line instead of figures."""
    from spliteasy_cli.bench_memory import measure

    r = measure("import", cap_mb=300, timeout=120)
    assert not r["ok"] and r["exit"] != 0
    assert r["error"] and "peak_rss_mb" not in r
