"""What a device runtime must do with the slices it holds (A, and C in a double split).

The step loop (``device_tf.loop``) drives any runtime through this interface, so Python
TF (SavedModel / Keras), TFLite and future runtimes share one loop, one transport and
one codec. Arrays in and out are numpy, NHWC for images, float32; labels int32.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import numpy as np


@dataclass
class RuntimeState:
    """Everything a runtime needs to continue training exactly where it was.

    ``slices``: every variable of the held slices, ``"A/<layer>/<var>"`` and
    ``"C/<layer>/<var>"`` (the names of :meth:`DeviceRuntime.weights`).
    ``optimizer``: the optimizer's slots, ``"<slice>/<layer>/<var>/<slot>"`` with slot
    ``momentum`` (SGD) or ``m``/``v`` (Adam), and its step count ``"<slice>/iterations"``
    (int64; Adam's bias correction depends on it). Python TF and TFLite use the same
    names, so one runtime's state reads in the other.
    """

    slices: dict[str, np.ndarray] = field(default_factory=dict)
    optimizer: dict[str, np.ndarray] = field(default_factory=dict)


def state_mismatch(have: dict[str, tuple[int, ...]], given: dict[str, np.ndarray]) -> str | None:
    """Why saved state does not fit a runtime's variables (``have``: name -> shape), or
    None. Every runtime checks all names and shapes before it assigns anything, so a
    wrong snapshot is refused whole instead of half-loaded."""
    if set(have) != set(given):
        missing, extra = sorted(set(have) - set(given)), sorted(set(given) - set(have))
        return f"missing {missing[:5]}, unexpected {extra[:5]}"
    for name, shape in have.items():
        value_shape = tuple(np.shape(given[name]))
        if value_shape != tuple(shape):
            return f"saved {name} has shape {value_shape}, the slice's is {tuple(shape)}"
    return None


class DeviceRuntime(ABC):
    """The device's half of the network.

    Training protocol for one step (double split)::

        a = rt.a_forward(x)             # A in training mode; remembers what backward needs
        ... server: b = B(a) ...
        loss, g_b = rt.c_train(b, y)    # C forward, loss, dL/db, and C's update
        ... server: g_a ...
        rt.a_backward(g_a)              # A's update from the upstream gradient

    Single split uses ``a_forward`` and ``a_backward`` only.
    """

    name: str = "abstract"

    @abstractmethod
    def a_forward(self, x: np.ndarray) -> np.ndarray:
        """A(x) in training mode."""

    @abstractmethod
    def a_backward(self, upstream_grad: np.ndarray) -> None:
        """Backpropagate dL/da through A (for the x of the last ``a_forward``) and update A."""

    @abstractmethod
    def c_train(self, cut_activations: np.ndarray, labels: np.ndarray) -> tuple[float, np.ndarray]:
        """C forward, loss, update of C; returns (loss, dL/d cut_activations)."""

    @abstractmethod
    def a_infer(self, x: np.ndarray) -> np.ndarray:
        """A(x) in inference mode."""

    @abstractmethod
    def c_infer(self, cut_activations: np.ndarray) -> np.ndarray:
        """C(b) in inference mode: the model's output (logits or probabilities)."""

    @abstractmethod
    def weights(self) -> dict[str, dict[str, np.ndarray]]:
        """Current variables of each held slice, ``{"A": {"layer/var": array}, "C": {...}}``
        (trainable and non-trainable, named as ``keras_util.named_variables`` does), so
        any runtime can be compared with unsplit Keras and with every other runtime."""

    def state(self) -> RuntimeState:
        """A copy of the whole training state (variables, optimizer slots, step count)."""
        raise NotImplementedError(f"the {self.name} runtime cannot save its training state")

    def load_state(self, state: RuntimeState) -> None:
        """Put back a state from :meth:`state` (of this bundle); forgets a pending step.

        Must check every name and shape before changing anything, so a state that does
        not fit leaves the runtime as it was.
        """
        raise NotImplementedError(f"the {self.name} runtime cannot load a training state")
