"""Cut-point discovery on the seven zoo networks, every invalid-cut error, and ``spliteasy cuts``.

Each zoo network is built once per process (at its smallest input size, ``zoo_helpers.built``)
and shared with the zoo conversion and equivalence tests.
"""

from __future__ import annotations

import functools
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import zoo_helpers

from converters import cuts, zoo
from converters._exceptions import ConverterError, InvalidCut, UnsupportedLayer


def built(name: str):
    """The network at its smallest input size, built once per process for every zoo test."""
    return zoo_helpers.built(name)[0]


@functools.cache
def cut_names(name: str) -> tuple[str, ...]:
    return tuple(c.layer for c in cuts.find_cuts(built(name)))


def keras():
    import tf_keras

    return tf_keras


# -- every network --------------------------------------------------------------------


@pytest.mark.parametrize("name", zoo_helpers.params([(n,) for n in zoo.names()], zoo.names()))
def test_cuts_of_every_zoo_network_are_consistent(name):
    model = built(name)
    found = cuts.find_cuts(model)
    assert len(found) > 5
    positions = [c.position for c in found]
    assert positions == sorted(set(positions))
    assert [model.layers[c.position].name for c in found] == [c.layer for c in found]
    total = model.count_params()
    flops = previous = None
    for c in found:
        assert c.params_before + c.params_after == total
        assert c.bytes_per_sample == 4 * math.prod(c.shape)
        assert tuple(model.get_layer(c.layer).output_shape[1:]) == c.shape
        assert c.flops_before >= 0 and c.flops_after >= 0
        if flops is not None and previous is not None:
            assert c.flops_before + c.flops_after == flops
            assert c.flops_before >= previous
        flops, previous = c.flops_before + c.flops_after, c.flops_before
    names = [layer.name for layer in model.layers]
    assert names[0] not in cut_names(name)  # the input
    assert names[-1] not in cut_names(name)  # the output (the logits)
    cuts.check_supported(model)
    # The first and last cut are accepted together as a double split.
    pair = cuts.validate_cuts(model, [found[0].layer, found[-1].layer])
    assert [c.layer for c in pair] == [found[0].layer, found[-1].layer]


@pytest.mark.parametrize(
    "name,blocks",
    zoo_helpers.params([("resnet50", (3, 4, 6, 3)), ("resnet152", (3, 8, 36, 3))], ["50", "152"]),
)
def test_resnet_cuts_fall_only_between_residual_blocks(name, blocks):
    found = cut_names(name)
    for stage, n in enumerate(blocks, start=2):
        for b in range(1, n + 1):
            assert f"conv{stage}_block{b}_out" in found
            assert f"conv{stage}_block{b}_add" in found
    assert "conv2_block1_1_conv" not in found
    inside = [c for c in found if re.match(r"conv\d_block\d+_\d_", c)]
    assert inside == []
    assert found[-1] == "avg_pool"


@pytest.mark.parametrize(
    "name,blocks",
    zoo_helpers.params(
        [("densenet121", (6, 12, 24, 16)), ("densenet201", (6, 12, 48, 32))], ["121", "201"]
    ),
)
def test_densenet_cuts_are_the_concatenations_and_transitions(name, blocks):
    """Keras' DenseNet concatenates each bottleneck's output onto the running tensor, so
    the running concatenation carries everything: every ``*_concat`` is a cut, and
    nothing inside a bottleneck (``convN_blockM_{0,1,2}_*``) is."""
    found = cut_names(name)
    concats = [c for c in found if c.endswith("_concat")]
    assert len(concats) == sum(blocks)
    assert [c for c in found if re.match(r"conv\d_block\d+_\d_", c)] == []
    for t in (2, 3, 4):
        for part in ("bn", "relu", "conv", "pool"):
            assert f"pool{t}_{part}" in found
    assert {"bn", "relu", "avg_pool"} <= set(found)


@zoo_helpers.on("inceptionv3")
def test_inceptionv3_cuts_between_mixed_modules_only():
    found = list(cut_names("inceptionv3"))
    tail = found[found.index("mixed0") :]
    assert tail == [f"mixed{i}" for i in range(11)] + ["avg_pool"]


@zoo_helpers.on("inceptionresnetv2")
def test_inceptionresnetv2_has_no_custom_layer_and_cuts_between_blocks():
    model = built("inceptionresnetv2")
    assert not [layer for layer in model.layers if type(layer).__name__ == "CustomScaleLayer"]
    found = cut_names("inceptionresnetv2")
    assert {
        "mixed_5b",
        "mixed_6a",
        "mixed_7a",
        "block35_1_ac",
        "block17_20_ac",
        "block8_10_add",
    } <= set(found)
    assert "block35_1_scale" not in found and "block35_1_conv" not in found
    assert type(model.get_layer("block35_1_scale")).__name__ == "Rescaling"


@zoo_helpers.on("mobilenetv2")
def test_mobilenetv2_cuts_inside_plain_blocks_not_inside_residual_ones():
    found = cut_names("mobilenetv2")
    assert "block_1_depthwise_relu" in found  # block 1 has no shortcut
    assert "block_2_add" in found and "block_2_expand" not in found
    assert "block_2_project_BN" not in found


# -- the zoo ----------------------------------------------------------------------------


def test_zoo_builds_are_deterministic_logits_heads():
    a, from_logits = zoo.build("mobilenetv2", 32, num_classes=3, seed=7)
    keras().layers.Dense(2, name="unrelated")  # auto-naming state moves between builds
    b, _ = zoo.build("mobilenetv2", 32, num_classes=3, seed=7)
    c, _ = zoo.build("mobilenetv2", 32, num_classes=3, seed=8)
    assert from_logits is True
    assert a.output_shape == (None, 3) and a.input_shape == (None, 32, 32, 3)
    assert a.layers[-1].activation.__name__ == "linear"
    assert [layer.name for layer in a.layers] == [layer.name for layer in b.layers]
    assert all(np.array_equal(x, y) for x, y in zip(a.get_weights(), b.get_weights(), strict=True))
    assert not all(
        np.array_equal(x, y) for x, y in zip(a.get_weights(), c.get_weights(), strict=True)
    )


def test_zoo_rejects_unknown_names_and_bad_arguments():
    with pytest.raises(zoo.UnknownModel, match="known: resnet50, resnet152"):
        zoo.build("resnet51")
    with pytest.raises(
        zoo.ZooError, match=r"inceptionv3 needs an integer input size >= 75, got 74"
    ):
        zoo.build("inceptionv3", 74)
    with pytest.raises(zoo.ZooError, match=r"input size >= 32"):
        zoo.build("resnet50", 31)
    with pytest.raises(zoo.ZooError, match="num_classes must be an integer >= 2"):
        zoo.build("resnet50", 32, num_classes=1)
    assert zoo.names() == [
        "resnet50", "resnet152", "densenet121", "densenet201", "inceptionv3", "inceptionresnetv2", "mobilenetv2",
        "vgg16", "efficientnetb0", "mobilenetv3small",
    ]  # fmt: skip


def test_custom_scale_layer_is_rewritten_with_the_same_arithmetic_and_weights():
    k = keras()
    from tf_keras.src.applications.inception_resnet_v2 import CustomScaleLayer

    x = k.Input((4, 4, 3), name="x")
    base = k.layers.Conv2D(3, 1, name="stem_conv")(x)
    up = k.layers.Conv2D(3, 1, name="block_conv")(base)
    out = CustomScaleLayer(0.17, name="odd_name")([base, up])
    out = k.layers.Flatten(name="flat")(out)
    model = k.Model(x, k.layers.Dense(2, name="head")(out))
    with pytest.raises(
        UnsupportedLayer, match=r"'odd_name' \(CustomScaleLayer\).*Rescaling \+ Add"
    ):
        cuts.check_supported(model)
    rewritten = zoo.replace_custom_scale_layers(model)
    cuts.check_supported(rewritten)
    assert [type(rewritten.get_layer(n)).__name__ for n in ("block_scale", "block_add")] == [
        "Rescaling",
        "Add",
    ]
    data = np.random.default_rng(0).normal(size=(3, 4, 4, 3)).astype("float32")
    np.testing.assert_array_equal(model(data).numpy(), rewritten(data).numpy())
    assert zoo.replace_custom_scale_layers(rewritten) is rewritten


# -- invalid cuts -----------------------------------------------------------------------


def invalid(model, names: list[str]) -> str:
    with pytest.raises(InvalidCut) as err:
        cuts.validate_cuts(model, names)
    return str(err.value)


@zoo_helpers.on("resnet50")
def test_unknown_layer_suggests_close_names():
    msg = invalid(built("resnet50"), ["conv2_block1_outt"])
    assert "model 'resnet50' has no layer named 'conv2_block1_outt'" in msg
    assert "did you mean 'conv2_block1_out'" in msg
    msg = invalid(built("resnet50"), ["xyzzy"])
    assert "no layer named 'xyzzy'" in msg and "spliteasy cuts MODEL" in msg


@zoo_helpers.on("resnet50")
def test_layer_inside_a_residual_block_names_the_bypass_and_nearest_cuts():
    msg = invalid(built("resnet50"), ["conv2_block1_1_conv"])
    assert "'conv2_block1_1_conv' is not a single-tensor cut point" in msg
    assert (
        "the path pool1_pool -> conv2_block1_0_conv -> conv2_block1_0_bn -> conv2_block1_add bypasses it"
        in msg
    )
    assert "nearest valid cuts: 'pool1_pool' (before), 'conv2_block1_add' (after)" in msg


@zoo_helpers.on("densenet121")
def test_layer_inside_a_dense_block_is_refused():
    msg = invalid(built("densenet121"), ["conv2_block2_1_conv"])
    assert "the path conv2_block1_concat -> conv2_block2_concat bypasses it" in msg
    assert "'conv2_block1_concat' (before), 'conv2_block2_concat' (after)" in msg


@zoo_helpers.on("resnet50")
def test_cuts_out_of_order():
    msg = invalid(built("resnet50"), ["conv3_block1_out", "conv2_block1_out"])
    assert msg.startswith(
        "cuts out of order: 'conv3_block1_out' (position 50) comes after 'conv2_block1_out'"
    )
    assert "give them as conv2_block1_out,conv3_block1_out" in msg


@zoo_helpers.on("resnet50")
def test_cuts_that_leave_a_slice_empty():
    model = built("resnet50")
    assert "slice B between the cuts would be empty" in invalid(model, ["conv2_block1_out"] * 2)
    assert "'input_1': it is the model input, so slice A would be empty" in invalid(
        model, ["input_1"]
    )
    assert "'predictions': it is the model output, so slice B would be empty" in invalid(
        model, ["predictions"]
    )
    msg = invalid(model, ["conv2_block1_out", "predictions"])
    assert "so slice C would be empty" in msg


@zoo_helpers.on("resnet50")
def test_wrong_number_of_cuts():
    assert "give one cut (single split) or two (double split), got 0" in invalid(
        built("resnet50"), []
    )
    assert "got 3" in invalid(
        built("resnet50"), ["pool1_pool", "conv2_block1_out", "conv3_block1_out"]
    )


def small(k, body):
    x = k.Input((6, 6, 2), name="x")
    return k.Model(x, body(x), name="small")


def test_shared_and_multi_output_layers_are_not_cut_points_rank_5_neither():
    k = keras()
    L = k.layers

    shared = L.Conv2D(2, 1, name="shared_conv")

    def body(x):
        h = L.ReLU(name="pre")(x)
        h = shared(h)
        h = L.ReLU(name="mid")(h)
        h = shared(h)
        h = L.Lambda(lambda t: [t, t * 2], name="twins")(h)
        h = L.Add(name="join")(h)
        h = L.Reshape((6, 6, 2, 1), name="rank5")(h)
        h = L.Flatten(name="flat")(h)
        return L.Dense(3, name="head")(h)

    model = small(k, body)
    # 'pre' precedes both calls of the shared layer, so it is a cut.
    assert [c.layer for c in cuts.find_cuts(model)] == ["pre", "join", "flat"]
    msg = invalid(model, ["shared_conv"])
    assert "the layer is shared (called 2 times), so no one tensor is its output" in msg
    msg = invalid(model, ["mid"])
    assert "layer 'shared_conv' is shared by calls on both sides of it" in msg
    assert "nearest valid cuts: 'pre' (before), 'join' (after)" in msg
    assert "it returns several tensors; a cut carries exactly one" in invalid(model, ["twins"])
    assert "its output has rank 5" in invalid(model, ["rank5"])
    assert cuts.validate_cuts(model, ["join"])[0].shape == (6, 6, 2)


def test_sequential_models_are_cut_too():
    k = keras()
    L = k.layers
    model = k.Sequential(
        [
            k.Input((8, 8, 1)),
            L.Conv2D(4, 3, name="c1"),
            L.ReLU(name="r1"),
            L.Flatten(name="f"),
            L.Dense(3, name="d"),
        ]
    )
    found = cuts.find_cuts(model)
    assert [c.layer for c in found] == ["c1", "r1", "f"]
    assert found[0].position == 1 and found[0].params_before == 40
    assert found[0].flops_before == 2 * 9 * 1 * (6 * 6 * 4) + 6 * 6 * 4


def test_models_spliteasy_cannot_cut_at_all():
    k = keras()
    a, b = k.Input((4,), name="a"), k.Input((4,), name="b")
    two_inputs = k.Model([a, b], k.layers.Dense(2)(k.layers.Add()([a, b])))
    with pytest.raises(ConverterError, match="2 inputs and 1 outputs"):
        cuts.find_cuts(two_inputs)

    class Sub(k.Model):
        def call(self, x):
            return x

    with pytest.raises(ConverterError, match="not a functional or Sequential"):
        cuts.find_cuts(Sub())


def test_flops_of_common_layers():
    k = keras()
    L = k.layers

    def body(x):
        h = L.Conv2D(4, 3, padding="same", name="conv")(x)  # 2*(3*3*2)*(6*6*4) + bias
        h = L.BatchNormalization(name="bn")(h)  # 2 per element
        h = L.DepthwiseConv2D(3, name="dw", use_bias=False)(h)  # 2*9*(4*4*4)
        h = L.MaxPooling2D(2, name="pool")(h)  # 4 per output (2*2*4)
        h = L.Flatten(name="flat")(h)
        return L.Dense(5, name="head")(h)  # 2*16*5 + 5

    model = small(k, body)
    per_layer = {c.layer.name: c.flops for c in cuts.Analysis(model).calls}
    assert per_layer == {
        "x": 0,
        "conv": 2 * 18 * 144 + 144,
        "bn": 2 * 144,
        "dw": 2 * 9 * 64,
        "pool": 4 * 16,
        "flat": 0,
        "head": 2 * 16 * 5 + 5,
    }


# -- unsupported layers -------------------------------------------------------------------


def test_unsupported_layers_are_named():
    k = keras()
    L = k.layers
    lam = small(k, lambda x: L.Dense(2)(L.Flatten()(L.Lambda(lambda t: t * 2, name="doubler")(x))))
    with pytest.raises(
        UnsupportedLayer,
        match=r"layer 'doubler' \(Lambda\) cannot be carried: it runs arbitrary Python",
    ):
        cuts.check_supported(lam)
    drop = small(k, lambda x: L.Dense(2)(L.Dropout(0.5, name="drop")(L.Flatten()(x))))
    with pytest.raises(UnsupportedLayer, match=r"'drop' \(Dropout\)"):
        cuts.check_supported(drop)
    act = small(k, lambda x: L.Dense(2, activation="exponential", name="expo")(L.Flatten()(x)))
    with pytest.raises(UnsupportedLayer, match=r"'expo' \(Dense\) uses activation 'exponential'"):
        cuts.check_supported(act)

    class Doubler(L.Layer):
        def call(self, t):
            return t * 2

    custom = small(k, lambda x: L.Dense(2)(L.Flatten()(Doubler(name="mine")(x))))
    with pytest.raises(
        UnsupportedLayer, match=r"'mine' \(Doubler\) cannot be carried: it is a custom layer class"
    ):
        cuts.check_supported(custom)


# -- the CLI ----------------------------------------------------------------------------


@zoo_helpers.on("resnet50")
def test_cli_json_matches_find_cuts():
    exe = Path(sys.executable).with_name("spliteasy")
    out = subprocess.run(
        [str(exe), "cuts", "resnet50", "--input-size", "32", "--json"],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    doc = json.loads(out.stdout)
    assert (
        doc["model"] == "resnet50"
        and doc["input_shape"] == [32, 32, 3]
        and doc["output_shape"] == [10]
    )
    assert doc["params"] == built("resnet50").count_params()
    assert doc["unsupported"] is None
    assert [c["layer"] for c in doc["cuts"]] == list(cut_names("resnet50"))
    first = doc["cuts"][0]
    assert set(first) == {
        "position", "layer", "shape", "bytes_per_sample", "params_before", "params_after", "flops_before", "flops_after",
    }  # fmt: skip


def test_cli_table_and_errors(capsys):
    from spliteasy_cli.main import main

    assert main(["cuts", "mobilenetv2", "--input-size", "32", "--num-classes", "5"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("mobilenetv2_1.00_32: input 32x32x3, output 5,")
    assert f"{len(cut_names('mobilenetv2'))} valid cuts" in lines[0]
    assert lines[1].split() == [
        "pos",
        "layer",
        "shape",
        "KiB/sample",
        "params",
        "A",
        "|",
        "rest",
        "MFLOPs",
        "A",
        "|",
        "rest",
    ]
    row = next(line for line in lines if " block_2_add " in line).split()
    assert row[2] == "8x8x24" and row[3] == "6.0"

    assert main(["cuts", "resnet51"]) == 2
    err = capsys.readouterr().err
    assert "unknown model 'resnet51'" in err and "inceptionresnetv2" in err
    assert main(["cuts", "inceptionv3", "--input-size", "60"]) == 2
    assert "inceptionv3 needs an integer input size >= 75, got 60" in capsys.readouterr().err


def test_cli_on_a_saved_model_warns_about_layers_it_cannot_carry(tmp_path, capsys):
    from spliteasy_cli.main import main

    k = keras()
    L = k.layers
    x = k.Input((6, 6, 2), name="x")
    h = L.Conv2D(3, 3, name="conv")(x)
    h = L.Dropout(0.3, name="drop")(L.Flatten(name="flat")(h))
    path = tmp_path / "mine.h5"
    k.Model(x, L.Dense(2, name="head")(h), name="mine").save(path)

    assert main(["cuts", str(path), "--json"]) == 0
    captured = capsys.readouterr()
    doc = json.loads(captured.out)
    assert [c["layer"] for c in doc["cuts"]] == ["conv", "flat", "drop"]
    assert "layer 'drop' (Dropout) cannot be carried" in doc["unsupported"]
    assert "spliteasy cuts: warning: layer 'drop' (Dropout)" in captured.err
