"""One logical homeserver as a main process and Synapse workers, on loopback.

`WorkerHomeserver` is a `loopback.Homeserver` (the main process: server name
`localhost:PORT`, client and federation over TLS on 127.0.0.1:PORT, where other
homeservers reach it) that starts and stops, with it:

- a `RedisServer` (Debian's `redis-server`, on a free loopback port, nothing saved
  to disk) carrying Synapse's replication stream;
- one `Worker` (`synapse.app.generic_worker`) per `WorkerSpec`, each with its own
  TLS listener on its own port serving the resources its spec names, and the duty
  it names: `federation_sender` (`federation_sender_instances`) or
  `background_tasks` (`run_background_tasks_on`).

Workers are reached directly on their own ports: a worker's `server_name` is the
main process's (it is the same homeserver) and its `base_url` is its own listener,
so a test can sign a federation request for the homeserver and send it to one
particular worker, or call the admin API on one particular process. The main
process has a plain-HTTP replication listener (`instance_map: main`).

Workers need PostgreSQL (Synapse refuses SQLite with workers). The main process
starts first (it creates or upgrades the schema), then the workers all at once.
"""

import shutil
import socket
import subprocess
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import attr
import yaml

from synapse_relay.loopback import (
    Homeserver,
    HomeserverError,
    Service,
    SynapseProcess,
    free_port,
    tail,
    wait_until,
)

FEDERATION_SENDER = "federation_sender"
BACKGROUND_TASKS = "background_tasks"


class RedisError(RuntimeError):
    """The Redis server could not be started."""


class RedisServer(Service):
    """`redis-server` on 127.0.0.1:<free port>, keeping nothing on disk."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.host = "127.0.0.1"
        self.port = free_port()
        self.log_path = workdir / "redis.log"
        self.pid_path = workdir / "redis.pid"  # written by whoever needs it
        self._process: subprocess.Popen[bytes] | None = None

    @staticmethod
    def available() -> bool:
        return shutil.which("redis-server") is not None

    @property
    def is_running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    @property
    def pid(self) -> int | None:
        return self._process.pid if self.is_running and self._process else None

    def start(self, timeout: float = 30) -> None:
        program = shutil.which("redis-server")
        if program is None:
            raise RedisError("redis-server not found: apt-get install redis-server")
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._process = subprocess.Popen(
            [
                program,
                "--bind",
                self.host,
                "--port",
                str(self.port),
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.workdir),
                "--logfile",
                str(self.log_path),
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            wait_until(self._answers, timeout, message=f"Redis on port {self.port}")
        except (RedisError, TimeoutError) as e:
            self.stop()
            raise RedisError(f"{e}\n{tail(self.log_path, 20)}") from None

    def _answers(self) -> bool:
        assert self._process is not None
        if self._process.poll() is not None:
            raise RedisError(f"redis-server exited with code {self._process.poll()}")
        try:
            with socket.create_connection((self.host, self.port), timeout=2) as s:
                s.sendall(b"PING\r\n")
                return s.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def stop(self) -> None:
        if self._process is None:
            return
        if self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(10)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
        self._process = None


@attr.s(frozen=True, auto_attribs=True)
class WorkerSpec:
    """A generic worker: its name, the listener resources it serves (`client`,
    `federation`) and its duties (FEDERATION_SENDER, BACKGROUND_TASKS)."""

    name: str
    resources: tuple[str, ...]
    duties: tuple[str, ...] = ()


# Two federation readers (the relay role's endpoints), a federation sender (the
# send role) and the background-tasks instance (the receive role, the relay's
# purge); the last two serve the client API too, for the admin API.
STANDARD_WORKERS = (
    WorkerSpec("federation1", ("federation",)),
    WorkerSpec("federation2", ("federation",)),
    WorkerSpec("sender1", ("client",), (FEDERATION_SENDER,)),
    WorkerSpec("background1", ("client",), (BACKGROUND_TASKS,)),
)


class Worker(SynapseProcess):
    """One generic worker of `main`, with its own TLS listener on `port`."""

    app = "synapse.app.generic_worker"

    def __init__(self, main: "WorkerHomeserver", spec: WorkerSpec) -> None:
        self.port = free_port()
        super().__init__(main.workdir, spec.name, f"https://127.0.0.1:{self.port}")
        self.main = main
        self.spec = spec
        self.name = spec.name
        self.config_path = main.workdir / f"{spec.name}.yaml"
        self.log_config_path = main.workdir / f"{spec.name}-log.yaml"
        self.pid_path = main.workdir / f"{spec.name}.pid"  # written by whoever needs it

    def __repr__(self) -> str:
        return f"<Worker {self.name} of {self.server_name} on port {self.port}>"

    @property
    def server_name(self) -> str:
        """The homeserver's name: a worker is part of it."""
        return self.main.server_name

    def write_config(self) -> None:
        config = {
            "worker_app": self.app,
            "worker_name": self.name,
            "worker_log_config": str(self.log_config_path),
            "worker_listeners": [
                {
                    "type": "http",
                    "port": self.port,
                    "bind_addresses": ["127.0.0.1"],
                    "tls": True,
                    "x_forwarded": False,
                    "resources": [
                        {"names": list(self.spec.resources), "compress": False}
                    ],
                }
            ],
        }
        self.log_config_path.write_text(yaml.safe_dump(self.log_config()))
        self.config_path.write_text(yaml.safe_dump(config, sort_keys=False))

    @property
    def config_paths(self) -> list[Path]:
        return [self.main.config_path, self.config_path]


class WorkerHomeserver(Homeserver):
    """A homeserver run as a main process plus `workers` (STANDARD_WORKERS by
    default) and a Redis server, on the PostgreSQL `database` (required).

    `workers` maps each worker's name to its `Worker`; `start()` starts Redis, the
    main process, then the workers; `stop()` stops them all.

    Other homeservers reach it on the main process's port, or with
    `federation_worker` on that worker's (the server name is `localhost:<its
    port>`), as a reverse proxy sends federation to a federation reader.
    """

    def __init__(
        self,
        *,
        workdir: Path,
        port: int,
        cert: tuple[Path, Path],
        database: dict[str, Any] | None,
        module_config: dict[str, Any] | None = None,
        extra_config: dict[str, Any] | None = None,
        workers: Sequence[WorkerSpec] = STANDARD_WORKERS,
        federation_worker: str | None = None,
    ) -> None:
        if database is None or database.get("name") != "psycopg2":
            raise HomeserverError("Synapse workers need a PostgreSQL database")
        super().__init__(
            workdir=workdir,
            port=port,
            cert=cert,
            module_config=module_config,
            database=database,
            extra_config=extra_config,
        )
        self.redis = RedisServer(workdir)
        self.replication_port = free_port()
        self.workers = {spec.name: Worker(self, spec) for spec in workers}
        if federation_worker is not None:
            self.server_name = f"localhost:{self.workers[federation_worker].port}"

    def __repr__(self) -> str:
        return f"<WorkerHomeserver {self.server_name} in {self.workdir}>"

    def with_duty(self, duty: str) -> Worker:
        """The worker that has `duty` (FEDERATION_SENDER, BACKGROUND_TASKS)."""
        return next(w for w in self.workers.values() if duty in w.spec.duties)

    def config(self) -> dict[str, Any]:
        config = super().config()
        config["listeners"].append(
            {
                "port": self.replication_port,
                "bind_addresses": ["127.0.0.1"],
                "type": "http",
                "resources": [{"names": ["replication"]}],
            }
        )
        config["instance_map"] = {
            "main": {"host": "127.0.0.1", "port": self.replication_port}
        }
        config["redis"] = {
            "enabled": True,
            "host": self.redis.host,
            "port": self.redis.port,
        }
        duties = {
            duty: [w.name for w in self.workers.values() if duty in w.spec.duties]
            for duty in (FEDERATION_SENDER, BACKGROUND_TASKS)
        }
        if duties[FEDERATION_SENDER]:
            config["federation_sender_instances"] = duties[FEDERATION_SENDER]
        if duties[BACKGROUND_TASKS]:
            (config["run_background_tasks_on"],) = duties[BACKGROUND_TASKS]
        return config

    @property
    def processes(self) -> list[SynapseProcess]:
        """The main process and its workers."""
        return [self, *self.workers.values()]

    def start(self, timeout: float = 60) -> None:
        """Start Redis, the main process, then all workers at once."""
        try:
            self.redis.start()
            super().start(timeout)
            for worker in self.workers.values():
                worker.launch()
            for worker in self.workers.values():
                worker.wait_healthy(timeout)
        except BaseException:
            self.stop()
            raise

    def stop(self, timeout: float = 20) -> None:
        """Stop the workers (all at once), then the main process and Redis."""
        with ThreadPoolExecutor(len(self.workers) or 1) as pool:
            for future in [
                pool.submit(worker.stop, timeout) for worker in self.workers.values()
            ]:
                future.result()
        super().stop(timeout)
        self.redis.stop()

    def kill(self) -> None:
        for worker in self.workers.values():
            worker.kill()
        super().kill()
        self.redis.stop()
