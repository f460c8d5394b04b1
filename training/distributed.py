"""Training on several machines: the cluster a build belongs to, and the few collective
operations the training loops need.

Every worker runs the same `recsys build` on the same data; preparation is deterministic
from the seed, so every worker computes the same global batches and trains on its own slice
of each (`Distribution.shard`), and `tf.distribute.MultiWorkerMirroredStrategy` sums the
gradients. Worker 0 is the chief: only it publishes.

The cluster comes from the environment, in this order:
- `TF_CONFIG` (TensorFlow's own contract: `{"cluster": {"worker": [...]}, "task": {...}}`,
  with an optional single `chief` job, which then is worker 0);
- `RECSYS_TF_WORKER_HOSTS` (comma-separated host:port, in index order) with
  `JOB_COMPLETION_INDEX` (this worker's index, set by a Kubernetes Indexed Job).
One worker, or none configured, is a plain single-process build: no strategy at all.

Importing this module does not import TensorFlow: the CLI resolves (and rejects) the
cluster before it loads data or TensorFlow."""

from __future__ import annotations

import json
import zlib
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any

import numpy as np

TF_CONFIG = "TF_CONFIG"
WORKER_HOSTS = "RECSYS_TF_WORKER_HOSTS"
WORKER_INDEX = "JOB_COMPLETION_INDEX"


class ClusterError(ValueError):
    """The environment describes no usable cluster; the message starts with the variable."""

    def __init__(self, variable: str, problem: str) -> None:
        super().__init__(f"{variable}: {problem}")
        self.variable = variable


class WorkerMismatch(ValueError):
    """The workers of one build prepared different data: a different input, flag, seed or
    library version on one of them (each would train on other rows, or wait for a step the
    others never take)."""


@dataclass(frozen=True)
class ClusterSpec:
    """The workers of one build (host:port, index order) and which one this process is."""

    workers: tuple[str, ...]
    index: int

    @property
    def size(self) -> int:
        return len(self.workers)

    @property
    def is_chief(self) -> bool:
        return self.index == 0


def resolve_cluster(environ: Mapping[str, str]) -> ClusterSpec | None:
    """The cluster the environment describes; None for a single-process build (nothing
    configured, or one worker)."""
    config = environ.get(TF_CONFIG, "").strip()
    if config:
        spec = _from_tf_config(config)
    elif environ.get(WORKER_HOSTS, "").strip():
        spec = _from_indexed_job(environ[WORKER_HOSTS], environ.get(WORKER_INDEX))
    else:
        return None
    return spec if spec.size > 1 else None


def _from_tf_config(text: str) -> ClusterSpec:
    try:
        config = json.loads(text)
    except json.JSONDecodeError as error:
        raise ClusterError(TF_CONFIG, f"not JSON ({error.msg} at character {error.pos})") from None
    if not isinstance(config, dict) or not isinstance(config.get("cluster"), dict):
        raise ClusterError(TF_CONFIG, 'expected an object with "cluster" and "task"')
    cluster: dict[str, Any] = config["cluster"]
    unknown = sorted(set(cluster) - {"chief", "worker"})
    if unknown:
        raise ClusterError(
            TF_CONFIG,
            f"cluster jobs {unknown} are not supported (only chief and worker: all-reduce training)",
        )
    chief = _hosts(TF_CONFIG, "cluster.chief", cluster.get("chief", []))
    if len(chief) > 1:
        raise ClusterError(TF_CONFIG, f"cluster.chief: at most one host, got {len(chief)}")
    workers = chief + _hosts(TF_CONFIG, "cluster.worker", cluster.get("worker", []))
    if not workers:
        raise ClusterError(TF_CONFIG, "cluster: no worker hosts")
    task = config.get("task")
    if not isinstance(task, dict):
        raise ClusterError(TF_CONFIG, 'expected a "task" object with "type" and "index"')
    kind, index = task.get("type"), task.get("index", 0)
    if kind not in ("chief", "worker") or (kind == "chief" and not chief):
        raise ClusterError(TF_CONFIG, f"task.type: expected one of the cluster's jobs, got {kind!r}")
    if not isinstance(index, int) or isinstance(index, bool):
        raise ClusterError(TF_CONFIG, f"task.index: expected a whole number, got {index!r}")
    jobs = len(chief) if kind == "chief" else len(workers) - len(chief)
    if not 0 <= index < jobs:
        raise ClusterError(TF_CONFIG, f"task.index: {index} is not one of the {jobs} {kind} hosts")
    return ClusterSpec(workers, index if kind == "chief" else len(chief) + index)


def _from_indexed_job(hosts_text: str, index_text: str | None) -> ClusterSpec:
    hosts = _hosts(WORKER_HOSTS, WORKER_HOSTS, [host.strip() for host in hosts_text.split(",")])
    if index_text is None or not index_text.strip():
        raise ClusterError(WORKER_INDEX, f"required with {WORKER_HOSTS} (this worker's index)")
    try:
        index = int(index_text)
    except ValueError:
        raise ClusterError(WORKER_INDEX, f"expected a whole number, got {index_text!r}") from None
    if not 0 <= index < len(hosts):
        raise ClusterError(WORKER_INDEX, f"{index} is not the index of one of the {len(hosts)} hosts")
    return ClusterSpec(hosts, index)


def _hosts(variable: str, field: str, value: Any) -> tuple[str, ...]:
    if not isinstance(value, list):
        raise ClusterError(variable, f"{field}: expected a list of host:port, got {value!r}")
    hosts = []
    for host in value:
        name, _, port = str(host).rpartition(":") if isinstance(host, str) else ("", "", "")
        if not name or not port.isdigit() or not 0 < int(port) < 65536:
            raise ClusterError(variable, f"{field}: expected host:port, got {host!r}")
        hosts.append(host)
    if len(set(hosts)) != len(hosts):
        raise ClusterError(variable, f"{field}: a host is listed twice ({', '.join(hosts)})")
    return tuple(hosts)


class Distribution:
    """A started multi-worker strategy and the collectives the loops use. Create it before
    TensorFlow runs anything else: the collectives are configured at context start-up."""

    def __init__(self, cluster: ClusterSpec) -> None:
        import tensorflow as tf

        self.cluster = cluster
        resolver = tf.distribute.cluster_resolver.SimpleClusterResolver(
            tf.train.ClusterSpec({"worker": list(cluster.workers)}),
            task_type="worker",
            task_id=cluster.index,
            rpc_layer="grpc",
        )
        # Ring all-reduce over gRPC: the CPU collective (NCCL is for GPUs, and AUTO picks RING on CPU).
        self.strategy = tf.distribute.MultiWorkerMirroredStrategy(
            cluster_resolver=resolver,
            communication_options=tf.distribute.experimental.CommunicationOptions(
                implementation=tf.distribute.experimental.CommunicationImplementation.RING
            ),
        )
        if self.strategy.num_replicas_in_sync != cluster.size:
            # Each worker feeds its slice to its one replica: several local devices would
            # each train on the same slice.
            raise ValueError(
                f"{self.strategy.num_replicas_in_sync} replicas for {cluster.size} workers: the build"
                " trains one replica per worker (hide extra GPUs with CUDA_VISIBLE_DEVICES)"
            )
        strategy = self.strategy

        # One function for every gather (a new one per call would be traced on every call).
        @tf.function(reduce_retracing=True)  # type: ignore[untyped-decorator]
        def gather(local: tf.Tensor) -> tf.Tensor:
            return strategy.gather(strategy.run(tf.identity, args=(local,)), axis=0)

        self._gather = gather

    @property
    def workers(self) -> int:
        return self.cluster.size

    @property
    def is_chief(self) -> bool:
        return self.cluster.is_chief

    def shard(self, rows: np.ndarray) -> np.ndarray:
        """This worker's slice of a global batch (contiguous; sizes differ by at most one)."""
        part: np.ndarray = np.array_split(rows, self.workers)[self.cluster.index]
        return part

    def gather(self, values: np.ndarray) -> np.ndarray:
        """Every worker's `values` (same shape and dtype on each), stacked in worker order:
        the same array on every worker."""
        import tensorflow as tf

        gathered: np.ndarray = self._gather(tf.constant(values[None, ...])).numpy()
        return gathered

    def sum(self, values: np.ndarray) -> np.ndarray:
        """The sum over workers of `values`, added in worker order: bit-identical everywhere, so
        decisions taken from it (early stopping) are the same on every worker."""
        total: np.ndarray = self.gather(np.asarray(values, dtype=np.float64)).sum(axis=0)
        return total

    def check_same(self, what: str, arrays: Iterable[np.ndarray]) -> None:
        """Raise on every worker alike if the workers' `arrays` differ: training on different
        data would diverge, or hang on a worker with a batch more than another. (An iterable:
        lazily gathered columns are materialised one at a time.)"""
        digest = 0
        for array in arrays:
            contiguous = np.ascontiguousarray(array)
            digest = zlib.crc32(str((contiguous.dtype.str, contiguous.shape)).encode(), digest)
            digest = zlib.crc32(contiguous.tobytes(), digest)
        digests = self.gather(np.array([digest], dtype=np.int64))[:, 0]
        if np.unique(digests).shape[0] > 1:
            raise WorkerMismatch(
                f"{what}: the workers prepared different data (checksums by worker: {digests.tolist()});"
                " every worker must run the same build (data, flags, seed, versions)"
            )

    @contextmanager
    def scope(self) -> Iterator[None]:
        with self.strategy.scope():
            yield


def scope(distribution: Distribution | None) -> Any:
    """`distribution`'s variable scope, or no scope at all for a single-process build."""
    return nullcontext() if distribution is None else distribution.scope()
