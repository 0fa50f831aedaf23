"""tf_keras' losses in torch, for the server when it holds the labels (single split).

Each is written from tf_keras' own definition (``tf_keras/src/backend.py`` and
``losses.py``), reduction ``SUM_OVER_BATCH_SIZE`` (the mean over the batch of each
sample's loss), and checked against tf_keras' numbers on ``tests/golden/math.json``
(tests/test_golden_math.py):

- sparse categorical cross-entropy: ``cross_entropy(logits)``; on probabilities Keras clips
  to [eps, 1 - eps] first and takes the softmax cross-entropy of their log (so clipped
  probabilities are normalised *after* clipping);
- categorical cross-entropy (one-hot or soft targets): on probabilities Keras normalises
  the rows to sum 1, clips, and takes ``-sum(y log p)``;
- binary cross-entropy, mean over the last axis: on logits ``max(x, 0) - x z +
  log(1 + exp(-|x|))`` (``F.binary_cross_entropy_with_logits``); on probabilities
  ``-(z log(p + eps) + (1 - z) log(1 - p + eps))`` after clipping p to [eps, 1 - eps];
- mean squared and mean absolute error, mean over the last axis.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from shared_schema.manifest import LossSpec

KERAS_EPSILON = 1e-7  # tf_keras.backend.epsilon()


def keras_sparse_ce(output: torch.Tensor, labels: torch.Tensor, loss: LossSpec) -> torch.Tensor:
    """Keras' sparse categorical cross-entropy, mean over the batch."""
    if loss.from_logits:
        return F.cross_entropy(output, labels)
    p = output.clamp(KERAS_EPSILON, 1.0 - KERAS_EPSILON)
    return F.cross_entropy(torch.log(p), labels)


def keras_categorical_ce(
    output: torch.Tensor, target: torch.Tensor, from_logits: bool
) -> torch.Tensor:
    if from_logits:
        per_sample = -(target * F.log_softmax(output, dim=-1)).sum(-1)
    else:
        p = output / output.sum(-1, keepdim=True)
        p = p.clamp(KERAS_EPSILON, 1.0 - KERAS_EPSILON)
        per_sample = -(target * torch.log(p)).sum(-1)
    return per_sample.mean()


def keras_binary_ce(output: torch.Tensor, target: torch.Tensor, from_logits: bool) -> torch.Tensor:
    if from_logits:
        elementwise = F.binary_cross_entropy_with_logits(output, target, reduction="none")
    else:
        p = output.clamp(KERAS_EPSILON, 1.0 - KERAS_EPSILON)
        elementwise = -(
            target * torch.log(p + KERAS_EPSILON) + (1 - target) * torch.log(1 - p + KERAS_EPSILON)
        )
    return elementwise.mean(-1).mean()


def keras_loss(output: torch.Tensor, labels: torch.Tensor, loss: LossSpec) -> torch.Tensor:
    """The manifest's loss of B's ``output`` (N, K) against ``labels``: int64 class indices
    (N) for the sparse cross-entropy, else a float tensor shaped like ``output``."""
    if loss.name == "sparse_categorical_crossentropy":
        return keras_sparse_ce(output, labels, loss)
    if loss.name == "categorical_crossentropy":
        return keras_categorical_ce(output, labels, loss.from_logits)
    if loss.name == "binary_crossentropy":
        return keras_binary_ce(output, labels, loss.from_logits)
    if loss.name == "mean_squared_error":
        return (output - labels).square().mean(-1).mean()
    if loss.name == "mean_absolute_error":
        return (output - labels).abs().mean(-1).mean()
    raise ValueError(
        f"no torch loss for {loss.name!r}"
    )  # pragma: no cover - the manifest forbids it
