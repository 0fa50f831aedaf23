"""TFLite training models for the device slices A and C.

A device that runs TFLite has no Keras and no optimizer: everything a step needs must
be inside the ``.tflite`` file as signatures over resource variables (TFLite's
on-device training pattern, Flex delegate for the TF ops). The file therefore holds
the slice's Keras variables, the optimizer's slot variables and a step counter, and
the optimizer update is written out with TF ops, following tf_keras' ``update_step``
formulas term by term so the device steps exactly as unsplit Keras training would:

- SGD: ``m = -g*lr + m*momentum``; ``w += m`` (Nesterov: ``w += -g*lr + m*momentum``).
  Like tf_keras, the slot exists even with momentum 0 (the formula then is plain SGD).
- Adam: ``alpha = lr*sqrt(1-b2^t)/(1-b1^t)``; ``m += (g-m)*(1-b1)``;
  ``v += (g^2-v)*(1-b2)``; ``w -= m*alpha/(sqrt(v)+eps)`` with ``t`` the step count.

The loss is tf_keras' own loss object (the manifest's: sparse or categorical or binary
cross-entropy, MSE, MAE; ``keras_loss_object``) traced into the graph, so its logits
shortcuts and clipping are Keras' and not a rewrite. C's ``labels`` input is int32 (N)
for the sparse cross-entropy, else float32 shaped like C's output.

Signatures (inputs -> outputs):

A: ``forward_train(x) -> a``         A(x) in training mode; changes no state
   ``train(x, upstream_grad) -> step`` recomputes A(x) in training mode, backprops
                                      dL/da, applies the update, updates BN moving stats
C: ``train(b, labels) -> loss, grad_b`` C forward, loss, dL/db, update, BN moving stats
both: ``infer(x|b) -> a|y``          inference mode
      ``variable_names() -> names``    spliteasy's ``layer/variable`` names (keras_util)
      ``weights() -> w000, w001, ...`` the variables, in the order of ``names``
      ``save(checkpoint_path)`` / ``restore(checkpoint_path)`` -> step
                                      every variable incl. optimizer slots and step counter

Why A's state changes only in ``train``: the step sends A(x) to the server before the
gradient returns, and ``train`` must recompute the forward pass anyway (a TFLite
signature cannot keep a tape across calls). Unsplit Keras updates BatchNorm moving
statistics once per step, so exactly one of the two passes may update them. It is
``train``: ``forward_train`` snapshots the non-trainable variables and puts them back.
That way a step abandoned after the forward pass (server down, bad reply) leaves the
device slice exactly as it was. The recomputation makes stochastic layers (Dropout,
noise) in A unsound: the mask would differ between the two passes, so they are refused.

The batch dimension stays free (``None``) unless ``batch_size`` is given; the Python
interpreter resizes inputs per call, so the last partial batch works too.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from converters._exceptions import ConverterError, UnsupportedLayer
from shared_schema import AdamSpec, LossSpec, SGDSpec
from shared_schema.layers import RANDOM_LAYERS, TFLITE_NOT_IN_A

if TYPE_CHECKING:
    import tf_keras

Role = Literal["A", "C"]

SIGNATURES: dict[str, tuple[str, ...]] = {
    "A": ("forward_train", "train", "infer", "variable_names", "weights", "save", "restore"),
    "C": ("train", "infer", "variable_names", "weights", "save", "restore"),
}

# Layers whose training-mode output is random: A's forward runs twice per step
# (shared_schema/layers.json, "random").
_STOCHASTIC = RANDOM_LAYERS


def export_tflite(
    model: tf_keras.Model,
    out_path: Path,
    role: Role,
    loss: LossSpec,
    optimizer: SGDSpec | AdamSpec,
    batch_size: int | None = None,
) -> None:
    """Write ``model`` (slice A or C, its current weights as the initial state) as a
    TFLite training model with the signatures listed in the module docstring."""
    import tensorflow as tf

    if role not in SIGNATURES:
        raise ConverterError(f"TFLite export is for device slices A and C, not {role!r}")
    if batch_size is not None and batch_size <= 0:
        raise ConverterError(f"batch_size must be positive, got {batch_size}")
    _check_model(model, role)
    module = _build_module(tf, model, role, loss, optimizer, batch_size)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="spliteasy-tflite-") as tmp:
        signatures = {
            name: getattr(module, name).get_concrete_function() for name in SIGNATURES[role]
        }
        tf.saved_model.save(module, tmp, signatures=signatures)
        converter = tf.lite.TFLiteConverter.from_saved_model(
            tmp, signature_keys=list(SIGNATURES[role])
        )
        converter.target_spec.supported_ops = [
            tf.lite.OpsSet.TFLITE_BUILTINS,
            tf.lite.OpsSet.SELECT_TF_OPS,
        ]
        converter.experimental_enable_resource_variables = True
        try:
            flatbuffer = converter.convert()
        except Exception as exc:  # the converter raises a zoo of internal types
            raise ConverterError(f"TFLite conversion of slice {role} failed: {exc}") from exc
    out_path.write_bytes(flatbuffer)


def _check_model(model: Any, role: Role) -> None:
    if len(model.inputs) != 1 or len(model.outputs) != 1:
        raise ConverterError(
            f"slice {role} must have one input and one output, has "
            f"{len(model.inputs)} and {len(model.outputs)}"
        )
    shape = model.inputs[0].shape
    if any(d is None for d in shape[1:]):
        raise ConverterError(
            f"slice {role} input {model.inputs[0].name} has unknown non-batch dimensions "
            f"{shape}; fix the spatial size"
        )
    allowed = ("float32", "int32") if role == "A" else ("float32",)  # int32: token ids
    if model.inputs[0].dtype.name not in allowed:
        raise ConverterError(
            f"slice {role} input must be {' or '.join(allowed)}, is {model.inputs[0].dtype.name}"
        )
    if role == "A":
        for layer in _all_layers(model):
            if type(layer).__name__ in _STOCHASTIC and getattr(layer, "rate", 1.0) != 0:
                cls = type(layer).__name__
                why = TFLITE_NOT_IN_A.get(cls, TFLITE_NOT_IN_A["Dropout"])
                raise UnsupportedLayer(f"layer {layer.name} ({cls}) in slice A: {why}")
    if model.outputs[0].shape.rank != 2 and role == "C":
        raise ConverterError(
            f"slice C must output (batch, units) for its loss, outputs {model.outputs[0].shape}"
        )


def _all_layers(model: Any) -> list[Any]:
    out = []
    for layer in model.layers:
        out.append(layer)
        if hasattr(layer, "layers"):
            out.extend(_all_layers(layer))
    return out


def keras_update(
    tf: Any, optimizer: SGDSpec | AdamSpec, var: Any, g: Any, slots: list[Any], t: Any, lr: Any
) -> None:
    """One tf_keras optimizer update of ``var`` (module docstring), in TF ops the TFLite
    converter keeps. ``slots``: [momentum] (SGD) or [m, v] (Adam); ``t``: the float32
    iteration count after this step. A function of its own so the golden vectors of
    tests/golden/math.json check it eagerly, without building a TFLite model."""
    if optimizer.name == "sgd":
        (m,) = slots
        momentum = tf.constant(optimizer.momentum, tf.float32)
        m.assign(-g * lr + m * momentum)
        if optimizer.nesterov:
            var.assign_add(-g * lr + m * momentum)
        else:
            var.assign_add(m)
        return
    m, v = slots
    b1, b2 = optimizer.beta_1, optimizer.beta_2
    beta_1_power = tf.pow(tf.constant(b1, tf.float32), t)
    beta_2_power = tf.pow(tf.constant(b2, tf.float32), t)
    alpha = lr * tf.sqrt(1 - beta_2_power) / (1 - beta_1_power)
    m.assign_add((g - m) * (1 - b1))
    v.assign_add((tf.square(g) - v) * (1 - b2))
    var.assign_sub((m * alpha) / (tf.sqrt(v) + optimizer.epsilon))


def _slot_name(var: Any) -> str:
    return var.name.split(":")[0]


def keras_loss_object(tf_keras: Any, loss: LossSpec) -> Any:
    """tf_keras' own loss object for the manifest's loss, traced into C's ``train``
    (the same classes the Python TF runtime uses: ``device_tf/losses.py``)."""
    classes = {
        "sparse_categorical_crossentropy": tf_keras.losses.SparseCategoricalCrossentropy,
        "categorical_crossentropy": tf_keras.losses.CategoricalCrossentropy,
        "binary_crossentropy": tf_keras.losses.BinaryCrossentropy,
    }
    if loss.name in classes:
        return classes[loss.name](from_logits=loss.from_logits)
    if loss.name == "mean_squared_error":
        return tf_keras.losses.MeanSquaredError()
    if loss.name == "mean_absolute_error":
        return tf_keras.losses.MeanAbsoluteError()
    raise ConverterError(f"TFLite: no train signature for loss {loss.name!r}")


def _build_module(
    tf: Any,
    model: Any,
    role: Role,
    loss: LossSpec,
    optimizer: SGDSpec | AdamSpec,
    batch_size: int | None,
) -> Any:
    import tf_keras

    from shared_schema.naming import named_variables

    names = named_variables(model)
    if len(names) != len(model.weights):
        raise ConverterError(
            f"slice {role}: its variables do not have unique layer/variable names "
            f"({len(names)} names for {len(model.weights)} variables)"
        )
    in_spec = tf.TensorSpec(
        [batch_size, *model.inputs[0].shape[1:]],
        model.inputs[0].dtype,  # float32, or int32 token ids into A's Embedding
        name="x" if role == "A" else "b",
    )
    out_shape = [batch_size, *model.outputs[0].shape[1:]]
    path_spec = tf.TensorSpec([], tf.string, name="checkpoint_path")
    loss_fn = keras_loss_object(tf_keras, loss)
    if loss.name == "sparse_categorical_crossentropy":
        labels_spec = tf.TensorSpec([batch_size], tf.int32, name="labels")
    else:  # one-hot, binary / multi-label or regression targets, shaped like C's output
        labels_spec = tf.TensorSpec(out_shape, tf.float32, name="labels")

    class SliceModule(tf.Module):
        def __init__(self) -> None:
            super().__init__(name=f"spliteasy_{role}")
            self.model = model
            self.trainable = list(model.trainable_weights)
            self.step = tf.Variable(0, dtype=tf.int64, trainable=False, name="step")
            if optimizer.name == "sgd":
                self.slots = [
                    [tf.Variable(tf.zeros_like(v), trainable=False, name="momentum")]
                    for v in self.trainable
                ]
            else:
                self.slots = [
                    [
                        tf.Variable(tf.zeros_like(v), trainable=False, name="m"),
                        tf.Variable(tf.zeros_like(v), trainable=False, name="v"),
                    ]
                    for v in self.trainable
                ]
            # Checkpoint names: spliteasy's layer/variable names, and for the slots the
            # name of the variable they belong to.
            self.names = list(names)
            self.ordered = [names[n] for n in self.names]
            by_ref = {v.ref(): n for n, v in names.items()}
            self.named = [(f"model/{n}", v) for n, v in names.items()]
            for var, slots in zip(self.trainable, self.slots, strict=True):
                for s in slots:
                    self.named.append((f"opt/{by_ref[var.ref()]}/{_slot_name(s)}", s))
            self.named.append(("opt/step", self.step))

        def _apply(self, grads: list[Any]) -> None:
            """One tf_keras optimizer step (see module docstring for the formulas)."""
            t = tf.cast(self.step + 1, tf.float32)
            lr = tf.constant(optimizer.learning_rate, tf.float32)
            for var, g, slots in zip(self.trainable, grads, self.slots, strict=True):
                if g is None:  # unconnected variable: Keras skips it as well
                    continue
                if isinstance(g, tf.IndexedSlices):  # an Embedding's rows: Keras' sparse
                    g = tf.convert_to_tensor(g)  # update is the dense one with zero rows
                keras_update(tf, optimizer, var, g, slots, t, lr)
            self.step.assign_add(1)

        def _regularization(self) -> Any:
            losses = self.model.losses
            return tf.add_n(losses) if losses else None

        @tf.function(input_signature=[])
        def variable_names(self) -> dict[str, Any]:
            return {"names": tf.constant(self.names, dtype=tf.string)}

        @tf.function(input_signature=[])
        def weights(self) -> dict[str, Any]:
            return {f"w{i:03d}": v.read_value() for i, v in enumerate(self.ordered)}

        @tf.function(input_signature=[path_spec])
        def save(self, checkpoint_path: Any) -> dict[str, Any]:
            tf.raw_ops.Save(
                filename=checkpoint_path,
                tensor_names=[n for n, _ in self.named],
                data=[v.read_value() for _, v in self.named],
                name="save",
            )
            return {"step": self.step.read_value()}

        @tf.function(input_signature=[path_spec])
        def restore(self, checkpoint_path: Any) -> dict[str, Any]:
            # Read everything before assigning anything: a checkpoint that lacks a name
            # or has a wrong shape fails before the state is half overwritten.
            restored = [
                tf.reshape(
                    tf.raw_ops.Restore(
                        file_pattern=checkpoint_path, tensor_name=n, dt=v.dtype, name="restore"
                    ),
                    v.shape,
                )
                for n, v in self.named
            ]
            with tf.control_dependencies(restored):
                for (_, v), value in zip(self.named, restored, strict=True):
                    v.assign(value)
            return {"step": self.step.read_value()}

    if role == "A":

        class ASlice(SliceModule):
            @tf.function(input_signature=[in_spec])
            def forward_train(self, x: Any) -> dict[str, Any]:
                frozen = [v.read_value() for v in self.model.non_trainable_weights]
                a = self.model(x, training=True)
                with tf.control_dependencies([a]):
                    for v, value in zip(self.model.non_trainable_weights, frozen, strict=True):
                        v.assign(value)
                return {"a": a}

            @tf.function(
                input_signature=[in_spec, tf.TensorSpec(out_shape, tf.float32, "upstream_grad")]
            )
            def train(self, x: Any, upstream_grad: Any) -> dict[str, Any]:
                with tf.GradientTape() as tape:
                    a = self.model(x, training=True)
                    reg = self._regularization()
                if reg is None:
                    grads = tape.gradient(a, self.trainable, output_gradients=upstream_grad)
                else:
                    grads = tape.gradient(
                        [a, reg], self.trainable, output_gradients=[upstream_grad, tf.ones([])]
                    )
                self._apply(grads)
                return {"step": self.step.read_value()}

            @tf.function(input_signature=[in_spec])
            def infer(self, x: Any) -> dict[str, Any]:
                return {"a": self.model(x, training=False)}

        return ASlice()

    class CSlice(SliceModule):
        @tf.function(input_signature=[in_spec, labels_spec])
        def train(self, b: Any, labels: Any) -> dict[str, Any]:
            with tf.GradientTape() as tape:
                tape.watch(b)
                y = self.model(b, training=True)
                value = loss_fn(labels, y)
                reg = self._regularization()
                if reg is not None:
                    value = value + reg
            grads = tape.gradient(value, [b, *self.trainable])
            self._apply(grads[1:])
            return {"loss": value, "grad_b": grads[0]}

        @tf.function(input_signature=[in_spec])
        def infer(self, b: Any) -> dict[str, Any]:
            return {"y": self.model(b, training=False)}

    return CSlice()
