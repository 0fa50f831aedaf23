"""The device slices run by the TFLite interpreter (Flex delegate for TF ops).

Each slice is one ``.tflite`` file written by ``converters.export.tflite``: its state
(weights, BN statistics, optimizer slots, step count) lives in resource variables
inside the interpreter, and every operation is a signature. This runtime only feeds
signatures and checks what goes in, so a wrong shape, dtype, label or a non-finite
number is refused with a message before the interpreter sees it: TFLite itself would
either abort with an opaque op error or, worse, train on it.

The interpreter is not thread-safe; one runtime serves one step loop.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np

from device_tf._exceptions import DeviceError
from device_tf.runtime import DeviceRuntime, RuntimeState, state_mismatch
from shared_schema import Manifest, load_manifest


class TFLiteRuntimeError(DeviceError):
    """The TFLite device cannot do what was asked (bad file, bad input, failed op)."""


class TFLiteInputError(TFLiteRuntimeError, ValueError):
    """An input does not match what the slice's signature takes."""


_REQUIRED = {
    "A": ("forward_train", "train", "infer", "variable_names", "weights", "save", "restore"),
    "C": ("train", "infer", "variable_names", "weights", "save", "restore"),
}


class TFLiteSlice:
    """One slice's interpreter and its signature runners, with input checking."""

    def __init__(self, path: Path | str, role: str, num_threads: int | None = None) -> None:
        import tensorflow as tf

        self.path = Path(path)
        self.role = role
        if not self.path.is_file():
            raise TFLiteRuntimeError(f"slice {role}: no TFLite model at {self.path}")
        try:
            with warnings.catch_warnings():
                # tf.lite.Interpreter warns that TF 2.20 drops it; 2.19 is pinned for Flex.
                warnings.simplefilter("ignore", UserWarning)
                self.interpreter = tf.lite.Interpreter(
                    model_path=str(self.path), num_threads=num_threads
                )
        except (ValueError, RuntimeError) as exc:
            raise TFLiteRuntimeError(
                f"slice {role}: {self.path} is not a TFLite model: {exc}"
            ) from exc
        available = self.interpreter.get_signature_list()
        missing = [s for s in _REQUIRED[role] if s not in available]
        if missing:
            raise TFLiteRuntimeError(
                f"slice {role}: {self.path} is not a spliteasy TFLite slice {role} "
                f"(missing signatures {missing}; has {sorted(available)})"
            )
        self.runners = {s: self.interpreter.get_signature_runner(s) for s in _REQUIRED[role]}
        self.inputs = {s: r.get_input_details() for s, r in self.runners.items()}
        self.outputs = {s: r.get_output_details() for s, r in self.runners.items()}
        self.names = [n.decode() for n in self.call("variable_names")["names"]]

    def output_shape(self, signature: str, name: str) -> list[int]:
        """Declared shape of an output, -1 for the free batch dimension."""
        return [int(d) for d in self.outputs[signature][name]["shape_signature"]]

    def input_shape(self, signature: str, name: str) -> list[int]:
        return [int(d) for d in self.inputs[signature][name]["shape_signature"]]

    def call(self, signature: str, finite: bool = False, **arrays: Any) -> dict[str, np.ndarray]:
        feed = {}
        batch = None
        for name, details in self.inputs[signature].items():
            if name not in arrays:
                raise TFLiteInputError(f"slice {self.role} {signature}: missing input {name!r}")
            value = self._coerce(signature, name, arrays[name], details)
            if value.ndim and batch is not None and value.shape[0] != batch:
                raise TFLiteInputError(
                    f"slice {self.role} {signature}: {name} has batch {value.shape[0]}, "
                    f"the other inputs have {batch}"
                )
            if value.ndim:
                batch = value.shape[0]
            if finite and value.dtype.kind == "f" and not np.isfinite(value).all():
                raise TFLiteInputError(
                    f"slice {self.role} {signature}: {name} contains NaN or infinity; "
                    "refusing to train on it"
                )
            feed[name] = value
        try:
            out = self.runners[signature](**feed)
        except (RuntimeError, ValueError) as exc:
            raise TFLiteRuntimeError(f"slice {self.role} {signature} failed: {exc}") from exc
        return {k: np.array(v, copy=True) for k, v in out.items()}

    def _coerce(self, signature: str, name: str, value: Any, details: dict) -> np.ndarray:
        where = f"slice {self.role} {signature}: {name}"
        dtype = np.dtype(details["dtype"])
        if dtype.kind in "SUO":  # a string (checkpoint path)
            if not isinstance(value, str | bytes):
                raise TFLiteInputError(f"{where} must be a string")
            # Must be numpy bytes: an object array hands TFLite a pointer, not the string.
            return np.array(value.encode() if isinstance(value, str) else value, dtype=np.bytes_)
        arr = np.asarray(value)
        ok = {"f": "f", "i": "iu"}[dtype.kind]
        if arr.dtype.kind not in ok:
            raise TFLiteInputError(f"{where} must be {dtype.name}, got {arr.dtype.name}")
        if (
            dtype.kind == "i"
            and arr.size
            and (arr.min() < np.iinfo(dtype).min or arr.max() > np.iinfo(dtype).max)
        ):
            raise TFLiteInputError(f"{where}: values do not fit {dtype.name}")
        expected = [int(d) for d in details["shape_signature"]]
        got = list(arr.shape)
        if len(got) != len(expected) or any(
            e != -1 and e != g for e, g in zip(expected, got, strict=False)
        ):
            shown = ["None" if d == -1 else str(d) for d in expected]
            raise TFLiteInputError(f"{where} has shape {tuple(got)}, expected ({', '.join(shown)})")
        if got and got[0] == 0:
            raise TFLiteInputError(f"{where} is an empty batch")
        return np.ascontiguousarray(arr, dtype=dtype)

    def weights(self) -> dict[str, np.ndarray]:
        out = self.call("weights")
        return {name: out[f"w{i:03d}"] for i, name in enumerate(self.names)}

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.call("save", checkpoint_path=str(path))

    def restore(self, path: Path) -> None:
        if not path.is_file():
            raise TFLiteRuntimeError(f"slice {self.role}: no checkpoint at {path}")
        self.call("restore", checkpoint_path=str(path))

    # The ``save`` signature writes a TF (V1 table) checkpoint with the names
    # ``model/<layer>/<var>``, ``opt/<layer>/<var>/<slot>`` and ``opt/step``; the device
    # state uses ``<slice>/<layer>/<var>[/<slot>]`` and ``<slice>/iterations`` instead.
    def _to_state_name(self, name: str) -> tuple[str, str]:
        if name == "opt/step":
            return "optimizer", f"{self.role}/iterations"
        group, _, rest = name.partition("/")
        return ("slices" if group == "model" else "optimizer"), f"{self.role}/{rest}"

    def _from_state_name(self, name: str, group: str) -> str:
        rest = name.split("/", 1)[1]
        if group == "optimizer":
            return "opt/step" if rest == "iterations" else f"opt/{rest}"
        return f"model/{rest}"

    def state(self, scratch: Path) -> dict[str, dict[str, np.ndarray]]:
        """Every variable, slot and the step count through the ``save`` signature."""
        import tensorflow as tf

        path = scratch / f"{self.role}.ckpt"
        self.save(path)
        reader = tf.train.load_checkpoint(str(path))
        out: dict[str, dict[str, np.ndarray]] = {"slices": {}, "optimizer": {}}
        for name in reader.get_variable_to_dtype_map():
            group, key = self._to_state_name(name)
            out[group][key] = np.array(reader.get_tensor(name))
        return out

    def checkpoint_of(self, slices: dict, optimizer: dict, scratch: Path) -> Path:
        """Write this slice's part of a state as the checkpoint ``restore`` reads, after
        checking every name and shape against the slice; returns its path."""
        import tensorflow as tf

        current = self.state(scratch)
        names, data = [], []
        for group, given in (("slices", slices), ("optimizer", optimizer)):
            mine = {k: v for k, v in given.items() if k.split("/", 1)[0] == self.role}
            have = current[group]
            why = state_mismatch({k: tuple(v.shape) for k, v in have.items()}, mine)
            if why is not None:
                raise TFLiteRuntimeError(
                    f"slice {self.role}: the saved state does not fit this slice ({why})"
                )
            for key, value in mine.items():
                value = np.asarray(value)
                names.append(self._from_state_name(key, group))
                data.append(tf.constant(value.astype(have[key].dtype)))
        path = scratch / f"{self.role}-load.ckpt"
        tf.raw_ops.Save(filename=str(path), tensor_names=names, data=data)
        return path


class TFLiteRuntime(DeviceRuntime):
    """Slices A (and C in a double split) as TFLite training models.

    ``a_backward`` recomputes A's forward pass inside the ``train`` signature from the
    ``x`` remembered by ``a_forward``; see ``converters.export.tflite`` for why BN
    moving statistics and all other state change only there.
    """

    name = "tflite"

    def __init__(
        self, a_path: Path | str, c_path: Path | str | None = None, num_threads: int | None = None
    ) -> None:
        self.a = TFLiteSlice(a_path, "A", num_threads)
        self.c = TFLiteSlice(c_path, "C", num_threads) if c_path is not None else None
        self._pending_x: np.ndarray | None = None
        self._pending_a_shape: tuple[int, ...] | None = None
        self.num_classes = self.c.output_shape("infer", "y")[-1] if self.c else None

    @classmethod
    def from_bundle(
        cls, bundle: Path | str, manifest: Manifest | None = None, num_threads: int | None = None
    ) -> TFLiteRuntime:
        """The bundle's ``tflite`` artefacts of A (and C in a double split)."""
        bundle = Path(bundle)
        manifest = manifest or load_manifest(bundle)
        paths = []
        for name in ["A", "C"] if manifest.split_mode == "double" else ["A"]:
            arts = [a for a in manifest.slice(name).artifacts if a.format == "tflite"]
            if not arts:
                raise TFLiteRuntimeError(
                    f"bundle {bundle} has no TFLite model for slice {name}: convert it with "
                    "--runtimes including tflite"
                )
            paths.append(bundle / arts[0].path)
        return cls(paths[0], paths[1] if len(paths) > 1 else None, num_threads)

    def _need_c(self) -> TFLiteSlice:
        if self.c is None:
            raise TFLiteRuntimeError("this runtime holds slice A only (single split): no slice C")
        return self.c

    def a_forward(self, x: np.ndarray) -> np.ndarray:
        a = self.a.call("forward_train", finite=True, x=x)["a"]
        # float32 inputs, or int32 token ids (A's train signature takes the model's dtype)
        self._pending_x = np.ascontiguousarray(
            x, dtype=np.int32 if np.issubdtype(np.asarray(x).dtype, np.integer) else np.float32
        )
        self._pending_a_shape = a.shape
        return a

    def a_backward(self, upstream_grad: np.ndarray) -> None:
        if self._pending_x is None:
            raise TFLiteRuntimeError("a_backward without a preceding a_forward")
        g = np.asarray(upstream_grad)
        if g.shape != self._pending_a_shape:
            raise TFLiteInputError(
                f"slice A train: upstream_grad has shape {g.shape}, the last a_forward "
                f"produced {self._pending_a_shape}"
            )
        self.a.call("train", finite=True, x=self._pending_x, upstream_grad=g)
        self._pending_x = self._pending_a_shape = None

    def c_train(self, cut_activations: np.ndarray, labels: np.ndarray) -> tuple[float, np.ndarray]:
        c = self._need_c()
        y = np.asarray(labels)
        if y.dtype.kind in "iu" and y.size and (y.min() < 0 or y.max() >= self.num_classes):
            raise TFLiteInputError(
                f"slice C train: labels must lie in [0, {self.num_classes}), "
                f"got values from {y.min()} to {y.max()}"
            )
        out = c.call("train", finite=True, b=cut_activations, labels=y)
        return float(out["loss"]), out["grad_b"]

    def a_infer(self, x: np.ndarray) -> np.ndarray:
        return self.a.call("infer", x=x)["a"]

    def c_infer(self, cut_activations: np.ndarray) -> np.ndarray:
        return self._need_c().call("infer", b=cut_activations)["y"]

    def weights(self) -> dict[str, dict[str, np.ndarray]]:
        """{"A": {"layer/variable": array}, "C": ...}, named like ``keras_util.named_variables``."""
        out = {"A": self.a.weights()}
        if self.c is not None:
            out["C"] = self.c.weights()
        return out

    def state(self) -> RuntimeState:
        import tempfile

        out = RuntimeState()
        with tempfile.TemporaryDirectory(prefix="spliteasy-tflite-") as tmp:
            for s in (self.a, self.c):
                if s is not None:
                    part = s.state(Path(tmp))
                    out.slices.update(part["slices"])
                    out.optimizer.update(part["optimizer"])
        return out

    def load_state(self, state: RuntimeState) -> None:
        import tempfile

        roles = {"A"} | ({"C"} if self.c is not None else set())
        foreign = {k.split("/", 1)[0] for k in [*state.slices, *state.optimizer]} - roles
        if foreign:
            raise TFLiteRuntimeError(
                f"the saved state has slices {sorted(foreign)} this runtime lacks"
            )
        held = [s for s in (self.a, self.c) if s is not None]
        with tempfile.TemporaryDirectory(prefix="spliteasy-tflite-") as tmp:
            # every slice's part is checked and written before any slice is restored
            paths = [s.checkpoint_of(state.slices, state.optimizer, Path(tmp)) for s in held]
            for s, path in zip(held, paths, strict=True):
                s.restore(path)
        self._pending_x = self._pending_a_shape = None

    def save(self, directory: Path | str) -> None:
        """Checkpoint every variable (incl. optimizer slots) to ``directory/{A,C}.ckpt``."""
        directory = Path(directory)
        self.a.save(directory / "A.ckpt")
        if self.c is not None:
            self.c.save(directory / "C.ckpt")

    def restore(self, directory: Path | str) -> None:
        directory = Path(directory)
        slices = [(self.a, directory / "A.ckpt")]
        if self.c is not None:
            slices.append((self.c, directory / "C.ckpt"))
        for s, path in slices:  # check both before touching either
            if not path.is_file():
                raise TFLiteRuntimeError(f"slice {s.role}: no checkpoint at {path}")
        for s, path in slices:
            s.restore(path)
        self._pending_x = self._pending_a_shape = None
