"""The trained model out: one ordinary, unsplit tf_keras model from a split training run.

Training leaves its result in two places: B's torch ``state_dict`` in the server's newest
checkpoint (``<server-state>/ckpt-*/b.safetensors``) and A's and C's variables in the
device's snapshot (``<device-state>/latest/slices.safetensors``, keys ``A/<layer>/<var>``).
Export rebuilds the whole network from the architecture conversion stored in the bundle
(``unsplit/model.json``) and fills every one of its variables:

- A and C by name: slicing keeps layer names, so ``A/a_conv/kernel`` is the unsplit
  model's ``a_conv/kernel`` (``shared_schema.naming.named_variables``);
- B through the correspondence conversion found by probing (``B/torch_spec.json``,
  ``VariableSpec.to_keras``: torch tensor -> Keras axis order and shape). BatchNorm's
  ``running_var`` needs no conversion: ``KerasBatchNorm`` accumulates exactly Keras'
  ``moving_variance`` (Keras' momentum and its biased/unbiased rule), and inference on
  both sides divides by ``sqrt(var + epsilon)``.

Every variable must be filled exactly once, with its shape; anything else is an error
naming the variable, never a model with a silently initial weight. The export then
checks itself: split inference (A, C in TF from the bundle's slices; B in torch,
inference mode, exactly as the server's ``Trainer.infer``) against the exported model on
a probe batch, recorded in ``export.json``.

State from another bundle is refused (both state dirs record the manifest's sha256), and
so is a pair of states that do not hold the same training step: B from step 120 with
A/C from step 130 is not a model anyone trained.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from shared_schema import Manifest, load_manifest, manifest_digest, sha256_tree

from .._exceptions import ConverterError

FORMATS = ("savedmodel", "tflite", "tfjs")
EXPORT_FILE = "export.json"
TFLITE_FILE = "model.tflite"
TFJS_DIR = "tfjs"
DEFAULT_TOL = 1e-5


class ExportError(ConverterError):
    """The trained model cannot be exported faithfully (names what is wrong)."""


@dataclass
class ServerState:
    """B's weights from the newest valid server checkpoint."""

    b: dict[str, np.ndarray]  # torch state_dict names -> arrays
    steps: int  # B's optimizer steps
    sessions: dict[str, int]  # session id -> next_step held by the checkpoint
    path: Path
    created: str | None = None


@dataclass
class DeviceState:
    """A's and C's variables from one device snapshot."""

    weights: dict[str, np.ndarray]  # "A/<layer>/<var>" -> array
    step: int  # training steps the snapshot holds
    session_id: str | None
    path: Path
    candidates: list[DeviceState] = field(default_factory=list, repr=False)


@dataclass
class ExportResult:
    out: Path
    files: dict[str, str]  # relative path -> sha256
    verification: dict[str, Any]
    record: dict[str, Any]


# -- reading state ----------------------------------------------------------------------


def _safetensors(data: bytes) -> dict[str, np.ndarray]:
    from safetensors.numpy import load

    return dict(load(data))


def _check_owner(where: Path, recorded: str | None, digest: str) -> None:
    if recorded is None:
        return
    if recorded != digest:
        raise ExportError(
            f"{where} holds state of another bundle (manifest sha256 {recorded[:12]}), "
            f"not of this bundle ({digest[:12]}); pass the state dirs of this bundle's run"
        )


def load_server_state(state_dir: Path | str, manifest_sha256: str) -> ServerState:
    """The newest intact checkpoint of ``spliteasy serve --state-dir`` (torn ones skipped)."""
    from shared_schema.durable import Series

    state_dir = Path(state_dir)
    if not state_dir.is_dir():
        raise ExportError(f"server state {state_dir}: no such directory")
    bundle_file = state_dir / "bundle.json"
    if bundle_file.is_file():
        _check_owner(
            state_dir, json.loads(bundle_file.read_text()).get("manifest_sha256"), manifest_sha256
        )
    entry = Series(state_dir, prefix="ckpt-").newest()
    if entry is None:
        raise ExportError(
            f"server state {state_dir} holds no intact checkpoint (ckpt-*/); a server writes "
            "one every --checkpoint-every steps and when it is stopped (Ctrl-C or SIGTERM)"
        )
    try:
        state = json.loads(entry.files["state.json"])
        _check_owner(entry.path, state["manifest_sha256"], manifest_sha256)
        b = _safetensors(entry.files["b.safetensors"])
        sessions = {str(s["id"]): int(s["next_step"]) for s in state.get("sessions", [])}
        steps = int(state["steps"])
    except (KeyError, TypeError, ValueError) as exc:
        raise ExportError(f"{entry.path}: unreadable checkpoint ({exc})") from None
    return ServerState(b, steps, sessions, entry.path, state.get("created"))


def _read_snapshot(path: Path) -> tuple[dict[str, np.ndarray], int, dict]:
    from shared_schema.durable import read_dir

    files = read_dir(path)
    try:
        progress = json.loads(files["progress.json"])
        return _safetensors(files["slices.safetensors"]), int(progress["step"]), progress
    except (KeyError, TypeError, ValueError) as exc:
        raise ExportError(f"{path}: unreadable device snapshot ({exc})") from None


def load_device_state(state_dir: Path | str, manifest_sha256: str) -> DeviceState:
    """The device's ``latest/`` snapshot (and ``durable/`` as an alternative candidate)."""
    from shared_schema.durable import CorruptState

    state_dir = Path(state_dir)
    if not state_dir.is_dir():
        raise ExportError(f"device state {state_dir}: no such directory")
    session_id = None
    session_file = state_dir / "session.json"
    if session_file.is_file():  # device_tf.state: the run's settings under "run"
        doc = json.loads(session_file.read_text())
        recorded = doc.get("manifest_sha256") or (doc.get("run") or {}).get("manifest_sha256")
        _check_owner(state_dir, recorded, manifest_sha256)
        session_id = doc.get("session_id")
    found: list[DeviceState] = []
    problems: list[str] = []
    for name in ("latest", "durable"):
        if not (state_dir / name).exists():
            continue
        try:
            weights, step, progress = _read_snapshot(state_dir / name)
        except CorruptState as exc:
            problems.append(str(exc))
            continue
        _check_owner(state_dir / name, progress.get("manifest_sha256"), manifest_sha256)
        found.append(DeviceState(weights, step, session_id, state_dir / name))
    if not found:
        detail = f" ({'; '.join(problems)})" if problems else ""
        raise ExportError(
            f"device state {state_dir} holds no intact snapshot (latest/ or durable/){detail}"
        )
    found[0].candidates = found
    return found[0]


def pair_states(
    server: ServerState, device: DeviceState, allow_step_mismatch: bool = False
) -> tuple[DeviceState, str | None]:
    """The device snapshot that holds the same training step as the server checkpoint.

    With the device's session in the checkpoint, its ``next_step`` there is the step count
    both must hold (``latest/`` or the ``durable/`` snapshot the device kept for exactly
    this case). A session the checkpoint no longer lists (closed at the end of the run)
    is matched by B's step count, which equals the device's when one device trained.
    Returns the snapshot and a warning (only with ``allow_step_mismatch``).
    """
    candidates = device.candidates or [device]
    if device.session_id is not None and device.session_id in server.sessions:
        want, what = server.sessions[device.session_id], "its session's next step"
    else:
        want, what = server.steps, "B's step count"
    for cand in candidates:
        if cand.step == want:
            return cand, None
    held = ", ".join(f"{c.path.name}/ at step {c.step}" for c in candidates)
    msg = (
        f"the server checkpoint {server.path.name} holds step {want} ({what}), the device "
        f"state holds {held}: they are not one trained model. Stop the server (it writes a "
        "checkpoint on Ctrl-C/SIGTERM) after the device has finished, then export"
    )
    if not allow_step_mismatch:
        raise ExportError(msg + " (or pass --allow-step-mismatch)")
    return candidates[0], msg


# -- assembling the model ---------------------------------------------------------------


def _unsplit_config(bundle: Path, manifest: Manifest) -> str:
    arts = [a for a in manifest.artifacts if a.format == "keras_config"]
    if not arts:
        raise ExportError(
            f"bundle {bundle} does not hold the unsplit model (it was converted before "
            "spliteasy stored it); convert the model again with this version of "
            "'spliteasy convert' to export (training state cannot move across bundles)"
        )
    return (bundle / arts[0].path).read_text()


def keras_variables_of_b(bundle: Path | str, b_state: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """B's torch ``state_dict`` as Keras variables (``layer/var``, Keras layout)."""
    from server_torch.spec import TorchSpec

    spec = TorchSpec.load(Path(bundle) / "B")
    out: dict[str, np.ndarray] = {}
    for v in spec.variables:
        if v.torch not in b_state:
            raise ExportError(f"B's state has no tensor {v.torch} (Keras variable {v.keras})")
        value = b_state[v.torch]
        value = value.detach().cpu().numpy() if hasattr(value, "detach") else np.asarray(value)
        if int(np.prod(value.shape)) != int(np.prod(v.torch_shape)):
            raise ExportError(
                f"B's {v.torch} has shape {list(value.shape)}, the bundle says {v.torch_shape}"
            )
        out[v.keras] = v.to_keras(value)
    return out


def _flat_device(weights: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """``{"A": {"l/v": x}}`` (``DeviceRuntime.weights()``) or ``{"A/l/v": x}`` -> ``{"l/v": x}``."""
    out: dict[str, np.ndarray] = {}
    for key, value in weights.items():
        if isinstance(value, Mapping):
            out.update({k: np.asarray(v) for k, v in value.items()})
            continue
        part, _, name = key.partition("/")
        if part not in ("A", "C") or not name:
            raise ExportError(f"device state key {key!r} is not 'A/<layer>/<var>' or 'C/...'")
        out[name] = np.asarray(value)
    return out


def assemble(
    bundle: Path | str, b_state: Mapping[str, Any], device_weights: Mapping[str, Any]
) -> Any:
    """The unsplit tf_keras model with B's torch state and the device's A/C variables.

    ``b_state``: B's ``state_dict`` (torch tensors or arrays, torch names);
    ``device_weights``: ``{"A/<layer>/<var>": array}`` (a device snapshot) or
    ``DeviceRuntime.weights()``.
    """
    import tf_keras as keras

    from shared_schema.naming import named_variables

    bundle = Path(bundle)
    manifest = load_manifest(bundle, verify=False)
    model = keras.models.model_from_json(_unsplit_config(bundle, manifest))
    variables = named_variables(model)
    values = {**_flat_device(device_weights)}
    for name, value in keras_variables_of_b(bundle, b_state).items():
        if name in values:
            raise ExportError(f"variable {name} comes from both the device and B")
        values[name] = value
    missing = sorted(set(variables) - set(values))
    unknown = sorted(set(values) - set(variables))
    if missing or unknown:
        raise ExportError(
            f"the trained state does not fit the model: no value for {missing[:5]}"
            f"{' ...' if len(missing) > 5 else ''}, no variable for {unknown[:5]}"
            f"{' ...' if len(unknown) > 5 else ''}"
        )
    for name, var in variables.items():
        value = values[name]
        if tuple(value.shape) != tuple(var.shape):
            raise ExportError(
                f"variable {name}: state shape {list(value.shape)}, model {var.shape.as_list()}"
            )
        var.assign(value.astype(var.dtype.as_numpy_dtype, copy=False))
    return model


# -- split inference (the reference the export is checked against) ----------------------


class SplitInference:
    """A and C in TF (the bundle's slices with the device's weights), B in torch in
    inference mode through the server's own ``Trainer.infer``."""

    def __init__(
        self, bundle: Path | str, b_state: Mapping[str, Any], device_weights: Mapping[str, Any]
    ) -> None:
        import tf_keras as keras
        import torch

        from server_torch.rebuild import load_server_slice
        from server_torch.trainer import Trainer
        from shared_schema.naming import named_variables

        bundle = Path(bundle)
        self.manifest = load_manifest(bundle, verify=False)
        flat = _flat_device(device_weights)
        self.a = self.c = None
        for name in ("A", "C"):
            if name == "C" and self.manifest.split_mode != "double":
                continue
            path = bundle / self.manifest.slice(name).artifact("savedmodel").path
            model = keras.models.load_model(path, compile=False)
            for key, var in named_variables(model).items():
                if key not in flat:
                    raise ExportError(f"the device state has no {name}/{key}")
                var.assign(flat[key])
            setattr(self, name.lower(), model)
        module = load_server_slice(bundle, self.manifest)
        state = {
            k: torch.as_tensor(
                np.ascontiguousarray(v.detach().cpu().numpy() if hasattr(v, "detach") else v)
            )
            for k, v in b_state.items()
        }
        module.load_state_dict(state, strict=True)
        self.trainer = Trainer(module, self.manifest)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        a = self.a(x, training=False).numpy()
        b = self.trainer.infer(a)
        return self.c(b, training=False).numpy() if self.c is not None else b


def rel_err(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.linalg.norm(got - want) / max(float(np.linalg.norm(want)), 1e-30))


def probe_batch(manifest: Manifest, n: int = 16, seed: int = 0) -> np.ndarray:
    """Inputs for the self-check: uniform in [0, 1), the range image data is scaled to."""
    rng = np.random.default_rng(seed)
    return rng.uniform(0.0, 1.0, size=(n, *manifest.input.sample_shape)).astype(np.float32)


# -- writing ----------------------------------------------------------------------------


def _save_tflite(model: Any, path: Path) -> None:
    """An inference TFLite model (built-in ops; TF ops through Flex only where needed)."""
    import tensorflow as tf

    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    converter.target_spec.supported_ops = [
        tf.lite.OpsSet.TFLITE_BUILTINS,
        tf.lite.OpsSet.SELECT_TF_OPS,
    ]
    path.write_bytes(converter.convert())


def _tflite_outputs(path: Path, x: np.ndarray) -> np.ndarray:
    import tensorflow as tf

    interp = tf.lite.Interpreter(model_path=str(path))
    inp = interp.get_input_details()[0]
    interp.resize_tensor_input(inp["index"], list(x.shape))
    interp.allocate_tensors()
    interp.set_tensor(inp["index"], x)
    interp.invoke()
    return interp.get_tensor(interp.get_output_details()[0]["index"])


def _now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def parse_formats(formats: str | Iterable[str]) -> list[str]:
    items = formats.split(",") if isinstance(formats, str) else list(formats)
    chosen = [f.strip() for f in items if f.strip()]
    bad = [f for f in chosen if f not in FORMATS]
    if bad:
        raise ExportError(f"unknown format(s) {bad}; choose from {', '.join(FORMATS)}")
    return ["savedmodel", *[f for f in FORMATS[1:] if f in chosen]]


def _check_out(out: Path, keep: Mapping[str, Path | str]) -> None:
    """``--out`` (replaced with ``--force``) must not be, or hold, what export reads."""
    target = out.resolve()
    for what, path in keep.items():
        p = Path(path).resolve()
        if p == target or target in p.parents:
            raise ExportError(f"--out {out} would replace {what} ({path}); choose another")


def write_trained(
    bundle: Path | str,
    b_state: Mapping[str, Any],
    device_weights: Mapping[str, Any],
    out: Path | str,
    *,
    formats: str | Sequence[str] = ("savedmodel",),
    overwrite: bool = False,
    verify: bool = True,
    tol: float = DEFAULT_TOL,
    provenance: Mapping[str, Any] | None = None,
) -> ExportResult:
    """Write the unsplit trained model at ``out`` (a SavedModel directory), plus
    ``model.tflite`` and ``tfjs/`` inside it on request, and ``export.json``.

    The directory is assembled beside ``out`` and renamed into place, so a failed export
    never leaves something that looks like a model.
    """
    from converters.bundle import _save_savedmodel

    bundle, out = Path(bundle), Path(out)
    chosen = parse_formats(formats)
    _check_out(out, {"the bundle": bundle})
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise ExportError(f"{out} exists and is not empty (use --force to replace it)")
    manifest = load_manifest(bundle)
    model = assemble(bundle, b_state, device_weights)
    verification: dict[str, Any] = {}
    x = probe_batch(manifest)
    y = model(x, training=False).numpy()
    if verify:
        split = SplitInference(bundle, b_state, device_weights)(x)
        err = rel_err(y, split)
        verification = {"samples": int(len(x)), "split_vs_unsplit_rel_err": err, "tol": tol}
        if not err <= tol:
            raise ExportError(
                f"the exported model disagrees with split inference: relative error "
                f"{err:.2e} > {tol:.0e} on {len(x)} probe inputs"
            )
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        _save_savedmodel(model, tmp)  # the SavedModel *is* the export directory
        if "tflite" in chosen:
            _save_tflite(model, tmp / TFLITE_FILE)
            verification["tflite_rel_err"] = rel_err(_tflite_outputs(tmp / TFLITE_FILE, x), y)
        if "tfjs" in chosen:
            from .tfjs import export_tfjs

            export_tfjs(model, tmp / TFJS_DIR, training=False)
        files = {
            p.relative_to(tmp).as_posix(): sha256_tree(p)[0]
            for p in sorted(tmp.rglob("*"))
            if p.is_file()
        }
        record = {
            "format_version": 1,
            "created": _now_iso(),
            "model": manifest.model,
            "bundle": str(bundle.resolve()),
            "manifest_sha256": manifest_digest(bundle),
            "split_mode": manifest.split_mode,
            "input": manifest.input.model_dump(mode="json"),
            "output": manifest.output.model_dump(mode="json"),
            "from_logits": manifest.loss.from_logits,
            "formats": {
                "savedmodel": ".",
                **({"tflite": TFLITE_FILE} if "tflite" in chosen else {}),
                **({"tfjs": f"{TFJS_DIR}/model.json"} if "tfjs" in chosen else {}),
            },
            "verification": verification,
            **dict(provenance or {}),
            "files": files,
        }
        (tmp / EXPORT_FILE).write_text(json.dumps(record, indent=2) + "\n")
        if out.exists():
            shutil.rmtree(out) if out.is_dir() else out.unlink()
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return ExportResult(out, files, verification, record)


def export_trained(
    bundle: Path | str,
    server_state: Path | str,
    device_state: Path | str,
    out: Path | str,
    *,
    formats: str | Sequence[str] = ("savedmodel",),
    overwrite: bool = False,
    verify: bool = True,
    tol: float = DEFAULT_TOL,
    allow_step_mismatch: bool = False,
) -> ExportResult:
    """``spliteasy export``: the trained unsplit model from a run's two state dirs."""
    bundle = Path(bundle)
    formats = parse_formats(formats)  # a typo fails before anything is read
    _check_out(Path(out), {"the server state": server_state, "the device state": device_state})
    manifest = load_manifest(bundle)
    _unsplit_config(bundle, manifest)  # so does an old bundle
    digest = manifest_digest(bundle)
    server = load_server_state(server_state, digest)
    device, warning = pair_states(
        server, load_device_state(device_state, digest), allow_step_mismatch
    )
    provenance = {
        "server_checkpoint": {
            "path": str(server.path.resolve()),
            "steps": server.steps,
            "created": server.created,
        },
        "device_snapshot": {
            "path": str(device.path.resolve()),
            "step": device.step,
            "session_id": device.session_id,
        },
        **({"warning": warning} if warning else {}),
    }
    result = write_trained(
        bundle,
        server.b,
        device.weights,
        out,
        formats=formats,
        overwrite=overwrite,
        verify=verify,
        tol=tol,
        provenance=provenance,
    )
    return result
