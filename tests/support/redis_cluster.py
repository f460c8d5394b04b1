"""A private Redis Cluster on loopback: three masters and three replicas, each a real
`redis-server --cluster-enabled yes` on free ports, joined by `redis-cli --cluster create`.
Everything lives under one temporary directory and nothing is persisted."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import redis
from redis.crc import key_slot

from tests.support.stack import free_ports

MASTERS = 3
# Short, so that a killed master's replica is promoted within about a second (Redis's default
# is 15 s); the manual failover a test triggers does not wait for it.
NODE_TIMEOUT_MS = 1_000


def cluster_tools_missing() -> str | None:
    """Why a cluster cannot be started here (None when it can)."""
    missing = [tool for tool in ("redis-server", "redis-cli") if shutil.which(tool) is None]
    return f"{' and '.join(missing)} not on PATH" if missing else None


@dataclass
class ClusterNode:
    port: int
    bus_port: int
    directory: Path
    process: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def client(self) -> redis.Redis:
        return redis.Redis(port=self.port, socket_timeout=2.0)


class PrivateRedisCluster:
    """Started by `start()`, stopped by `close()`. `url` is what the feature store takes."""

    def __init__(self, masters: int = MASTERS) -> None:
        self._root = Path(tempfile.mkdtemp(prefix="recsys-test-cluster-"))
        ports = free_ports(4 * masters)  # a client port and a bus port per node
        self.nodes = [
            ClusterNode(ports[2 * index], ports[2 * index + 1], self._root / str(ports[2 * index]))
            for index in range(2 * masters)
        ]
        self.masters = masters
        self.url = f"redis+cluster://127.0.0.1:{self.nodes[0].port}/0"

    def start(self) -> None:
        for node in self.nodes:
            node.directory.mkdir(parents=True, exist_ok=True)
            self._spawn(node)
        for node in self.nodes:
            self._wait_pong(node)
        created = subprocess.run(
            [
                "redis-cli",
                "--cluster",
                "create",
                *(node.address for node in self.nodes),
                "--cluster-replicas",
                "1",
                "--cluster-yes",
            ],
            capture_output=True,
            timeout=60,
            check=False,
        )
        if created.returncode != 0:
            raise RuntimeError(f"redis-cli --cluster create failed:\n{created.stdout.decode()}")
        self.wait_ok()
        for master in self.master_nodes():
            self.wait_in_sync(self.replica_of(master))

    def _spawn(self, node: ClusterNode) -> None:
        node.process = subprocess.Popen(
            [
                "redis-server",
                "--port",
                str(node.port),
                "--cluster-port",
                str(node.bus_port),  # not port + 10000, which may be taken or past 65535
                "--bind",
                "127.0.0.1",
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                str(node.directory / "nodes.conf"),
                "--cluster-node-timeout",
                str(NODE_TIMEOUT_MS),
                # Redis waits 5 s for more replicas before a diskless full sync; here each
                # master has one, and the tests start once it is in sync.
                "--repl-diskless-sync-delay",
                "0",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(node.directory),
                "--logfile",
                str(node.directory / "redis.log"),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    def _wait_pong(self, node: ClusterNode, seconds: float = 10.0) -> None:
        deadline = time.monotonic() + seconds
        while True:
            try:
                with node.client() as client:
                    client.ping()
                return
            except redis.ConnectionError:
                assert node.process is not None
                if time.monotonic() > deadline or node.process.poll() is not None:
                    raise
                time.sleep(0.02)

    def wait_ok(self, seconds: float = 20.0) -> None:
        """Until every running node reports `cluster_state:ok` and sees the same masters."""
        deadline = time.monotonic() + seconds
        while True:
            states = []
            for node in self.running_nodes():
                try:
                    with node.client() as client:
                        info = client.execute_command("CLUSTER", "INFO")
                except redis.RedisError:
                    states.append(False)
                    continue
                text = info.decode() if isinstance(info, bytes) else str(info)
                states.append("cluster_state:ok" in text)
            if states and all(states):
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"the cluster under {self._root} is not ok after {seconds} s")
            time.sleep(0.05)

    def running_nodes(self) -> list[ClusterNode]:
        return [node for node in self.nodes if node.process is not None and node.process.poll() is None]

    def roles(self) -> dict[int, str]:
        """Each running node's port → `master` or `slave`, as the node itself says."""
        roles = {}
        for node in self.running_nodes():
            with node.client() as client:
                role = client.execute_command("ROLE")
            roles[node.port] = role[0].decode() if isinstance(role[0], bytes) else str(role[0])
        return roles

    def replica_of(self, master: ClusterNode, seconds: float = 10.0) -> ClusterNode:
        """`master`'s replica (waiting for it to connect, as right after the cluster forms)."""
        deadline = time.monotonic() + seconds
        while True:
            with master.client() as client:
                info = client.info("replication")
            replicas = [
                value for key, value in info.items() if key.startswith("slave") and isinstance(value, dict)
            ]
            ports = {int(replica["port"]) for replica in replicas}
            found = [node for node in self.running_nodes() if node.port in ports]
            if len(found) == 1:
                return found[0]
            if time.monotonic() > deadline:
                raise TimeoutError(f"{master.address} has {len(found)} replicas, expected one")
            time.sleep(0.02)

    def master_nodes(self) -> list[ClusterNode]:
        return [node for node in self.running_nodes() if self.roles()[node.port] == "master"]

    def manual_failover(self, master: ClusterNode, seconds: float = 10.0) -> ClusterNode:
        """`CLUSTER FAILOVER` on `master`'s replica; returns it once it is master and the
        cluster is ok again."""
        replica = self.replica_of(master)
        # As an operator would: only a replica in sync takes over without a long pause (the
        # master holds writes back until the replica has caught up).
        self.wait_in_sync(replica, seconds)
        with replica.client() as client:
            client.execute_command("CLUSTER", "FAILOVER")
        deadline = time.monotonic() + seconds
        while self.roles().get(replica.port) != "master":
            if time.monotonic() > deadline:
                raise TimeoutError(f"{replica.address} did not take over from {master.address}")
            time.sleep(0.01)
        self.wait_ok(seconds)
        return replica

    def wait_in_sync(self, replica: ClusterNode, seconds: float = 10.0) -> None:
        """Until `replica`'s link to its master is up and no full sync is running."""
        deadline = time.monotonic() + seconds
        while True:
            with replica.client() as client:
                info = client.info("replication")
            if info.get("master_link_status") == "up" and not info.get("master_sync_in_progress"):
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"replica {replica.address} not in sync after {seconds} s")
            time.sleep(0.02)

    def kill(self, node: ClusterNode) -> None:
        """SIGKILL, as a crashed host would die (no goodbye to the other nodes)."""
        if node.process is not None and node.process.poll() is None:
            node.process.kill()
            node.process.wait(10)

    def restart(self, node: ClusterNode) -> None:
        """Start a killed node again with its cluster configuration: it rejoins as a replica
        of the node that took its slots, and the cluster is ok again."""
        self._spawn(node)
        self._wait_pong(node)
        self.wait_ok()
        deadline = time.monotonic() + 20
        while self.roles().get(node.port) != "slave":
            if time.monotonic() > deadline:
                raise TimeoutError(f"{node.address} did not rejoin as a replica")
            time.sleep(0.02)
        self.wait_in_sync(node)

    def master_of(self, key: str) -> ClusterNode:
        """The node serving `key`'s slot now."""
        slot = key_slot(key.encode())
        for node in self.running_nodes():
            with node.client() as client:
                for start, end, master, *_ in client.execute_command("CLUSTER", "SLOTS"):
                    if start <= slot <= end:
                        (owner,) = [other for other in self.nodes if other.port == int(master[1])]
                        return owner
        raise LookupError(f"no node serves slot {slot}")

    def close(self) -> None:
        for node in self.nodes:
            self.kill(node)
        shutil.rmtree(self._root, ignore_errors=True)
