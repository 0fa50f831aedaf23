"""Zoo networks and their bundles for the issue-3 tests, built and converted once.

A conversion is the slow part of these tests (20-70 s on 2 cores), so each network is
built once per process (``built``, shared by test_cuts, test_zoo_convert and
test_zoo_equivalence) and each (network, cuts) bundle comes from the on-disk cache of
``bundle_cache`` (converted once per configuration and converter source, reused across
processes, xdist workers and runs). Bundles are read-only for tests: copy one
(``bundle_cache.copy_bundle``) before tampering with it.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import bundle_cache
import pytest

SGD_CFG = {"name": "sgd", "learning_rate": 0.01, "momentum": 0.9}

# Two cut pairs per network, at its smallest input size, chosen to cover different
# parts: the stem and early stages (ZeroPadding, max pooling, projection shortcuts,
# dense-block transitions) and the tail (global average pooling in B, 1x1 maps where
# tf2onnx turns layout transposes into reshapes, ReLU6, depthwise convolutions).
CUT_PAIRS: dict[str, list[tuple[str, str]]] = {
    "resnet50": [("conv2_block3_out", "conv4_block6_out"), ("conv4_block6_out", "avg_pool")],
    "resnet152": [("conv2_block3_out", "conv3_block8_out"), ("conv4_block30_out", "conv4_block36_out")],
    "densenet121": [("pool2_pool", "pool3_pool"), ("conv4_block24_concat", "avg_pool")],
    "densenet201": [("conv1/relu", "pool2_pool"), ("conv4_block40_concat", "pool4_pool")],
    "inceptionv3": [("mixed2", "mixed5"), ("mixed7", "mixed9")],
    "inceptionresnetv2": [("block35_9_ac", "block17_2_ac"), ("block8_9_ac", "conv_7b_ac")],
    "mobilenetv2": [("block_4_add", "block_12_add"), ("block_12_add", "out_relu")],
}  # fmt: skip


# Issue #12: the device's share of a real network -- the stem in A, the head in C, all the
# rest in B -- at 96 px, as the device-runtime benchmark (benchmarks/device_runtimes.py)
# trains it. One bundle per network holds every runtime.
DEVICE_SPLITS: dict[str, tuple[str, str]] = {
    "resnet50": ("pool1_pool", "conv5_block3_out"),
    "mobilenetv2": ("expanded_conv_project_BN", "block_16_project_BN"),
}
DEVICE_SIZE = 96


@functools.cache
def device_bundle(name: str, size: int = DEVICE_SIZE) -> Path:
    """The stem/head bundle of zoo network ``name`` (``DEVICE_SPLITS``) at ``size`` px with
    the TF, TF.js and TFLite device artefacts, from the cache (read-only)."""
    from converters import zoo
    from shared_schema import SGDSpec

    model, from_logits = zoo.build(name, size)
    cfg = {k: v for k, v in SGD_CFG.items() if k != "name"}
    return bundle_cache.converted(
        model,
        DEVICE_SPLITS[name],
        model_name=name,
        optimizer=SGDSpec(**cfg),
        from_logits=from_logits,
        runtimes=("tf", "tfjs", "tflite"),
    )


def on(name: str) -> pytest.MarkDecorator:
    """Run on the pytest-xdist worker that holds zoo network ``name`` (``--dist
    loadgroup``): every test of one network shares one build of it."""
    return pytest.mark.xdist_group(name)


def params(cases: list[tuple], ids: list[str] | None = None) -> list[Any]:
    """``cases`` (first item: the network's name) as parameters grouped by network."""
    ids = ids or [None] * len(cases)
    return [pytest.param(*c, marks=on(c[0]), id=i) for c, i in zip(cases, ids, strict=True)]


@functools.cache
def built(name: str) -> tuple[Any, bool]:
    """``(model, from_logits)`` of zoo network ``name`` at its smallest input size.

    Shared: never train it or change its weights (clone it: ``clone_with_weights``).
    """
    from converters import zoo

    return zoo.build(name, zoo.entry(name).min_size)


# Zoo bundles converted with the TF.js device artefacts too: the TF.js zoo device test
# (test_js_zoo_device.py) trains this one, so the suite converts ResNet50 for it only once.
TFJS_BUNDLES = {("resnet50", ("conv2_block3_out", "conv4_block6_out"))}


@functools.cache
def bundle(name: str, cuts: tuple[str, ...]) -> Path:
    """The bundle ``spliteasy convert --model NAME --cuts ... --optimizer sgd`` writes
    (``--runtimes tf,tfjs`` for ``TFJS_BUNDLES``)."""
    from shared_schema import SGDSpec

    model, from_logits = built(name)
    cfg = {k: v for k, v in SGD_CFG.items() if k != "name"}
    runtimes = ("tf", "tfjs") if (name, tuple(cuts)) in TFJS_BUNDLES else ("tf",)
    return bundle_cache.converted(
        model,
        cuts,
        model_name=name,
        optimizer=SGDSpec(**cfg),
        from_logits=from_logits,
        runtimes=runtimes,
    )


def slice_layers(model: Any, cuts: tuple[str, ...]) -> list[Any]:
    """The layers of the unsplit model that slice B holds: after the first cut, up to
    and including the second (or the output), in call order."""
    from converters.cuts import Analysis

    analysis = Analysis(model)
    first = analysis.by_name[cuts[0]]
    last = analysis.by_name[cuts[1]] if len(cuts) == 2 else analysis.output
    return [analysis.calls[p].layer for p in range(first + 1, last + 1)]


def short_name(variable: Any) -> str:
    return variable.name.split("/")[-1].split(":")[0]
