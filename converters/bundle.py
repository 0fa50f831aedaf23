"""Write a bundle: the sliced model, every runtime's artefacts, the report, the manifest.

The bundle is assembled in a temporary directory beside the target and renamed into
place only once B has been verified, so a failed conversion never leaves a bundle that
looks usable. Exporters for optional runtimes (TF.js, TFLite) are imported only when
asked for.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from shared_schema import (
    MANIFEST_FILE,
    AdamSpec,
    Artifact,
    LossSpec,
    Manifest,
    SGDSpec,
    SliceSpec,
    sha256_tree,
)

from . import __version__
from ._exceptions import ConverterError, InvalidCut
from .export.onnx_torch import export_server_slice
from .slicing import Slices, slice_model
from .verify import verify_server_slice

RUNTIMES = ("tf", "tfjs", "tflite")
REPORT_FILE = "report.json"
# The unsplit model's tf_keras config (architecture only): ``spliteasy export`` rebuilds
# the whole network from it and fills every variable from the trained A, B and C.
UNSPLIT_CONFIG = "unsplit/model.json"


def _artifact(root: Path, rel: str, fmt: str, runtime: str) -> Artifact:
    digest, size = sha256_tree(root / rel)
    return Artifact(path=rel, format=fmt, runtime=runtime, sha256=digest, bytes=size)


def _save_savedmodel(model, path: Path) -> None:
    """A tf_keras SavedModel without per-layer traces, plus its serving signature.

    Every layer spliteasy carries is a built-in class (``cuts.check_supported``), so
    ``load_model`` revives each one from its config and the traced call functions are
    never used; tracing them is most of a save (DenseNet201's A: 21 s, without: 4 s).
    The serving signature is the one tf_keras writes by default, traced once.
    """
    import tensorflow as tf

    spec = tf.TensorSpec(model.inputs[0].shape, model.inputs[0].dtype, name=model.input_names[0])
    serve = tf.function(lambda x: {model.output_names[0]: model(x, training=False)})
    model.save(
        path,
        save_format="tf",
        include_optimizer=False,
        save_traces=False,
        signatures={"serving_default": serve.get_concrete_function(spec)},
    )


def _export_device_slice(
    model, name: str, root: Path, runtimes: Sequence[str], loss: LossSpec, optimizer
) -> list[Artifact]:
    d = root / name
    d.mkdir(parents=True)
    _save_savedmodel(model, d / "savedmodel")
    model.save_weights(d / "weights.h5")
    arts = [
        _artifact(root, f"{name}/savedmodel", "savedmodel", "tf"),
        _artifact(root, f"{name}/weights.h5", "keras_weights", "tf"),
    ]
    if "tfjs" in runtimes:
        from .export.tfjs import export_tfjs

        export_tfjs(model, d / "tfjs")
        arts.append(_artifact(root, f"{name}/tfjs", "tfjs_layers", "tfjs"))
    if "tflite" in runtimes:
        from .export.tflite import export_tflite

        export_tflite(model, d / "model.tflite", role=name, loss=loss, optimizer=optimizer)
        arts.append(_artifact(root, f"{name}/model.tflite", "tflite", "tflite"))
    return arts


def _write_unsplit_config(model, slices: Slices, root: Path) -> dict:
    """Store the unsplit architecture, after checking the slices cover it exactly.

    Export maps every variable of the unsplit model to the one slice that holds it (by
    ``layer/variable`` name, which slicing keeps); a variable no slice holds, or one two
    slices hold, would make the trained model unrecoverable, so it is refused here, at
    conversion time, rather than at the end of a training run.
    """
    from shared_schema.naming import named_variables

    full = named_variables(model)
    held: dict[str, str] = {}
    for name, part in (("A", slices.a), ("B", slices.b), ("C", slices.c)):
        for key in named_variables(part) if part is not None else {}:
            if key in held:
                raise ConverterError(f"variable {key} is held by slices {held[key]} and {name}")
            held[key] = name
    missing = sorted(set(full) - set(held))
    extra = sorted(set(held) - set(full))
    if missing or extra or len(full) != len(model.weights):
        raise ConverterError(
            "the slices do not hold exactly the model's variables "
            f"(missing {missing[:5]}, unknown {extra[:5]}); the trained model could not be exported"
        )
    path = root / UNSPLIT_CONFIG
    path.parent.mkdir(parents=True)
    path.write_text(model.to_json(indent=1) + "\n")
    return {
        "config": UNSPLIT_CONFIG,
        "layers": len(model.layers),
        "variables": len(full),
        "params": int(model.count_params()),
    }


def _slice_spec(name, side, model, inputs, outputs, arts) -> SliceSpec:
    return SliceSpec(
        name=name,
        side=side,
        inputs=inputs,
        outputs=outputs,
        first_layer=model.layers[1].name if len(model.layers) > 1 else model.layers[0].name,
        last_layer=model.layers[-1].name,
        num_params=int(model.count_params()),
        artifacts=arts,
    )


def write_bundle(
    model,
    cut_names: Sequence[str],
    out_dir: Path | str,
    *,
    model_name: str,
    optimizer: SGDSpec | AdamSpec,
    from_logits: bool = True,
    loss: LossSpec | None = None,
    runtimes: Sequence[str] = ("tf",),
    overwrite: bool = False,
    seed: int = 0,
    forward_tol: float = 1e-4,
    grad_tol: float = 1e-4,
) -> Manifest:
    """Slice ``model`` at ``cut_names`` and write a verified bundle to ``out_dir``.

    ``loss`` (``converters.losses``) is what the label holder trains with; without it, the
    sparse categorical cross-entropy with ``from_logits``.
    """
    out_dir = Path(out_dir)
    unknown = [r for r in runtimes if r not in RUNTIMES]
    if unknown:
        raise ConverterError(f"unknown runtime(s) {unknown}; choose from {', '.join(RUNTIMES)}")
    if "tf" not in runtimes:
        runtimes = ("tf", *runtimes)
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise ConverterError(f"{out_dir} exists and is not empty (use --force to replace it)")
    started = time.perf_counter()
    slices: Slices = slice_model(model, list(cut_names))
    if not slices.b.trainable_weights:
        raise InvalidCut(
            f"slice B ({', '.join(layer.name for layer in slices.b.layers[1:])}) holds no trainable "
            "parameters: the server would train nothing; move the cuts apart"
        )
    loss = loss if loss is not None else LossSpec(from_logits=from_logits)
    if len(slices.output.shape) != 2:
        raise ConverterError(
            f"the model's output has shape {slices.output.shape}; the {loss.name} loss needs "
            "a (batch, units) output"
        )
    labels = loss.labels_spec(slices.output, slices.labels.name)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        server_out = slices.cuts[1] if slices.c is not None else slices.output
        exported = export_server_slice(slices.b, slices.cuts[0], server_out, tmp / "B", seed=seed)
        report = verify_server_slice(
            slices.b,
            exported.module,
            exported.spec,
            slices.cuts[0],
            server_out,
            forward_tol=forward_tol,
            grad_tol=grad_tol,
            seed=seed,
        )
        b_arts = [
            _artifact(tmp, "B/model.onnx", "onnx", "onnx"),
            _artifact(tmp, "B/weights.safetensors", "torch_safetensors", "torch"),
            _artifact(tmp, "B/torch_spec.json", "torch_spec", "torch"),
        ]
        a_arts = _export_device_slice(slices.a, "A", tmp, runtimes, loss, optimizer)
        specs = [
            _slice_spec(
                "A", "device", slices.a, [slices.input.name], [slices.cuts[0].name], a_arts
            ),
            _slice_spec("B", "server", slices.b, [slices.cuts[0].name], [server_out.name], b_arts),
        ]
        if slices.c is not None:
            c_arts = _export_device_slice(slices.c, "C", tmp, runtimes, loss, optimizer)
            specs.append(
                _slice_spec(
                    "C", "device", slices.c, [slices.cuts[1].name], [slices.output.name], c_arts
                )
            )
        unsplit = _write_unsplit_config(model, slices, tmp)
        torch_nodes: dict[str, int] = {}
        for node in exported.module.graph.nodes:
            if node.op == "call_module":
                kind = type(exported.module.get_submodule(node.target)).__name__
                torch_nodes[kind] = torch_nodes.get(kind, 0) + 1
        report_doc = {
            "model": model_name,
            "split_mode": slices.split_mode,
            "cuts": [c.model_dump() for c in slices.cuts],
            "bytes_per_sample": {c.name: c.bytes_per_sample for c in slices.cuts},
            "params": {s.name: s.num_params for s in specs},
            "verification": report.to_dict(),
            "tolerances": {"forward": forward_tol, "gradient": grad_tol},
            "onnx_nodes": exported.onnx_nodes,
            "torch_modules": torch_nodes,
            "runtimes": list(runtimes),
            "unsplit": unsplit,
            "seconds": round(time.perf_counter() - started, 2),
        }
        (tmp / REPORT_FILE).write_text(json.dumps(report_doc, indent=2) + "\n")
        manifest = Manifest(
            model=model_name,
            spliteasy_version=__version__,
            split_mode=slices.split_mode,
            label_holder="device" if slices.c is not None else "server",
            input=slices.input,
            labels=labels,
            output=slices.output,
            cuts=slices.cuts,
            slices=specs,
            loss=loss,
            optimizer=optimizer,
            num_classes=int(slices.output.shape[1]),
            artifacts=[
                _artifact(tmp, REPORT_FILE, "report", "any"),
                _artifact(tmp, UNSPLIT_CONFIG, "keras_config", "tf"),
            ],
        )
        (tmp / MANIFEST_FILE).write_text(manifest.to_json())
        if out_dir.exists():
            shutil.rmtree(out_dir)
        tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest
