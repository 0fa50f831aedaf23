"""shared_schema/layers.json is the one layer-capability table, and it is consistent.

The converters' checks read it (no second list of their own); the TF.js side's twin is
device_tf/js/test/layers_table.test.mjs.
"""

from __future__ import annotations

from shared_schema import layers as table


def test_converters_read_the_table() -> None:
    from converters import cuts
    from converters.export import tfjs, tflite

    assert cuts.SUPPORTED_LAYERS is table.SUPPORTED_LAYERS
    assert cuts.DEVICE_ONLY_LAYERS is table.DEVICE_ONLY_LAYERS
    assert cuts.SUPPORTED_ACTIVATIONS is table.SUPPORTED_ACTIVATIONS
    assert tfjs.TFJS_LAYER_CLASSES is table.TFJS_LAYER_CLASSES
    assert tfjs._UNREPEATABLE is table.UNREPEATABLE_LAYERS
    assert tflite._STOCHASTIC is table.RANDOM_LAYERS


def test_tfjs_refusals_are_exactly_the_classes_tfjs_lacks() -> None:
    lacking = table.CARRIED_LAYERS - table.TFJS_LAYER_CLASSES
    assert set(table.TFJS_REFUSED) == lacking, "give each a 'tfjs' reason in layers.json"


def test_every_reason_is_a_sentence_and_names_are_consistent() -> None:
    for name, entry in table.TABLE["layers"].items():
        assert set(entry) <= {"B", "tflite_A", "tfjs"}, name
        assert all(len(why) > 20 for why in entry.values()), name
    assert set(table.TFLITE_NOT_IN_A) <= table.RANDOM_LAYERS
    assert table.RESEEDED_LAYERS.isdisjoint(table.UNREPEATABLE_LAYERS)
    assert table.SUPPORTED_LAYERS | table.RANDOM_LAYERS >= table.CARRIED_LAYERS
    assert not (set(table.REFUSED_WHY) & table.CARRIED_LAYERS)
