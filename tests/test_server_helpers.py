"""Hand-made bundles and a tiny protocol client for the server tests (no converter needed).

Holds no tests itself; the other test_server_*.py import it (pytest puts tests/ on sys.path).
"""

from __future__ import annotations

import copy
import hashlib
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import torch
from torch import nn

from server_torch.keras_compat import KerasBatchNorm
from shared_schema import (
    MEDIA_TYPE,
    AdamSpec,
    Artifact,
    Frame,
    FrameKind,
    LossSpec,
    Manifest,
    SGDSpec,
    SliceSpec,
    TensorSpec,
    decode,
    encode,
    sha256_tree,
)

X = TensorSpec(name="x", shape=[None, 16, 16, 3], layout="NHWC")
A_CUT = TensorSpec(name="a", shape=[None, 8, 8, 4], layout="NHWC")
B_CUT = TensorSpec(name="b", shape=[None, 4, 4, 8], layout="NHWC")
LOGITS = TensorSpec(name="logits", shape=[None, 10], layout="NC")
LABELS = TensorSpec(name="y", shape=[None], dtype="int32", layout="N")


def _slice(
    name: str, side: str, ins: str, outs: str, arts: list[Artifact] | None = None
) -> SliceSpec:
    return SliceSpec(
        name=name, side=side, inputs=[ins], outputs=[outs], first_layer=f"{name}_first",
        last_layer=f"{name}_last", num_params=1, artifacts=arts or [],
    )  # fmt: skip


def double_manifest(
    optimizer: Any = None, artifacts: dict[str, list[Artifact]] | None = None
) -> Manifest:
    arts = artifacts or {}
    return Manifest(
        model="tiny-cnn",
        spliteasy_version="test",
        split_mode="double",
        label_holder="device",
        input=X,
        labels=LABELS,
        output=LOGITS,
        cuts=[A_CUT, B_CUT],
        slices=[
            _slice("A", "device", "x", "a", arts.get("A")),
            _slice("B", "server", "a", "b", arts.get("B")),
            _slice("C", "device", "b", "logits", arts.get("C")),
        ],
        loss=LossSpec(from_logits=True),
        optimizer=optimizer or SGDSpec(learning_rate=0.1, momentum=0.9),
        num_classes=10,
    )


def single_manifest(from_logits: bool = True, optimizer: Any = None) -> Manifest:
    return Manifest(
        model="tiny-cnn-single",
        spliteasy_version="test",
        split_mode="single",
        label_holder="server",
        input=X,
        labels=LABELS,
        output=LOGITS,
        cuts=[A_CUT],
        slices=[_slice("A", "device", "x", "a"), _slice("B", "server", "a", "logits")],
        loss=LossSpec(from_logits=from_logits),
        optimizer=optimizer or AdamSpec(learning_rate=1e-2),
        num_classes=10,
    )


def double_b(seed: int = 0) -> nn.Module:
    """B of the double split: NCHW [N,4,8,8] -> [N,8,4,4]."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(4, 8, 3, padding=1),
        KerasBatchNorm(8, momentum=0.99, epsilon=1e-3),
        nn.ReLU(),
        nn.MaxPool2d(2),
    )


class _Softmax(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(x, dim=-1)


def single_b(seed: int = 0, probabilities: bool = False) -> nn.Module:
    """B of the single split: NCHW [N,4,8,8] -> logits (or probabilities) [N,10]."""
    torch.manual_seed(seed)
    layers: list[nn.Module] = [
        nn.Conv2d(4, 8, 3, padding=1),
        KerasBatchNorm(8, momentum=0.99, epsilon=1e-3),
        nn.ReLU(),
        nn.AvgPool2d(2),
        nn.Flatten(),
        nn.Linear(8 * 4 * 4, 10),
    ]
    if probabilities:
        layers.append(_Softmax())
    return nn.Sequential(*layers)


def clone(module: nn.Module) -> nn.Module:
    return copy.deepcopy(module)


def write_bundle(root: Path, manifest_fn: Any = double_manifest) -> tuple[Path, Manifest]:
    """A bundle directory with a device artefact (A/, a directory), a server artefact
    (B.safetensors) and manifest.json listing both with their hashes."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "A").mkdir(exist_ok=True)
    (root / "A" / "model.json").write_text('{"format": "layers-model"}')
    (root / "A" / "group1-shard1of1.bin").write_bytes(b"\x00\x01\x02\x03")
    (root / "B.safetensors").write_bytes(b"server secret weights")
    (root / "notes.txt").write_text("not an artefact")

    def art(path: str, fmt: str, runtime: str) -> Artifact:
        digest, size = sha256_tree(root / path)
        return Artifact(path=path, format=fmt, runtime=runtime, sha256=digest, bytes=size)

    manifest = manifest_fn(
        artifacts={
            "A": [art("A", "tfjs_layers", "tfjs")],
            "B": [art("B.safetensors", "torch_safetensors", "torch")],
        }
    )
    (root / "manifest.json").write_text(manifest.to_json())
    return root, manifest


def rand(shape: tuple[int, ...], seed: int, scale: float = 1.0) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal(shape) * scale).astype(np.float32)


def nhwc_to_torch(a: np.ndarray) -> torch.Tensor:
    """Independent of the server's path: an ordinary contiguous NCHW copy."""
    return torch.tensor(a).permute(0, 3, 1, 2).contiguous()


def snapshot(app: Any) -> dict[str, bytes]:
    """B's parameters, buffers and optimizer state, as raw bytes, plus the step counter."""
    tr = app.state.trainer
    snap = {
        f"sd/{k}": v.detach().cpu().numpy().tobytes() for k, v in tr.module.state_dict().items()
    }
    for i, (p, st) in enumerate(tr.optimizer.state.items()):
        for k, v in st.items():
            snap[f"opt/{i}/{tuple(p.shape)}/{k}"] = (
                v.detach().cpu().numpy().tobytes() if torch.is_tensor(v) else repr(v).encode()
            )
    snap["steps"] = str(tr.steps).encode()
    return snap


def session_state(app: Any, sid: str) -> tuple:
    s = app.state.service._sessions[sid]
    return (
        s.next_step,
        s.expect,
        s.stale_step,
        {k: (v.step, v.request_sha256) for k, v in s.store.items()},
    )


class Device:
    """A protocol client for one session; it only builds frames and posts them."""

    def __init__(self, url: str, manifest_sha256: str | None = None, aux_label: bool = False):
        self.http = httpx.Client(base_url=url, timeout=60)
        sha = manifest_sha256 or hashlib.sha256(self.http.get("/v1/manifest").content).hexdigest()
        r = self.http.post("/v1/sessions", json={"manifest_sha256": sha, "aux_label": aux_label})
        assert r.status_code == 201, r.text
        info = r.json()
        self.sid: str = info["session_id"]
        self.token: str = info["token"]
        self.sidb = bytes.fromhex(self.sid)
        self.aux_label = aux_label

    def frame(
        self, kind: FrameKind, spec: TensorSpec, arr: np.ndarray, step: int, **over: Any
    ) -> Frame:
        fields = {"kind": kind, "name": spec.name, "array": arr, "layout": spec.layout}
        fields.update(session=self.sidb, step=step)
        fields.update(over)
        return Frame(**fields)

    def body(
        self, kind: FrameKind, spec: TensorSpec, arr: np.ndarray, step: int, **over: Any
    ) -> bytes:
        return encode([self.frame(kind, spec, arr, step, **over)])

    def post(
        self,
        op: str,
        body: bytes,
        token: str | None = "own",
        content_type: str = MEDIA_TYPE,
        sid: str | None = None,
    ) -> httpx.Response:
        headers = {"Content-Type": content_type}
        tok = self.token if token == "own" else token
        if tok is not None:
            headers["Authorization"] = f"Bearer {tok}"
        return self.http.post(f"/v1/sessions/{sid or self.sid}/{op}", content=body, headers=headers)

    def ok(self, op: str, body: bytes) -> tuple[list[Frame], httpx.Response]:
        r = self.post(op, body)
        assert r.status_code == 200, r.text
        assert r.headers["content-type"] == MEDIA_TYPE
        return decode(bytearray(r.content)), r

    def close(self) -> None:
        self.http.close()
