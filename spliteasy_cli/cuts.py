"""``spliteasy cuts MODEL``: where a network can be cut and what each cut costs.

The paper's Table 2 for any model: every layer output through which every input ->
output path passes, with the bytes that would cross per sample and how parameters and
FLOPs divide between the two sides. Pick cuts from this list for ``spliteasy convert``.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

HELP = "List the valid cut points of a model with their per-sample costs (the paper's Table 2)."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "model",
        metavar="MODEL",
        help="digits-cnn, a zoo name (resnet50, resnet152, densenet121, densenet201, "
        "inceptionv3, inceptionresnetv2, mobilenetv2) or a saved tf_keras model",
    )
    parser.add_argument(
        "--input-size",
        type=int,
        default=None,
        metavar="S",
        help="square input size for zoo models (default: the network's ImageNet size)",
    )
    parser.add_argument(
        "--num-classes", type=int, default=10, metavar="N", help="classifier width (default 10)"
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")


def _load(name: str, input_size: int | None, num_classes: int) -> Any:
    """The model, via the shared loader when this build has it, else the zoo or a file."""
    try:
        from converters.models import load_model
    except ImportError:
        load_model = None
    if load_model is not None:
        model, _ = load_model(name, input_size=input_size, num_classes=num_classes)
        return model
    from pathlib import Path

    from converters import zoo

    if name in zoo.names() or not Path(name).exists():
        model, _ = zoo.build(name, input_size=input_size, num_classes=num_classes)
        return model
    import tf_keras as keras

    return keras.models.load_model(name, compile=False)


def report(model: Any) -> dict[str, Any]:
    """The JSON document ``--json`` prints."""
    from converters._exceptions import UnsupportedLayer
    from converters.cuts import Analysis, check_supported

    analysis = Analysis(model)
    try:
        check_supported(model)
        unsupported = None
    except UnsupportedLayer as exc:
        unsupported = str(exc)
    return {
        "model": model.name,
        "input_shape": [int(d) for d in model.input_shape[1:]],
        "output_shape": [int(d) for d in model.output_shape[1:]],
        "params": analysis.total_params,
        "flops": analysis.total_flops,
        "flops_note": "approximate forward FLOPs per sample, a multiply-add counted as 2",
        "bytes_note": "bytes per sample of the cut tensor at float32",
        "unsupported": unsupported,
        "cuts": [c.to_json() for c in analysis.cuts()],
    }


def _shape(shape: list[int]) -> str:
    return "x".join(str(d) for d in shape)


def format_table(doc: dict[str, Any]) -> str:
    cuts = doc["cuts"]
    width = max([len("layer"), *(len(c["layer"]) for c in cuts)])
    shape_w = max([len("shape"), *(len(_shape(c["shape"])) for c in cuts)])
    head = (
        f"{doc['model']}: input {_shape(doc['input_shape'])}, output {_shape(doc['output_shape'])}, "
        f"{doc['params']:,} params, {doc['flops'] / 1e6:,.1f} MFLOPs/sample, {len(cuts)} valid cuts"
    )
    lines = [
        head,
        f"{'pos':>4}  {'layer':<{width}}  {'shape':<{shape_w}}  {'KiB/sample':>10}  "
        f"{'params A | rest':>25}  {'MFLOPs A | rest':>21}",
    ]
    digits = 1 if doc["flops"] >= 1e8 else 3  # small models would read 0.0 everywhere
    for c in cuts:
        params = f"{c['params_before']:>11,} | {c['params_after']:<11,}"
        flops = f"{c['flops_before'] / 1e6:>9.{digits}f} | {c['flops_after'] / 1e6:<9.{digits}f}"
        lines.append(
            f"{c['position']:>4}  {c['layer']:<{width}}  {_shape(c['shape']):<{shape_w}}  "
            f"{c['bytes_per_sample'] / 1024:>10.1f}  {params:>25}  {flops:>21}"
        )
    lines.append("FLOPs: approximate forward FLOPs per sample, a multiply-add counted as 2.")
    return "\n".join(line.rstrip() for line in lines)


def run(args: argparse.Namespace) -> int:
    model = _load(args.model, args.input_size, args.num_classes)
    doc = report(model)
    if args.json:
        print(json.dumps(doc, indent=2))
    else:
        print(format_table(doc))
    if doc["unsupported"]:
        print(f"spliteasy cuts: warning: {doc['unsupported']}", file=sys.stderr)
    return 0
