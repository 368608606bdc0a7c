"""Real store topologies for the suite, from the embedded binary, on free loopback ports.

- `Single`: one server (the suite's plain case).
- `Cluster`: three masters sharing the 16384 slots (no replicas), joined by hand with
  CLUSTER ADDSLOTSRANGE and CLUSTER MEET, so no `valkey-cli` is needed.
- `Replicated`: a master, one replica and three sentinels monitoring them as `qg`.

Each has the store URL the coordinator takes (`url`), `wipe()` (every key and every
script cache, before a test) and `stop()`. Waiting for a topology to settle polls the
servers; nothing sleeps for a fixed time.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import redis

from quotagate.coordinator.embedded import EmbeddedServer, EmbeddedServerError, free_port

SLOTS = 16384
MASTER = "qg"


def until(what: str, check: Callable[[], bool], timeout: float = 30.0) -> None:
    """Poll `check` until it holds; raise naming `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if check():
                return
        except (redis.RedisError, OSError):
            pass
        if time.monotonic() > deadline:
            raise EmbeddedServerError(f"timed out waiting for {what}")
        time.sleep(0.05)


def _client(port: int) -> redis.Redis:
    return redis.Redis(port=port, socket_timeout=2)


def _wipe_node(port: int) -> None:
    with _client(port) as client:
        client.flushall()
        client.script_flush()  # so every test exercises the NOSCRIPT reload path


class Node(EmbeddedServer):
    """One server with extra configuration (cluster mode, replication) and its own dir."""

    def __init__(self, binary: Path, directory: Path, *extra: str) -> None:
        super().__init__(binary)
        self.directory = directory / str(self.port)
        self.directory.mkdir(parents=True)
        self.extra = extra

    def command(self) -> list[str]:
        return [*super().command(), "--dir", str(self.directory), *self.extra]

    def client(self) -> redis.Redis:
        return _client(self.port)


class SentinelNode(EmbeddedServer):
    """A sentinel: the same binary in `--sentinel` mode, from a config file it rewrites."""

    def __init__(self, binary: Path, directory: Path, master_port: int) -> None:
        super().__init__(binary)
        self.config = directory / f"sentinel-{self.port}.conf"
        self.config.write_text(
            f"port {self.port}\n"
            "bind 127.0.0.1\n"
            f"dir {directory}\n"
            f"sentinel monitor {MASTER} 127.0.0.1 {master_port} 2\n"
            f"sentinel down-after-milliseconds {MASTER} 1000\n"
            f"sentinel failover-timeout {MASTER} 5000\n"
            f"sentinel parallel-syncs {MASTER} 1\n"
        )

    def command(self) -> list[str]:
        return [str(self.binary), str(self.config), "--sentinel"]


class Single:
    name = "single"

    def __init__(self, binary: Path) -> None:
        self.server = EmbeddedServer(binary).start()
        self.url = self.server.url

    def wipe(self) -> None:
        _wipe_node(self.server.port)

    def stop(self) -> None:
        self.server.stop()


class Cluster:
    """Three masters; `masters[i]` serves slots [i * 16384 / 3, (i + 1) * 16384 / 3)."""

    name = "cluster"

    def __init__(self, binary: Path, count: int = 3) -> None:
        self.directory = Path(tempfile.mkdtemp(prefix="qg-cluster-"))
        self.masters: list[Node] = []
        self.buses: list[int] = []
        try:
            for _ in range(count):
                bus = free_port()
                node = Node(
                    binary,
                    self.directory,
                    "--cluster-enabled", "yes",
                    "--cluster-config-file", "nodes.conf",
                    "--cluster-node-timeout", "2000",
                    # The bus port defaults to port + 10000, which a free port may not have.
                    "--cluster-port", str(bus),
                )  # fmt: skip
                self.masters.append(node.start())
                self.buses.append(bus)
            self._join()
        except BaseException:
            self.stop()
            raise
        self.url = "redis+cluster://" + ",".join(f"127.0.0.1:{n.port}" for n in self.masters)

    def _join(self) -> None:
        count = len(self.masters)
        for i, node in enumerate(self.masters):
            with node.client() as client:
                first, last = i * SLOTS // count, (i + 1) * SLOTS // count - 1
                client.execute_command("CLUSTER ADDSLOTSRANGE", first, last)
                if i:
                    first_node = self.masters[0].port, self.buses[0]
                    client.execute_command("CLUSTER MEET", "127.0.0.1", *first_node)
        until("the cluster to cover every slot", self._settled)

    def _settled(self) -> bool:
        for node in self.masters:
            with node.client() as client:
                info = client.execute_command("CLUSTER INFO")  # parsed into a dict
                if info["cluster_state"] != "ok":
                    return False
                if int(info["cluster_known_nodes"]) != len(self.masters):
                    return False
        return True

    def master_of(self, key: str) -> Node:
        """The master that holds `key`'s slot."""
        slot = redis.crc.key_slot(key.encode())
        return self.masters[slot * len(self.masters) // SLOTS]

    def move_slot_of(self, key: str, target: Node) -> None:
        """Migrate the slot of `key`, with its keys, to `target` (as a resharding does)."""
        slot = redis.crc.key_slot(key.encode())
        ids = {}
        for node in self.masters:
            with node.client() as client:
                ids[node.port] = client.execute_command("CLUSTER MYID").decode()
        source = next(node for node in self.masters if self._serves(node, slot))
        if source is target:
            return
        with target.client() as to, source.client() as frm:
            to.execute_command("CLUSTER SETSLOT", slot, "IMPORTING", ids[source.port])
            frm.execute_command("CLUSTER SETSLOT", slot, "MIGRATING", ids[target.port])
            while keys := frm.execute_command("CLUSTER GETKEYSINSLOT", slot, 100):
                frm.execute_command("MIGRATE", "127.0.0.1", target.port, "", 0, 5000, "KEYS", *keys)
            for node in self.masters:
                with node.client() as client:
                    client.execute_command("CLUSTER SETSLOT", slot, "NODE", ids[target.port])
        until("every node to agree on the moved slot", lambda: all(
            self._owner(node, slot) == target.port for node in self.masters
        ))  # fmt: skip

    def _owner(self, node: Node, slot: int) -> int:
        with node.client() as client:
            for first, last, owner, *_ in client.execute_command("CLUSTER SLOTS"):
                if first <= slot <= last:
                    return int(owner[1])
        return 0

    def _serves(self, node: Node, slot: int) -> bool:
        return self._owner(node, slot) == node.port

    def wipe(self) -> None:
        for node in self.masters:
            _wipe_node(node.port)

    def stop(self) -> None:
        for node in self.masters:
            node.stop()
        shutil.rmtree(self.directory, ignore_errors=True)


class Replicated:
    """A master and one replica watched by three sentinels (quorum 2), as `qg`."""

    name = "sentinel"

    def __init__(self, binary: Path) -> None:
        self.directory = Path(tempfile.mkdtemp(prefix="qg-sentinel-"))
        self.nodes: list[Node] = []
        self.sentinels: list[SentinelNode] = []
        try:
            primary = Node(binary, self.directory).start()
            self.nodes.append(primary)
            replica = Node(binary, self.directory, "--replicaof", "127.0.0.1", str(primary.port))
            self.nodes.append(replica.start())
            for _ in range(3):
                self.sentinels.append(SentinelNode(binary, self.directory, primary.port).start())
            self.ready_for_failover()
        except BaseException:
            self.stop()
            raise
        self.url = (
            "redis+sentinel://"
            + ",".join(f"127.0.0.1:{s.port}" for s in self.sentinels)
            + f"/{MASTER}"
        )

    def master_port(self) -> int:
        with _client(self.sentinels[0].port) as sentinel:
            _, port = sentinel.sentinel_get_master_addr_by_name(MASTER)
            return int(port)

    def master(self) -> Node:
        port = self.master_port()
        return next(node for node in self.nodes if node.port == port)

    def settle(self, timeout: float = 30.0) -> None:
        """Wait until every sentinel names the same master and that server says it is one."""
        until("the sentinels to agree on a master", self._agreed, timeout)

    def ready_for_failover(self, timeout: float = 30.0) -> None:
        """Wait until, besides, every sentinel knows the replica in sync and the other
        sentinels: then a SENTINEL FAILOVER can proceed."""
        until("the sentinels to know a replica in sync", self._replicated, timeout)

    def _agreed(self) -> bool:
        ports = set()
        for sentinel_node in self.sentinels:
            with _client(sentinel_node.port) as sentinel:
                state = sentinel.sentinel_master(MASTER)
                if state["flags"] != "master":
                    return False
                ports.add(int(state["port"]))
        if len(ports) != 1:
            return False
        with _client(ports.pop()) as master:
            return bool(master.info("replication")["role"] == "master")

    def _replicated(self) -> bool:
        for sentinel_node in self.sentinels:
            with _client(sentinel_node.port) as sentinel:
                state = sentinel.sentinel_master(MASTER)
                if state["num-other-sentinels"] < 2:
                    return False
                replicas = sentinel.sentinel_slaves(MASTER)
                if not any(r["flags"] == "slave" and r["master-link-status"] == "ok"
                           for r in replicas):  # fmt: skip
                    return False
        return self._agreed()

    def failover(self) -> None:
        """SENTINEL FAILOVER: promote the replica; the old master becomes its replica."""
        with _client(self.sentinels[0].port) as sentinel:
            sentinel.execute_command("SENTINEL FAILOVER", MASTER)

    def wipe(self) -> None:
        self.settle()
        _wipe_node(self.master_port())
        for node in self.nodes:
            with node.client() as client:
                client.script_flush()

    def stop(self) -> None:
        for process in (*self.sentinels, *self.nodes):
            process.stop()
        shutil.rmtree(self.directory, ignore_errors=True)


Topology = Single | Cluster | Replicated
