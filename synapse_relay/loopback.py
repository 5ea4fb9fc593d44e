"""Real Synapse homeservers on loopback, for the demo, the tests and the benchmarks.

A `Homeserver` is a real `synapse.app.homeserver` process with this module loaded,
named `localhost:PORT`, serving the client and federation APIs over TLS on
127.0.0.1:PORT with a self-signed certificate. Homeservers started this way federate
with each other (certificate checks off, loopback allowed) and with nothing else
(`trusted_key_servers: []`). `PostgresCluster` is a throwaway PostgreSQL server for
their databases.

This file is synchronous on purpose: it drives processes and speaks plain HTTP to
them, as an admin's script would, with `requests` (a dependency of Synapse).
"""

import contextlib
import datetime
import glob
import hashlib
import hmac
import ipaddress
import itertools
import os
import pwd
import random
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

import psycopg2
import requests
import urllib3
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from psycopg2 import sql
from signedjson.key import generate_signing_key, write_signing_keys

# Every server here uses a self-signed certificate.
urllib3.disable_warnings(urllib3.exceptions.InsecureRequestWarning)

MODULE = "synapse_relay.RelayModule"
DEFAULT_PASSWORD = "harness-password"
HTTP_TIMEOUT = 30

T = TypeVar("T")


# Ports handed out are taken from below Linux's ephemeral range (32768-60999 by
# default, /proc/sys/net/ipv4/ip_local_port_range): a port the kernel picked
# (bind to port 0) is also what it gives to the next outgoing connections, so
# between handing it out and the server binding it, a client connection could take
# it as its local port and the server fail with "address in use".
_PORTS = range(10_000, 32_000)
_handed_out: set[int] = set()
_ports_lock = threading.Lock()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now, not handed out
    before by this process."""
    rng = random.SystemRandom()
    with _ports_lock:
        while True:
            port = rng.choice(_PORTS)
            if port in _handed_out:
                continue
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
                try:
                    sock.bind(("127.0.0.1", port))
                except OSError:
                    continue
            _handed_out.add(port)
            return port


def wait_until(
    predicate: Callable[[], T],
    timeout: float,
    interval: float = 0.1,
    message: str = "condition",
) -> T:
    """Call `predicate` every `interval` seconds until it returns something truthy,
    and return that. Raise TimeoutError after `timeout` seconds. Exceptions of
    `predicate` propagate, so it can abort the wait."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() >= deadline:
            raise TimeoutError(f"{message} not met within {timeout} s")
        time.sleep(interval)


@contextmanager
def terminated_as_interrupt() -> Iterator[None]:
    """Within it, SIGTERM raises KeyboardInterrupt, so that the code that stops
    servers on Ctrl-C stops them on `kill` too."""

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def tail(path: Path, n: int) -> str:
    """The last `n` lines of a text file, or a note that it does not exist."""
    if not path.exists():
        return f"({path.name} does not exist)"
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    return "\n".join(lines[-n:])


S = TypeVar("S", bound="Service")


class Service:
    """Something started and stopped, usable as `with service: ...`, which starts
    it unless it is running and always stops it."""

    @property
    def is_running(self) -> bool:
        raise NotImplementedError

    def start(self) -> object:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def __enter__(self: S) -> S:
        if not self.is_running:
            self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


class SilentListener(Service):
    """A loopback TCP port that accepts connections and never answers (nor closes
    them): a destination that went silent (a sleeping phone, a stale NAT mapping).
    Stopping it closes every connection, so that waiting clients fail at once."""

    def __init__(self, port: int) -> None:
        self.port = port
        self._socket: socket.socket | None = None
        self._connections: list[socket.socket] = []
        self._thread: threading.Thread | None = None

    @property
    def is_running(self) -> bool:
        return self._socket is not None

    def start(self) -> None:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        self._socket = listener
        self._thread = threading.Thread(target=self._accept, args=(listener,))
        self._thread.daemon = True
        self._thread.start()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                connection, _ = listener.accept()
            except OSError:  # closed by stop()
                return
            self._connections.append(connection)

    @property
    def connections(self) -> int:
        """How many connections it accepted."""
        return len(self._connections)

    def stop(self) -> None:
        listener, self._socket = self._socket, None
        if listener is None:
            return
        with contextlib.suppress(OSError):
            listener.shutdown(socket.SHUT_RDWR)  # wakes accept() on Linux
        listener.close()
        if self._thread is not None:
            self._thread.join(5)
        for connection in self._connections:
            connection.close()
        self._connections.clear()


class HomeserverError(RuntimeError):
    """A homeserver failed to start or to answer as expected."""


_GENEROUS = {"per_second": 1000, "burst_count": 10000}
_RATE_LIMITS: dict[str, Any] = {
    **dict.fromkeys(
        (
            "rc_message",
            "rc_registration",
            "rc_registration_token_validity",
            "rc_admin_redaction",
            "rc_joins_per_room",
            "rc_key_requests",
            "rc_3pid_validation",
            "rc_third_party_invite",
            "rc_media_create",
            "rc_delayed_event_mgmt",
            "rc_room_creation",
            "rc_reports",
            "rc_user_directory",
            "rc_profile",
        ),
        _GENEROUS,
    ),
    "rc_login": dict.fromkeys(("address", "account", "failed_attempts"), _GENEROUS),
    "rc_joins": dict.fromkeys(("local", "remote"), _GENEROUS),
    "rc_invites": dict.fromkeys(("per_room", "per_user", "per_issuer"), _GENEROUS),
    "rc_presence": {"per_user": _GENEROUS},
    "rc_federation": {
        "window_size": 1000,
        "sleep_limit": 1000,
        "sleep_delay": 1,
        "reject_limit": 10000,
        "concurrent": 1000,
    },
}

_LOG_FORMAT = (
    "%(asctime)s - %(name)s - %(lineno)d - %(levelname)s - %(request)s - %(message)s"
)


class SynapseProcess(Service):
    """One Synapse process (the main process or a worker) started from
    `config_paths`, serving HTTPS on `base_url` (healthy when its `/health`
    answers 200); its log in `log_path`, its stdout and stderr in `stdout_path`."""

    app = "synapse.app.homeserver"

    def __init__(self, workdir: Path, name: str, base_url: str) -> None:
        self.workdir = workdir
        self.base_url = base_url
        self.log_path = workdir / f"{name}.log"
        self.stdout_path = workdir / f"{name}-stdout.log"
        self._process: subprocess.Popen[bytes] | None = None

    def write_config(self) -> None:
        raise NotImplementedError

    @property
    def config_paths(self) -> list[Path]:
        raise NotImplementedError

    def log_config(self) -> dict[str, Any]:
        """Synapse's logging configuration: INFO and above to `log_path`."""
        return {
            "version": 1,
            "formatters": {"precise": {"format": _LOG_FORMAT}},
            "filters": {
                "context": {"()": "synapse.logging.context.LoggingContextFilter"}
            },
            "handlers": {
                "file": {
                    "class": "logging.FileHandler",
                    "formatter": "precise",
                    "filters": ["context"],
                    "filename": str(self.log_path),
                    "encoding": "utf8",
                }
            },
            "loggers": {"synapse.storage.SQL": {"level": "INFO"}},
            "root": {"level": "INFO", "handlers": ["file"]},
            "disable_existing_loggers": False,
        }

    @property
    def pid(self) -> int | None:
        return self._process.pid if self.is_running and self._process else None

    @property
    def is_running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def start(self, timeout: float = 60) -> None:
        """Write the configuration, start Synapse and wait until it is healthy."""
        self.launch()
        self.wait_healthy(timeout)

    def launch(self) -> None:
        """Write the configuration and start the process, without waiting."""
        if self.is_running:
            raise HomeserverError(f"{self} is already running")
        self.write_config()
        with self.stdout_path.open("ab") as stdout:
            self._process = subprocess.Popen(
                self.command(),
                cwd=self.workdir,
                env={**os.environ, **self.environment()},
                stdin=subprocess.DEVNULL,
                stdout=stdout,
                stderr=subprocess.STDOUT,
            )

    def command(self) -> list[str]:
        """The command line of the process, run in `workdir` with `environment()`."""
        configs = itertools.chain.from_iterable(
            ("-c", str(p)) for p in self.config_paths
        )
        return [sys.executable, "-m", self.app, *configs]

    def environment(self) -> dict[str, str]:
        """The variables the process needs beyond ours: PYTHONPATH leading to this
        checkout when the package runs from one."""
        path = os.pathsep.join(
            filter(None, [_checkout_root(), os.environ.get("PYTHONPATH")])
        )
        return {"PYTHONPATH": path} if path else {}

    def wait_healthy(self, timeout: float = 60) -> None:
        """Wait until /health answers 200. On failure the process is killed and
        HomeserverError carries the ends of its logs."""
        try:
            wait_until(self._healthy, timeout, message=f"{self} healthy")
        except (HomeserverError, TimeoutError) as e:
            self.kill()
            raise HomeserverError(f"{e}\n{self.failure_report()}") from None
        except BaseException:  # e.g. KeyboardInterrupt: leave nothing running
            self.kill()
            raise

    def _healthy(self) -> bool:
        assert self._process is not None
        code = self._process.poll()
        if code is not None:
            raise HomeserverError(f"{self} exited with code {code} during start-up")
        try:
            response = requests.get(f"{self.base_url}/health", verify=False, timeout=5)
        except requests.RequestException:
            return False
        return response.status_code == 200

    def stop(self, timeout: float = 20) -> None:
        """SIGTERM, then SIGKILL if it has not exited after `timeout` seconds."""
        if self._process is None:
            return
        if self._process.poll() is None:
            self._process.send_signal(signal.SIGTERM)
            try:
                self._process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        self._process = None

    def kill(self) -> None:
        """SIGKILL and reap the process (a crash, for tests)."""
        if self._process is None:
            return
        if self._process.poll() is None:
            self._process.kill()
            self._process.wait()
        self._process = None

    def restart(self, timeout: float = 60) -> None:
        self.stop()
        self.start(timeout)

    def client(
        self,
        method: str,
        path: str,
        token: str | None = None,
        json: Any = None,
        params: dict[str, Any] | None = None,
    ) -> requests.Response:
        """A client-API (or admin-API) request; `path` starts with `/_matrix` or
        `/_synapse`."""
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return requests.request(
            method,
            self.base_url + path,
            headers=headers,
            json=json,
            params=params,
            verify=False,
            timeout=HTTP_TIMEOUT,
        )

    def log_tail(self, n: int = 40) -> str:
        """The last `n` lines of the log."""
        return tail(self.log_path, n)

    def failure_report(self, n: int = 40) -> str:
        return (
            f"--- last {n} lines of {self.log_path}\n{tail(self.log_path, n)}\n"
            f"--- last {n} lines of {self.stdout_path}\n{tail(self.stdout_path, n)}"
        )


class Homeserver(SynapseProcess):
    """One Synapse process: server name `localhost:<port>`, a single TLS listener
    on 127.0.0.1:<port> serving the client and federation APIs.

    `module_config` is the `config:` of synapse_relay.RelayModule (None: the module
    is not loaded); `database` is a Synapse `database:` section (None: SQLite in
    `workdir`); `extra_config` is merged last, shallowly, into homeserver.yaml.
    Change `module_config` (or the others) and `restart()` to reconfigure.
    """

    def __init__(
        self,
        *,
        workdir: Path,
        port: int,
        cert: tuple[Path, Path],
        module_config: dict[str, Any] | None = None,
        database: dict[str, Any] | None = None,
        extra_config: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(workdir, "homeserver", f"https://127.0.0.1:{port}")
        self.port = port
        self.cert = cert
        self.module_config = module_config
        self.database = database
        self.extra_config = extra_config
        self.server_name = f"localhost:{port}"
        self.config_path = workdir / "homeserver.yaml"
        self.registration_shared_secret = secrets.token_hex(16)
        self._secrets = {
            "macaroon_secret_key": secrets.token_hex(16),
            "form_secret": secrets.token_hex(16),
        }
        workdir.mkdir(parents=True, exist_ok=True)
        self.signing_key_path = workdir / "signing.key"
        # Synapse writes it when started with --daemonize
        self.pid_path = workdir / "homeserver.pid"
        with self.signing_key_path.open("w") as f:
            write_signing_keys(f, [generate_signing_key("a_" + secrets.token_hex(2))])

    def __repr__(self) -> str:
        return f"<Homeserver {self.server_name} in {self.workdir}>"

    # -- configuration -------------------------------------------------------

    def config(self) -> dict[str, Any]:
        """The content of homeserver.yaml for the current attributes."""
        tls_cert, tls_key = self.cert
        config: dict[str, Any] = {
            "server_name": self.server_name,
            "public_baseurl": f"{self.base_url}/",
            "pid_file": str(self.pid_path),
            "listeners": [
                {
                    "port": self.port,
                    "bind_addresses": ["127.0.0.1"],
                    "type": "http",
                    "tls": True,
                    "x_forwarded": False,
                    "resources": [
                        {"names": ["client", "federation"], "compress": False}
                    ],
                }
            ],
            "tls_certificate_path": str(tls_cert),
            "tls_private_key_path": str(tls_key),
            "signing_key_path": str(self.signing_key_path),
            "database": self.database
            or {
                "name": "sqlite3",
                "args": {"database": str(self.workdir / "homeserver.db")},
            },
            "log_config": str(self.workdir / "log.yaml"),
            "media_store_path": str(self.workdir / "media_store"),
            "federation_verify_certificates": False,
            "federation_ip_range_blacklist": [],
            "ip_range_blacklist": [],
            "report_stats": False,
            "trusted_key_servers": [],
            "suppress_key_server_warning": True,
            "registration_shared_secret": self.registration_shared_secret,
            "enable_registration": False,
            **self._secrets,
            **_RATE_LIMITS,
        }
        if self.module_config is not None:
            config["modules"] = [{"module": MODULE, "config": self.module_config}]
        config.update(self.extra_config or {})
        return config

    def write_config(self) -> None:
        """Write homeserver.yaml and log.yaml from the current attributes."""
        (self.workdir / "log.yaml").write_text(yaml.safe_dump(self.log_config()))
        self.config_path.write_text(yaml.safe_dump(self.config(), sort_keys=False))

    @property
    def config_paths(self) -> list[Path]:
        return [self.config_path]

    # -- client API ----------------------------------------------------------

    def _checked(self, response: requests.Response, what: str) -> Any:
        if response.status_code != 200:
            raise HomeserverError(
                f"{what} on {self}: {response.status_code} {response.text}"
            )
        return response.json()

    def register_user(
        self, localpart: str, admin: bool = False, password: str = DEFAULT_PASSWORD
    ) -> str:
        """Register a user with the shared-secret admin API; return its token."""
        path = "/_synapse/admin/v1/register"
        nonce = self._checked(self.client("GET", path), "register nonce")["nonce"]
        mac = hmac.new(self.registration_shared_secret.encode(), digestmod=hashlib.sha1)
        mac.update(
            b"\x00".join(
                [
                    nonce.encode(),
                    localpart.encode(),
                    password.encode(),
                    b"admin" if admin else b"notadmin",
                ]
            )
        )
        body = {
            "nonce": nonce,
            "username": localpart,
            "password": password,
            "admin": admin,
            "mac": mac.hexdigest(),
        }
        result = self._checked(self.client("POST", path, json=body), "register")
        token: str = result["access_token"]
        return token

    def login(self, localpart: str, password: str = DEFAULT_PASSWORD) -> str:
        """Log in with a password; return the new access token."""
        body = {
            "type": "m.login.password",
            "identifier": {"type": "m.id.user", "user": localpart},
            "password": password,
        }
        response = self.client("POST", "/_matrix/client/v3/login", json=body)
        token: str = self._checked(response, "login")["access_token"]
        return token

    def user_id(self, localpart: str) -> str:
        return f"@{localpart}:{self.server_name}"


def _checkout_root() -> str | None:
    """The checkout holding this package, when it runs from one (so that Synapse
    loads the module from the checkout rather than an installed copy)."""
    root = Path(__file__).resolve().parent.parent
    return str(root) if (root / "setup.cfg").exists() else None


def make_self_signed_cert(directory: Path) -> tuple[Path, Path]:
    """Write `tls.crt` and `tls.key` into `directory`, valid for localhost and
    127.0.0.1 for a year, and return their paths (certificate, key)."""
    directory.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=365))
        .add_extension(
            x509.SubjectAlternativeName(
                [
                    x509.DNSName("localhost"),
                    x509.IPAddress(ipaddress.IPv4Address("127.0.0.1")),
                ]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path = directory / "tls.crt"
    key_path = directory / "tls.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )
    )
    key_path.chmod(0o600)
    return cert_path, key_path


SUPERUSER = "postgres"


class PostgresError(RuntimeError):
    """The PostgreSQL server could not be set up."""


class PostgresCluster(Service):
    """initdb + postgres on 127.0.0.1:<free port> in a temporary directory (also
    holding the unix socket). As root, the programs run as the `postgres` system
    user, since they refuse to run as root.

    Tuned for speed: nothing is synced to disk, and commits return before their
    WAL is written (`synchronous_commit=off`), so a crash of the server (`halt()`)
    loses the last commits; `crash_safe=True` keeps synchronous commits, so that
    what was committed survives `halt()` (the machine itself is not expected to
    crash: no fsync either way)."""

    def __init__(self, crash_safe: bool = False, directory: Path | None = None) -> None:
        """`directory` (created, or empty) holds its data, log and socket; by
        default a new temporary directory."""
        self.crash_safe = crash_safe
        bindir = self.bindir()
        if bindir is None:
            raise PostgresError("PostgreSQL binaries not found")
        self._bindir = bindir
        self._as_root = os.geteuid() == 0
        if directory is None:
            self.root = Path(tempfile.mkdtemp(prefix="synapse-relay-pg-"))
        else:
            directory.mkdir(parents=True, exist_ok=True)
            self.root = directory
        self.datadir = self.root / "data"
        self.log_path = self.root / "postgres.log"
        self.host = "127.0.0.1"
        self.port = free_port()
        self._names = itertools.count()
        self._started = False
        if self._as_root:
            user = pwd.getpwnam(SUPERUSER)
            os.chown(self.root, user.pw_uid, user.pw_gid)

    @staticmethod
    def bindir() -> Path | None:
        """`pg_config --bindir` if it holds initdb, else the newest
        /usr/lib/postgresql/*/bin, else None."""
        candidates: list[Path] = []
        if shutil.which("pg_config"):
            result = subprocess.run(
                ["pg_config", "--bindir"], capture_output=True, text=True, check=False
            )
            if result.returncode == 0:
                candidates.append(Path(result.stdout.strip()))
        versions = glob.glob("/usr/lib/postgresql/*/bin")
        versions.sort(key=lambda p: int(Path(p).parent.name), reverse=True)
        candidates.extend(Path(p) for p in versions)
        for candidate in candidates:
            if (candidate / "initdb").exists() and (candidate / "pg_ctl").exists():
                return candidate
        return None

    @classmethod
    def available(cls) -> bool:
        return cls.bindir() is not None

    def command(self, program: str, *args: str) -> list[str]:
        """The command line running a PostgreSQL program (as `postgres` if root)."""
        command = [str(self._bindir / program), *args]
        if self._as_root:
            command = ["runuser", "-u", SUPERUSER, "--", *command]
        return command

    def control(self, action: str, *args: str) -> list[str]:
        """The `pg_ctl` command line that starts (`action="start"`) or stops the
        server on its data directory, as it is run here."""
        if action == "start":
            options = (
                f"-h {self.host} -p {self.port} -k {self.root}"
                " -c fsync=off -c full_page_writes=off"
            )
            if not self.crash_safe:
                options += " -c synchronous_commit=off"
            args = (f"--log={self.log_path}", f"--options={options}", *args)
        return self.command("pg_ctl", action, f"--pgdata={self.datadir}", *args)

    def _run(self, program: str, *args: str) -> subprocess.CompletedProcess[str]:
        return self._execute(self.command(program, *args))

    def _execute(self, command: list[str]) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            command, cwd=self.root, capture_output=True, text=True, check=False
        )

    def _check(self, result: subprocess.CompletedProcess[str]) -> None:
        if result.returncode != 0:
            raise PostgresError(
                f"{result.args} failed ({result.returncode}):\n"
                f"{result.stdout}{result.stderr}\n"
                f"--- {self.log_path}\n{tail(self.log_path, 40)}"
            )

    def start(self, timeout: float = 60) -> None:
        """initdb, start the server and wait until it accepts connections. On
        failure everything is stopped and removed again."""
        try:
            self._start(timeout)
        except BaseException:
            self.stop()
            raise

    def _start(self, timeout: float) -> None:
        self._check(
            self._run(
                "initdb",
                f"--pgdata={self.datadir}",
                "--auth=trust",
                f"--username={SUPERUSER}",
                "--encoding=UTF8",
                "--locale=C",
                "--no-sync",
            )
        )
        self._started = True
        self.resume(timeout)

    def halt(self) -> None:
        """Stop the server at once, as a crash would (`pg_ctl stop --mode=immediate`):
        clients lose their connections; `resume()` starts it again, data kept."""
        self._check(self._execute(self.control("stop", "--mode=immediate")))

    def resume(self, timeout: float = 60) -> None:
        """Start the server on its data directory and wait until it accepts
        connections."""
        self._check(self._execute(self.control("start", "--no-wait")))
        ready = ("-h", self.host, "-p", str(self.port), "-U", SUPERUSER)
        try:
            wait_until(
                lambda: self._run("pg_isready", *ready).returncode == 0,
                timeout,
                interval=0.05,
                message=f"PostgreSQL on port {self.port} ready",
            )
        except TimeoutError as e:
            raise PostgresError(f"{e}\n{tail(self.log_path, 40)}") from None

    def create_database(self, name: str | None = None) -> dict[str, Any]:
        """Create a database fit for Synapse (C collation) and return the
        Synapse `database:` section for it."""
        name = name or f"synapse{next(self._names)}"
        connection = psycopg2.connect(
            host=self.host, port=self.port, user=SUPERUSER, dbname="postgres"
        )
        try:
            connection.autocommit = True
            with connection.cursor() as cursor:
                cursor.execute(
                    sql.SQL(
                        "CREATE DATABASE {} TEMPLATE template0 ENCODING 'UTF8'"
                        " LC_COLLATE 'C' LC_CTYPE 'C'"
                    ).format(sql.Identifier(name))
                )
        finally:
            connection.close()
        return {
            "name": "psycopg2",
            "args": {
                "user": SUPERUSER,
                "database": name,
                "host": self.host,
                "port": self.port,
                "cp_min": 1,
                "cp_max": 5,
            },
        }

    def stop(self) -> None:
        """Stop the server (fast shutdown) and delete its directory."""
        if self._started:
            self._execute(self.control("stop", "--mode=fast"))
            self._started = False
        shutil.rmtree(self.root, ignore_errors=True)

    @property
    def is_running(self) -> bool:
        return self._started
