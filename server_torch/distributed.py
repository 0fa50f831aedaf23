"""Slice B on several worker processes with torch.distributed (``serve --workers W``, torchrun).

Parallel mode (``server_torch.parallel``) trains B once per round on the concatenation of
the round's batches. With W workers that one step is shared: every rank holds a replica
of B wrapped in :class:`~torch.nn.parallel.DistributedDataParallel` (gloo on CPU, NCCL
when CUDA is there), the round's rows are cut into W contiguous shards, each rank runs
forward and backward on its shard, DDP all-reduces the parameter gradients and every
rank applies the same optimizer step, so the replicas never drift apart.

*Exactly one B.* Two things make W workers train B as one process on the whole round:

- **Gradients are summed, not averaged.** Parallel mode already weights each device's
  gradient by b_i / sum(b) (the gradient of the round's mean loss), so the gradient of
  B is the sum over all rows. DDP's default hook divides by W; :func:`_sum_hook` is
  DDP's allreduce hook without the division.
- **BatchNorm statistics are the round's, not the shard's.** ``torch.nn.SyncBatchNorm``
  refuses CPU tensors in this torch ("expected input tensor to be on GPU or XPU") and
  keeps torch's running-statistics rule, not Keras'. So :class:`SyncKerasBatchNorm`
  extends B's Keras-exact ``KerasBatchNorm``: in training it all-reduces, once, the
  per-channel sums of d and d^2 and the count, d = x - the moving mean (a shift equal on
  every rank), in float64 (so E[d^2] - E[d]^2 does not cancel), through
  :class:`_AllReduceSum`, whose backward is the all-reduce of the gradient: dL/dx
  carries every rank's share of the mean and variance, one collective each way per
  BatchNorm. The moving statistics follow from the global mean and variance, identical
  on every rank.

*One URL.* Devices talk to rank 0 only: it runs the FastAPI gateway and the round
coordinator, and its :class:`GatewayTrainer` (B's trainer there) hands each round's
shards to the other ranks. Ranks above 0 run :func:`worker_loop` and no HTTP at all.
Every exchange starts with a fixed-size header broadcast from rank 0 (op, sequence
number, rows per rank); the shards go by ``send``/``recv`` (their sizes differ), the
replies come back the same way. When idle, rank 0 broadcasts a no-op every
``heartbeat`` s, so the workers' wait never reaches the collective timeout while rank 0
lives, and a dead worker is noticed within a heartbeat even with no traffic.

*Failures.* Every collective has the process group's timeout (``--worker-timeout``). A
worker that dies closes its gloo connections: rank 0's next exchange fails at once
(a hung one: after the timeout), rank 0 marks the group failed, answers the round and
every later request with 503 ``workers_failed`` and shuts down (exit status 1) without a
final checkpoint (the round in flight may be half applied); the newest periodic
checkpoint stands. Workers whose rank 0 is gone exit likewise. A clean stop (SIGTERM
to rank 0, or to every rank under torchrun) drains the round in flight, lets rank 0
write its checkpoint, then broadcasts STOP: workers leave their loop and the group is
destroyed on every rank. Workers ignore SIGTERM/SIGINT for ``grace`` s while they wait
for that STOP.

The finiteness guard of :class:`~server_torch.trainer.Trainer` decides on all ranks
together (a MAX all-reduce of what each rank saw), so a refused step is refused, and
undone, everywhere.
"""

from __future__ import annotations

import datetime
import json
import logging
import math
import os
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from shared_schema import Manifest

from .errors import InvalidTensor, ServerError, StepConflict, UnstableStep
from .keras_compat import KerasBatchNorm
from .trainer import Trainer

log = logging.getLogger("spliteasy.server")

# header: [op, sequence, target flag, rows of rank 0, ..., rows of rank W-1]
NOOP, FORWARD, BACKWARD, STATE, STOP = 0, 1, 2, 3, 4
_OPS = {NOOP: "noop", FORWARD: "forward", BACKWARD: "backward", STATE: "state", STOP: "stop"}
DEFAULT_TIMEOUT = 60.0
DEFAULT_HEARTBEAT = 2.0
ENV = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


class WorkersFailed(ServerError):
    """A worker process of B (torch.distributed) died, hung past the timeout or left the
    group: this server cannot train B any more and is shutting down."""

    code = "workers_failed"


# -- exact synchronised BatchNorm -------------------------------------------------------


# Seconds this process spent in the BatchNorm all-reduces (forward and backward): the
# benchmark's "where the time goes" (benchmarks/workers_speed.py via /v1/health).
BN_SYNC_SECONDS = [0.0]


class _AllReduceSum(torch.autograd.Function):
    """sum over ranks, differentiable: d(sum_k x_k)/dx_j = 1, so the backward is the
    all-reduce (sum) of every rank's incoming gradient."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: Any) -> torch.Tensor:  # type: ignore[override]
        ctx.group = group
        t0 = time.perf_counter()
        out = x.clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
        BN_SYNC_SECONDS[0] += time.perf_counter() - t0
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        t0 = time.perf_counter()
        out = grad.clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=ctx.group)
        BN_SYNC_SECONDS[0] += time.perf_counter() - t0
        return out, None


class SyncKerasBatchNorm(KerasBatchNorm):
    """:class:`KerasBatchNorm` whose training statistics are those of the whole round:
    the mean and (biased) variance over every rank's rows, and the moving statistics
    updated from them with Keras' rule (the unbiased correction with the global count)."""

    group: Any = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return super().forward(x)
        dims = [0, *range(2, x.ndim)]
        c = self.num_features
        view = [1, c] + [1] * (x.ndim - 2)
        # One all-reduce of [sum d, sum d^2, count] with d = x - shift, in float64: the
        # shift (the moving mean: equal on every rank, near the batch mean) and the
        # float64 sums keep E[d^2] - E[d]^2 free of cancellation.
        shift = self.running_mean.detach().to(torch.float64)
        d = x.to(torch.float64) - shift.view(view)
        count = torch.full((1,), float(x.numel() // c), dtype=torch.float64)
        packed = torch.cat([d.sum(dim=dims), (d * d).sum(dim=dims), count])
        total = _AllReduceSum.apply(packed, self.group)
        n = float(total[-1].detach())
        m1, m2 = total[:c] / n, total[c : 2 * c] / n
        mean = (m1 + shift).to(x.dtype)
        var = (m2 - m1 * m1).clamp_min(0.0).to(x.dtype)
        centred = x - mean.view(view)
        with torch.no_grad():
            acc_var = var * (n / max(n - 1, 1)) if self.unbiased_running_var else var
            self.running_mean.mul_(self.momentum).add_(mean, alpha=1.0 - self.momentum)
            self.running_var.mul_(self.momentum).add_(acc_var, alpha=1.0 - self.momentum)
        inv = torch.rsqrt(var + self.epsilon) * self.weight
        return centred * inv.view(view) + self.bias.view(view)


def convert_sync_batchnorm(module: nn.Module, group: Any = None) -> int:
    """Replace every :class:`KerasBatchNorm` of ``module`` (in place, same names, same
    values) by a :class:`SyncKerasBatchNorm` on ``group``; returns how many. Call before
    the optimizer is built: the parameters are new objects."""
    found = [
        (name, m)
        for name, m in module.named_modules()
        if isinstance(m, KerasBatchNorm) and not isinstance(m, SyncKerasBatchNorm)
    ]
    for name, old in found:
        new = SyncKerasBatchNorm(
            old.num_features,
            old.momentum,
            old.epsilon,
            center=isinstance(old.bias, nn.Parameter),
            scale=isinstance(old.weight, nn.Parameter),
            unbiased_running_var=old.unbiased_running_var,
        )
        new.load_state_dict(old.state_dict(), strict=True)
        new.to(old.running_mean.dtype)
        new.group = group
        new.train(old.training)
        parent_name, _, leaf = name.rpartition(".")
        parent = module.get_submodule(parent_name) if parent_name else module
        setattr(parent, leaf, new)
    return len(found)


def _sum_hook(group, bucket):  # noqa: ANN001, ANN202 - DDP checks a hook's annotations
    """DDP's allreduce hook without its division by the world size: B's gradient is the
    sum over the round's rows (each device's share is already weighted b_i / sum b).
    (No annotations: DDP compares them with ``dist.GradBucket`` and this module's are
    strings.)"""
    work = dist.all_reduce(bucket.buffer(), group=group, async_op=True)
    return work.get_future().then(lambda fut: fut.value()[0])


# -- the group ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Launch:
    """Where this process stands in the group (torchrun's environment variables)."""

    rank: int
    world_size: int
    master_addr: str
    master_port: int

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> Launch | None:
        """None outside a launch (no RANK/WORLD_SIZE); a ValueError for a partial or
        nonsensical one."""
        env = dict(os.environ if env is None else env)
        if "RANK" not in env and "WORLD_SIZE" not in env:
            return None
        missing = [k for k in ENV if not env.get(k)]
        if missing:
            raise ValueError(f"a torch.distributed launch needs {', '.join(missing)} set")
        try:
            rank, world = int(env["RANK"]), int(env["WORLD_SIZE"])
            port = int(env["MASTER_PORT"])
        except ValueError:
            raise ValueError("RANK, WORLD_SIZE and MASTER_PORT must be integers") from None
        if world < 1 or not 0 <= rank < world or not 0 < port < 65536:
            raise ValueError(f"RANK {rank} / WORLD_SIZE {world} / MASTER_PORT {port} do not fit")
        return cls(rank, world, env["MASTER_ADDR"], port)


class Workers:
    """This process's membership of B's process group, and rank 0's command channel."""

    def __init__(
        self,
        launch: Launch,
        timeout: float = DEFAULT_TIMEOUT,
        heartbeat: float = DEFAULT_HEARTBEAT,
        backend: str | None = None,
    ) -> None:
        self.launch = launch
        self.rank, self.world_size = launch.rank, launch.world_size
        self.timeout = timeout
        self.heartbeat = min(heartbeat, timeout / 4)
        # B trains on the CPU in this server (the trainer places nothing on a GPU), so the
        # backend is gloo; NCCL would need B and the shards on CUDA devices.
        self.backend = backend or "gloo"
        self.lock = threading.RLock()  # one exchange at a time (rank 0's threads)
        self.failed: str | None = None
        self.on_failure: list[Callable[[str], None]] = []
        self.stopped = False
        self.seq = 0
        self.timings: dict[str, dict[str, float]] = {}  # GatewayTrainer fills it
        self._last = time.monotonic()
        self._beat: threading.Thread | None = None

    def init(self) -> None:
        """Join the group (blocks until all W ranks have joined, at most ``timeout`` s)."""
        os.environ.setdefault("MASTER_ADDR", self.launch.master_addr)
        os.environ.setdefault("MASTER_PORT", str(self.launch.master_port))
        dist.init_process_group(
            self.backend,
            init_method=f"tcp://{_host(self.launch.master_addr)}:{self.launch.master_port}",
            rank=self.rank,
            world_size=self.world_size,
            timeout=datetime.timedelta(seconds=self.timeout),
        )

    def info(self) -> dict[str, Any]:
        return {
            "world_size": self.world_size,
            "backend": self.backend,
            "timeout": self.timeout,
            "status": "failed" if self.failed else ("stopped" if self.stopped else "ok"),
            **({"error": self.failed} if self.failed else {}),
            "timings_s": {
                **{op: {k: round(v, 4) for k, v in t.items()} for op, t in self.timings.items()},
                "bn_allreduce": round(BN_SYNC_SECONDS[0], 4),
            },
        }

    # -- failure --

    def check(self) -> None:
        if self.failed is not None:
            raise WorkersFailed(f"B's worker group failed: {self.failed}")
        if self.stopped:
            raise WorkersFailed("B's worker group has stopped")

    def fail(self, why: str) -> WorkersFailed:
        """Record the group as failed (once), tell the listeners; the error to raise."""
        first = self.failed is None
        if first:
            self.failed = why
            log.error("B's worker group failed: %s", why)
            for callback in list(self.on_failure):
                try:
                    callback(why)
                except Exception:  # noqa: BLE001 - the failure is already being reported
                    log.exception("failure callback")
        return WorkersFailed(f"B's worker group failed: {self.failed}")

    # -- rank 0's side of an exchange --

    def command(self, op: int, rows: list[int] | None = None, target: bool = False) -> None:
        """Broadcast a header (rank 0; lock held)."""
        self.seq += 1
        header = torch.zeros(3 + self.world_size, dtype=torch.int64)
        header[0], header[1], header[2] = op, self.seq, int(target)
        if rows is not None:
            header[3:] = torch.tensor(rows, dtype=torch.int64)
        dist.broadcast(header, src=0)
        self._last = time.monotonic()

    def start_heartbeat(self) -> None:
        """Rank 0: a no-op header whenever the group was idle for ``heartbeat`` s."""

        def beat() -> None:
            while not self.stopped and self.failed is None:
                time.sleep(self.heartbeat / 2)
                if time.monotonic() - self._last < self.heartbeat:
                    continue
                if not self.lock.acquire(timeout=self.heartbeat):
                    continue
                try:
                    if self.stopped or self.failed is not None:
                        return
                    self.command(NOOP)
                except Exception as exc:  # noqa: BLE001 - a dead or hung worker
                    self.fail(_describe(exc))
                finally:
                    self.lock.release()

        self._beat = threading.Thread(target=beat, name="spliteasy workers heartbeat", daemon=True)
        self._beat.start()

    def stop(self) -> None:
        """Rank 0: tell every worker to leave, then leave the group (idempotent)."""
        with self.lock:
            if self.stopped:
                return
            self.stopped = True
            if self.failed is None and self.world_size > 1:
                try:
                    self.command(STOP)
                except Exception as exc:  # noqa: BLE001
                    log.warning("could not tell the workers to stop: %s", _describe(exc))
            _destroy()

    # -- state broadcast (rank 0 -> all) --

    def broadcast_state(self, trainer: Trainer) -> None:
        """Rank 0: send B, the optimizer state and the step count to every worker (after a
        resume from a checkpoint, so the replicas start equal)."""
        from safetensors.torch import save

        tensors, scalars = trainer.optimizer_state(copy=False)
        blob = save(
            {
                **{f"module/{k}": v for k, v in trainer.module_state(copy=False).items()},
                **{f"optimizer/{k}": v for k, v in tensors.items()},
            },
            metadata={"steps": str(trainer.steps), "scalars": json.dumps(scalars)},
        )
        with self.lock:
            self.check()
            try:
                self.command(STATE, rows=[len(blob)] * self.world_size)
                dist.broadcast(torch.frombuffer(bytearray(blob), dtype=torch.uint8), src=0)
            except Exception as exc:  # noqa: BLE001
                raise self.fail(_describe(exc)) from None


def _host(addr: str) -> str:
    return f"[{addr}]" if ":" in addr and not addr.startswith("[") else addr


def _describe(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    first = text[0] if text else type(exc).__name__
    for line in text:  # gloo's useful sentence ("Connection closed by peer ...")
        if "closed" in line or "Timed out" in line or "timeout" in line.lower():
            first = line
            break
    return f"{type(exc).__name__}: {first[:300]}"


def _destroy() -> None:
    if dist.is_initialized():
        try:
            dist.destroy_process_group()
        except Exception as exc:  # noqa: BLE001 - leaving anyway
            log.debug("destroy_process_group: %s", exc)


# -- trainers -----------------------------------------------------------------------------


class ReplicaTrainer(Trainer):
    """B's trainer on one rank: DDP around the module, synchronised BatchNorm, and the
    finiteness guard's decisions taken by all ranks together."""

    def __init__(self, module: nn.Module, manifest: Manifest, workers: Workers) -> None:
        self.workers = workers
        self.synced_batchnorms = convert_sync_batchnorm(module)
        super().__init__(module, manifest)
        self.ddp = nn.parallel.DistributedDataParallel(
            self.module,
            forward_sync_buffers=False,  # BN statistics are computed equal on every rank
            bucket_cap_mb=25,
        )
        self.ddp.register_comm_hook(None, _sum_hook)

    def _check(self, arr: np.ndarray, spec: Any, what: str) -> np.ndarray:
        """As the trainer's, but an empty shard is fine: a round with fewer rows than
        ranks leaves some ranks none, and they still take part in every collective."""
        empty = arr.ndim == len(spec.shape) and arr.shape[0] == 0
        if empty and tuple(arr.shape[1:]) == spec.sample_shape:
            return np.ascontiguousarray(arr, dtype=self._np_dtype)
        return super()._check(arr, spec, what)

    def _run(self, a: np.ndarray):  # type: ignore[override]
        from .trainer import _Pending, to_torch_layout

        leaf = torch.from_numpy(a).requires_grad_(True)
        with torch.enable_grad():
            out = self.ddp(to_torch_layout(leaf, self.in_spec.layout))
        return _Pending(leaf, out)

    def _all_ranks_ok(self, ok: bool) -> bool:
        flag = torch.tensor([0.0 if ok else 1.0])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return float(flag) == 0.0

    def _reduce_max(self, value: float) -> float:
        t = torch.tensor([value if math.isfinite(value) else math.inf], dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return float(t)


def _split_rows(n: int, world: int) -> list[int]:
    """Contiguous shards, the first n % W one row larger (numpy.array_split's rule)."""
    return [n // world + (1 if k < n % world else 0) for k in range(world)]


class GatewayTrainer(ReplicaTrainer):
    """Rank 0's trainer: the server's ``Trainer`` for the whole round, which cuts each
    forward and backward into W shards, runs its own and gathers the others'."""

    def __init__(self, module: nn.Module, manifest: Manifest, workers: Workers) -> None:
        super().__init__(module, manifest, workers)
        self._rows: list[int] | None = None
        # cumulative seconds per op: "send" (header and shards out), "local" (rank 0's own
        # shard, its collectives inside DDP and BatchNorm included), "gather" (the other
        # ranks' results in: waiting for the slowest); /v1/health "workers" -> "timings_s"
        self.timings: dict[str, dict[str, float]] = {
            op: {"send": 0.0, "local": 0.0, "gather": 0.0, "calls": 0}
            for op in ("forward", "backward")
        }
        workers.timings = self.timings

    def _exchange(self, op: int, arr: np.ndarray, target: bool, local: Callable) -> np.ndarray:
        w = self.workers
        rows = self._rows if op == BACKWARD else _split_rows(arr.shape[0], w.world_size)
        assert rows is not None
        with w.lock:
            w.check()
            bounds = np.cumsum([0, *rows])
            try:
                t0 = time.perf_counter()
                clock = self.timings[_OPS[op]]
                w.command(op, rows, target)
                shards = [
                    torch.from_numpy(np.ascontiguousarray(arr[bounds[k] : bounds[k + 1]]))
                    for k in range(1, w.world_size)
                ]  # kept alive until every send has completed
                sends = [dist.isend(t, k) for k, t in enumerate(shards, start=1)]
                for s in sends:
                    s.wait()
                t1 = time.perf_counter()
                clock["send"] += t1 - t0
            except Exception as exc:  # noqa: BLE001
                raise w.fail(_describe(exc)) from None
            try:
                mine = local(arr[: bounds[1]])
                t2 = time.perf_counter()
                clock["local"] += t2 - t1
            except (InvalidTensor, StepConflict):
                raise  # every rank refused together (the guard's collective decision)
            except ServerError:
                raise
            except Exception as exc:  # noqa: BLE001 - a collective inside B's step failed
                raise w.fail(_describe(exc)) from None
            try:
                spec = self.out_spec if op == FORWARD else self.in_spec
                parts = [mine]
                for k in range(1, w.world_size):
                    buf = torch.empty((rows[k], *spec.sample_shape), dtype=torch.float32)
                    dist.recv(buf, src=k)
                    parts.append(buf.numpy())
                clock["gather"] += time.perf_counter() - t2
                clock["calls"] += 1
            except Exception as exc:  # noqa: BLE001
                raise w.fail(_describe(exc)) from None
        if op == FORWARD:
            self._rows = rows
        return np.concatenate(parts)

    def forward(self, a: np.ndarray) -> np.ndarray:
        a = Trainer._check(self, a, self.in_spec, self.in_spec.name)  # at least one row
        self._rows = None
        return self._exchange(FORWARD, a, False, super().forward)

    def backward(self, g: np.ndarray, *, target: bool = False) -> np.ndarray:
        if self._pending is None or self._rows is None:
            raise StepConflict("no forward is pending: send the forward of this step first")
        g = Trainer._check(self, g, self.out_spec, self.out_spec.name)
        if g.shape[0] != sum(self._rows):
            from shared_schema import FrameSpecMismatch

            raise FrameSpecMismatch(
                f"{self.out_spec.name}: batch {g.shape[0]}, the forward had {sum(self._rows)}"
            )
        try:
            return self._exchange(
                BACKWARD, g, target, lambda part: Trainer.backward(self, part, target=target)
            )
        finally:
            self._rows = None

    def step_single(self, *args: Any, **kwargs: Any):  # type: ignore[override]
        raise StepConflict("B on several workers trains a double split (parallel mode)")

    def discard(self) -> None:
        super().discard()
        self._rows = None


def worker_loop(trainer: ReplicaTrainer, grace: float = 30.0) -> int:
    """Ranks above 0: serve rank 0's exchanges until STOP (0) or a failure (1).

    SIGTERM/SIGINT do not end the loop at once (rank 0 may still need this rank for the
    round it drains); if no STOP comes within ``grace`` s of the signal the worker leaves.
    """
    w = trainer.workers
    signalled: list[float] = []

    def note(sig: int, frame: Any) -> None:
        if not signalled:
            signalled.append(time.monotonic())

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, note)
    in_spec, out_spec = trainer.in_spec, trainer.out_spec
    header = torch.zeros(3 + w.world_size, dtype=torch.int64)
    try:
        while True:
            dist.broadcast(header, src=0)
            op, target, rows = int(header[0]), bool(header[2]), int(header[3 + w.rank])
            if op == STOP:
                print(f"spliteasy serve: rank {w.rank}: stopped by rank 0", flush=True)
                return 0
            if op == STATE:
                _load_state(trainer, rows)
            elif op in (FORWARD, BACKWARD):
                spec = in_spec if op == FORWARD else out_spec
                buf = torch.empty((rows, *spec.sample_shape), dtype=torch.float32)
                dist.recv(buf, src=0)
                try:
                    if op == FORWARD:
                        out = trainer.forward(buf.numpy())
                    else:
                        out = trainer.backward(buf.numpy(), target=target)
                except (UnstableStep, InvalidTensor, StepConflict) as exc:
                    log.debug("rank %d: %s refused on all ranks: %s", w.rank, _OPS[op], exc)
                    continue
                dist.send(torch.from_numpy(np.ascontiguousarray(out)), dst=0)
            if signalled and time.monotonic() - signalled[0] > grace:
                log.warning("rank %d: no stop from rank 0 within %g s of the signal", w.rank, grace)
                return 1
    except Exception as exc:  # noqa: BLE001 - rank 0 or a peer is gone
        log.error("rank %d: B's worker group failed: %s", w.rank, _describe(exc))
        return 1
    finally:
        w.stopped = True
        _destroy()


def _load_state(trainer: Trainer, size: int) -> None:
    from safetensors.torch import load

    blob = torch.empty(size, dtype=torch.uint8)
    dist.broadcast(blob, src=0)
    raw = bytes(blob.numpy())
    tensors = load(raw)
    n = int.from_bytes(raw[:8], "little")
    meta = json.loads(raw[8 : 8 + n]).get("__metadata__", {})
    trainer.load_module_state(
        {k.removeprefix("module/"): v for k, v in tensors.items() if k.startswith("module/")}
    )
    trainer.load_optimizer_state(
        {k.removeprefix("optimizer/"): v for k, v in tensors.items() if k.startswith("optimizer/")},
        json.loads(meta.get("scalars", "{}")),
    )
    trainer.steps = int(meta.get("steps", "0"))
    trainer.discard()
