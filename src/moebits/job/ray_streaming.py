"""Pass 1 of the streaming path as Ray tasks, one per decoder layer (`moebits quantize --workers N`).

Pass 1 sees fp inputs: layer l's inputs are the fp model's hidden states after layers < l, which do not
depend on anything pass 1 computes. So once every layer's inputs are on disk, the layers' pass-1 work
(routing statistics, Hessians, profiling of the units the method measures) is independent per layer:

    1. fp forward (driver, sequential, cheap): each layer runs once on the calibration and evaluation
       windows; its inputs go to `HiddenStore`s (`fp_calib.L{l}`, `fp_eval.L{l}`), kept until pass 1 ends.
    2. pass 1 (Ray): one task per unfinished layer, at most N in flight. A task rebuilds the lazy model
       and the batches from the model spec and the calibration windows (once per worker process, cached),
       runs `layer_pass.pass1_layer` on the layer's cached inputs and writes `pass1/L{l}.json` atomically,
       exactly as the single-process pass does, so an interrupted run resumes (with or without Ray).

The per-layer computation is the single-process one on the same inputs, so the table and the plan
are identical -- bit for bit when both run their CPU kernels on the same number of threads (a GEMM's
last bits can depend on how its reduction is split): each task uses `worker_threads` torch threads
(and as many Ray CPUs), and so does the driver's fp forward. Pass 2 (sequential GPTQ: layer l's Hessians come from the quantized layers < l) stays
sequential in the driver. Each worker holds the embeddings/head, one decoder layer and that layer's
hidden states: N workers take about N times the memory of the single-process pass 1. The run directory
and the model must be readable at the same path by every worker (on a cluster: a shared filesystem).
"""
from __future__ import annotations

import hashlib
import logging
import socket
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..latency import cpu_threads
from ..stream.forward import BatchedWindows, HiddenStore, forward_layer
from ..stream.layer_pass import Pass1Job, pass1_layer
from .streaming import StreamPipeline

log = logging.getLogger(__name__)

RAY_HINT = "install it with: pip install 'moebits[ray]'"


class RayUnavailable(ValueError):
    """Ray is not installed, or the cluster cannot be reached (a user error: the message says what to do)."""


@dataclass
class WorkerModel:
    """What a worker needs to rebuild the driver's lazy model and calibration batches."""
    model: str  # the model spec as given to `moebits quantize` (a path every worker can read, demo, tiny:...)
    dtype: torch.dtype
    device: str
    seed: int
    trust_remote_code: bool
    batch_size: int
    windows: torch.Tensor  # calibration windows [n, T]

    def key(self) -> str:
        digest = hashlib.sha1(self.windows.numpy().tobytes()).hexdigest()
        return f"{self.model}|{self.dtype}|{self.device}|{self.seed}|{self.batch_size}|{digest}"


_CACHE: dict[str, tuple] = {}  # per worker process: the model and batches of the last spec it served


def _model_and_batches(spec: WorkerModel):
    from ..models.lazy import LazyModel, open_source

    key = spec.key()
    if key not in _CACHE:
        _CACHE.clear()  # one model per worker process at a time
        torch.manual_seed(spec.seed)
        source, _, _ = open_source(spec.model, spec.trust_remote_code, seed=spec.seed)
        lazy = LazyModel(source, spec.dtype, spec.device, spec.trust_remote_code)
        _CACHE[key] = (lazy, BatchedWindows(lazy, spec.windows, spec.batch_size))
    return _CACHE[key]


def pass1_task(spec: WorkerModel, layer: int, hidden_path: str, job: Pass1Job, out_path: str,
               threads: int) -> tuple[int, float]:
    """Pass 1 of `layer` on its cached fp inputs; writes its `LayerPass1` to `out_path` (atomically).
    Returns (layer, seconds of the layer's pass 1). Runs in a Ray worker (or anywhere: it is a plain function)."""
    torch.set_num_threads(threads)
    lazy, batches = _model_and_batches(spec)
    result, _ = pass1_layer(lazy, layer, hidden_path, batches, job)
    result.save(out_path)
    return layer, result.seconds


def check_reachable(address: str, timeout: float = 5.0) -> None:
    """Fail fast on a HOST:PORT (or ray://HOST:PORT) nobody listens on: `ray.init` retries such an
    address for many minutes. `auto` / `local` are left to Ray (it fails at once when no cluster runs here)."""
    if address in ("auto", "local"):
        return
    hostport = address.split("://", 1)[-1]
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        raise RayUnavailable(f"--ray-address {address!r}: expected HOST:PORT (the head node's GCS address that "
                             "`ray start --head` prints, default port 6379), ray://HOST:PORT, or auto")
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as e:
        raise RayUnavailable(f"no Ray cluster answers at {address} ({e.strerror or e}); start one with "
                             "`ray start --head` on the head node, or check the address and the firewall") from None


def require_ray():
    try:
        import ray
    except ImportError:
        raise RayUnavailable(f"--workers / --ray-address run pass 1 on Ray, which is not installed; {RAY_HINT}") from None
    return ray


def connect(workers: int, address: str | None):
    """The `ray` module, initialised: a local cluster of `workers` CPUs, or the cluster at `address`
    (`auto`: the one `ray start` runs on this node; `local`: a fresh local one).
    Returns (ray, whether this call started it)."""
    ray = require_ray()
    if ray.is_initialized():  # a session the caller set up (a notebook, a test): use it as it is
        return ray, False
    if address:
        check_reachable(address)
    try:
        if address and address != "local":
            ray.init(address=address, logging_level=logging.WARNING, log_to_driver=True)
        else:  # always a fresh local cluster, even when `ray start` runs one on this node (use auto to join it)
            ray.init(address="local", num_cpus=workers, include_dashboard=False, logging_level=logging.WARNING)
    except Exception as e:  # noqa: BLE001 - ConnectionError, RuntimeError, ValueError depending on the failure
        where = f"the Ray cluster at {address!r}" if address else "a local Ray cluster"
        fix = ("; start one with `ray start --head` on the head node (and `ray start --address HEAD:6379` on the "
               "others), then pass --ray-address HEAD:6379 (or auto on a cluster node)") if address else ""
        raise RayUnavailable(f"could not start or reach {where}: {type(e).__name__}: {e}{fix}") from None
    return ray, True


def run_pass1(spec: WorkerModel, tasks: list[tuple[int, str, str]], job: Pass1Job, workers: int,
              address: str | None, cpus_per_worker: int = 1, on_done=None) -> dict:
    """Pass 1 of each (layer, hidden path, output path) in `tasks` as Ray tasks, at most `workers` in
    flight; `on_done(layer, seconds)` as each finishes. A task's error is raised here. Returns the wall
    seconds of connecting (`ray_start_seconds`) and of the tasks (`ray_tasks_seconds`: the first submitted
    to the last finished, the workers' start and model opening included)."""
    t0 = time.perf_counter()
    ray, started = connect(workers, address)
    t1 = time.perf_counter()
    try:
        gpus = 1 if str(spec.device).startswith("cuda") else 0
        remote = ray.remote(pass1_task).options(num_cpus=cpus_per_worker, num_gpus=gpus, max_retries=0)
        spec_ref = ray.put(spec)
        pending, queue = [], list(tasks)
        while queue or pending:
            while queue and len(pending) < workers:
                layer, hidden, out = queue.pop(0)
                pending.append(remote.remote(spec_ref, layer, hidden, job, out, cpus_per_worker))
            ready, pending = ray.wait(pending, num_returns=1)
            layer, seconds = ray.get(ready[0])
            if on_done is not None:
                on_done(layer, seconds)
        return {"ray_start_seconds": round(t1 - t0, 4), "ray_tasks_seconds": round(time.perf_counter() - t1, 4)}
    finally:
        if started:
            ray.shutdown()


class RayStreamPipeline(StreamPipeline):
    """`StreamPipeline` whose pass 1 runs on Ray (see the module doc); pass 2 is the sequential one."""

    def __init__(self, cfg, out, workers: int = 2, ray_address: str | None = None, worker_threads: int = 1,
                 overwrite: bool = False, progress: bool = True, reason: str | None = None):
        if workers < 1:
            raise ValueError(f"--workers must be at least 1, got {workers}")
        if worker_threads < 1:
            raise ValueError(f"--worker-threads must be at least 1, got {worker_threads}")
        require_ray()  # before any work: missing extra or a dead address are reported at once
        if ray_address:
            check_reachable(ray_address)
        super().__init__(cfg, out, overwrite=overwrite, progress=progress,
                         reason=reason or f"--workers {workers}" + (f" --ray-address {ray_address}" if ray_address else ""))
        self.workers, self.ray_address, self.worker_threads = workers, ray_address, worker_threads

    def _fp_forward(self, first: int) -> None:
        """Inputs of every layer >= `first` (and the last layer's outputs) into the fp HiddenStores,
        starting from the latest inputs already on disk."""
        lazy, (calib_b, eval_b) = self.lazy, self._batches()
        hs_c, hs_e = HiddenStore(self.work, "fp_calib"), HiddenStore(self.work, "fp_eval")
        have = [l for l in range(first + 1) if hs_c.has(l) and hs_e.has(l)]
        start = max(have, default=0)
        if not have:
            hs_c.save(0, calib_b.embeddings())
            hs_e.save(0, eval_b.embeddings())
        for layer in range(start, lazy.num_layers):
            if hs_c.has(layer + 1) and hs_e.has(layer + 1):
                continue
            with lazy.layer(layer):
                out_c = forward_layer(lazy, layer, calib_b, hs_c.load(layer))
                out_e = forward_layer(lazy, layer, eval_b, hs_e.load(layer))
            hs_c.save(layer + 1, out_c)
            hs_e.save(layer + 1, out_e)

    def _pass1(self, pass1_dir: Path, done: set[int]) -> None:
        lazy = self.lazy
        todo = [l for l in range(lazy.num_layers) if l not in done]
        t0 = time.perf_counter()
        with cpu_threads(self.worker_threads):  # the workers' thread count: the same kernels, the same bits
            self._fp_forward(min(todo))
        stream = self.results.setdefault("stream", {})
        stream["fp_forward_seconds"] = round(time.perf_counter() - t0, 4)
        stream["workers"] = self.workers
        self._save_results()
        pass1_dir.mkdir(parents=True, exist_ok=True)
        hs_c = HiddenStore(self.work, "fp_calib")
        spec = WorkerModel(self.cfg.model, lazy.dtype, str(lazy.device), self.cfg.seed, self.cfg.trust_remote_code,
                           self.cfg.batch_size, self.windows)
        tasks = [(l, str(hs_c.path(l)), str(pass1_dir / f"L{l}.json")) for l in todo]

        def done_one(layer: int, seconds: float) -> None:
            self._layer_t = seconds
            self._layer_done("pass1", layer)

        self._note(f"pass 1 of {len(todo)} layers on Ray, {self.workers} worker(s)"
                   + (f" on the cluster at {self.ray_address}" if self.ray_address else " (local cluster)"))
        timing = run_pass1(spec, tasks, self.job, self.workers, self.ray_address, self.worker_threads,
                           on_done=done_one)
        self.results["stream"].update(timing)
        self._save_results()
        for layer in range(lazy.num_layers):  # the last layer's outputs stay: ppl_fp reads them
            hs_c.drop(layer)
            HiddenStore(self.work, "fp_eval").drop(layer)
