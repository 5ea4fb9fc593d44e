"""Real Synapse homeservers on loopback, for the demo, the tests and the benchmarks.

Each `Homeserver` is a real `synapse.app.homeserver` process with this module
loaded, named `localhost:PORT`, serving the client and federation APIs over TLS on
127.0.0.1:PORT with a self-signed certificate. Homeservers started this way federate
with each other (certificate checks off, loopback allowed) and with nothing else
(`trusted_key_servers: []`).

This file is synchronous on purpose: it drives processes and speaks plain HTTP to
them, as an admin's script would, with `requests` (a dependency of Synapse).
"""

import datetime
import hashlib
import hmac
import ipaddress
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import requests
import urllib3
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from signedjson.key import generate_signing_key, write_signing_keys

# Self-signed certificates on loopback are the point here.
urllib3.disable_warnings(urllib3.exceptions.InsecureRequestWarning)

T = TypeVar("T")

# Generous limits: scripted clients and servers send in bursts.
_RATE = {"per_second": 1000, "burst_count": 10000}
_LOG_FORMAT = (
    "%(asctime)s - %(name)s - %(lineno)d - %(levelname)s - %(request)s - %(message)s"
)


class Timeout(Exception):
    """A condition polled for did not come true before its deadline."""


def wait_until(
    predicate: Callable[[], T | None | bool],
    timeout: float,
    what: str = "condition",
    interval: float = 0.05,
) -> T:
    """Poll `predicate` until it returns something truthy, and return that."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result  # type: ignore[return-value]
        if time.monotonic() > deadline:
            raise Timeout(f"{what} not reached within {timeout:g}s")
        time.sleep(interval)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def make_self_signed_cert(directory: Path) -> tuple[Path, Path]:
    """A certificate for localhost and 127.0.0.1, and its key, written to files."""
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
                    x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                ]
            ),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    directory.mkdir(parents=True, exist_ok=True)
    cert_path, key_path = directory / "tls.crt", directory / "tls.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


class Homeserver:
    """One real Synapse process on 127.0.0.1, with the relay module loaded."""

    def __init__(
        self,
        workdir: Path,
        *,
        cert: tuple[Path, Path],
        module_config: dict[str, Any] | None,
        database: dict[str, Any] | None = None,
        extra_config: dict[str, Any] | None = None,
        port: int | None = None,
    ) -> None:
        self.workdir = workdir
        self.port = port or free_port()
        self.server_name = f"localhost:{self.port}"
        self.base_url = f"https://127.0.0.1:{self.port}"
        self.cert = cert
        self.module_config = module_config
        self.database = database
        self.extra_config = extra_config or {}
        self.config_path = workdir / "homeserver.yaml"
        self.log_path = workdir / "homeserver.log"
        self._process: subprocess.Popen[bytes] | None = None
        self._shared_secret = secrets.token_hex(16)
        self._session = loopback_session()
        workdir.mkdir(parents=True, exist_ok=True)
        with open(workdir / "signing.key", "w") as f:
            write_signing_keys(f, [generate_signing_key("a_" + secrets.token_hex(2))])
        self.write_config()

    # --- configuration and process ----------------------------------------------

    def write_config(self) -> None:
        """(Re)write homeserver.yaml from the attributes; takes effect at start."""
        self.config_path.write_text(yaml.safe_dump(self._config()))
        (self.workdir / "log.yaml").write_text(yaml.safe_dump(self._log_config()))

    def _config(self) -> dict[str, Any]:
        rate = dict(_RATE)
        config: dict[str, Any] = {
            "server_name": self.server_name,
            "public_baseurl": self.base_url + "/",
            "pid_file": str(self.workdir / "homeserver.pid"),
            "listeners": [
                {
                    "port": self.port,
                    "bind_addresses": ["127.0.0.1"],
                    "tls": True,
                    "type": "http",
                    "x_forwarded": False,
                    "resources": [{"names": ["client", "federation"]}],
                }
            ],
            "tls_certificate_path": str(self.cert[0]),
            "tls_private_key_path": str(self.cert[1]),
            "database": self.database
            or {
                "name": "sqlite3",
                "args": {"database": str(self.workdir / "homeserver.db")},
            },
            "log_config": str(self.workdir / "log.yaml"),
            "media_store_path": str(self.workdir / "media"),
            "signing_key_path": str(self.workdir / "signing.key"),
            "report_stats": False,
            "trusted_key_servers": [],
            "suppress_key_server_warning": True,
            "federation_verify_certificates": False,
            "federation_ip_range_blacklist": [],
            "ip_range_blacklist": [],
            "enable_registration": False,
            "registration_shared_secret": self._shared_secret,
            "macaroon_secret_key": secrets.token_hex(16),
            "form_secret": secrets.token_hex(16),
            "rc_message": rate,
            "rc_registration": rate,
            "rc_login": {"address": rate, "account": rate, "failed_attempts": rate},
            "rc_joins": {"local": rate, "remote": rate},
            "rc_invites": {"per_room": rate, "per_user": rate, "per_issuer": rate},
            "rc_admin_redaction": rate,
            "rc_federation": {
                "window_size": 1000,
                "sleep_limit": 1000,
                "sleep_delay": 1,
                "reject_limit": 10000,
                "concurrent": 1000,
            },
        }
        if self.module_config is not None:
            config["modules"] = [
                {"module": "synapse_relay.RelayModule", "config": self.module_config}
            ]
        config.update(self.extra_config)
        return config

    def _log_config(self) -> dict[str, Any]:
        return {
            "version": 1,
            "formatters": {"precise": {"format": _LOG_FORMAT}},
            "filters": {
                "context": {
                    "()": "synapse.logging.context.LoggingContextFilter",
                    "request": "",
                }
            },
            "handlers": {
                "file": {
                    "class": "logging.FileHandler",
                    "formatter": "precise",
                    "filename": str(self.log_path),
                    "filters": ["context"],
                }
            },
            "root": {"level": "INFO", "handlers": ["file"]},
            "disable_existing_loggers": False,
        }

    @property
    def is_running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def start(self, timeout: float = 60) -> None:
        """Start Synapse and wait until it answers /health."""
        assert not self.is_running, f"{self.server_name} is already running"
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (_checkout_root(), env.get("PYTHONPATH")) if p
        )
        with open(self.workdir / "stdout.log", "ab") as out:
            self._process = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "synapse.app.homeserver",
                    "-c",
                    str(self.config_path),
                ],
                cwd=self.workdir,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
            )

        def healthy() -> bool:
            if not self.is_running:
                raise RuntimeError(
                    f"{self.server_name} exited at start-up:\n{self.log_tail()}"
                )
            try:
                return self._session.get(f"{self.base_url}/health", timeout=2).ok
            except requests.RequestException:
                return False

        try:
            wait_until(healthy, timeout, f"{self.server_name} healthy")
        except Timeout:
            self.kill()
            raise RuntimeError(
                f"{self.server_name} not healthy after {timeout:g}s:\n{self.log_tail()}"
            ) from None

    def stop(self, timeout: float = 20) -> None:
        """SIGTERM, then SIGKILL if it has not exited within `timeout`."""
        if self._process is None:
            return
        if self._process.poll() is None:
            self._process.send_signal(signal.SIGTERM)
            try:
                self._process.wait(timeout)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
        self._process = None

    def kill(self) -> None:
        """SIGKILL: no chance to flush or clean up."""
        if self._process is not None:
            self._process.kill()
            self._process.wait()
            self._process = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def log_tail(self, lines: int = 40) -> str:
        parts = []
        for path in (self.log_path, self.workdir / "stdout.log"):
            if path.exists():
                text = path.read_text(errors="replace").splitlines()[-lines:]
                parts.append(f"--- {path}\n" + "\n".join(text))
        return "\n".join(parts)

    # --- client API -----------------------------------------------------------------

    def client(
        self,
        method: str,
        path: str,
        token: str | None = None,
        json: Any = None,
        params: dict[str, Any] | None = None,
        timeout: float = 30,
    ) -> requests.Response:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return self._session.request(
            method,
            self.base_url + path,
            json=json,
            params=params,
            headers=headers,
            timeout=timeout,
        )

    def register_user(
        self, localpart: str, admin: bool = False, password: str | None = None
    ) -> str:
        """Register a user with the shared secret; returns its access token."""
        password = password or secrets.token_hex(8)
        path = "/_synapse/admin/v1/register"
        nonce = self.client("GET", path).json()["nonce"]
        mac = hmac.new(self._shared_secret.encode(), digestmod=hashlib.sha1)
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
        response = self.client(
            "POST",
            path,
            json={
                "nonce": nonce,
                "username": localpart,
                "password": password,
                "admin": admin,
                "mac": mac.hexdigest(),
            },
        )
        response.raise_for_status()
        token: str = response.json()["access_token"]
        return token

    def user_id(self, localpart: str) -> str:
        return f"@{localpart}:{self.server_name}"


def loopback_session() -> requests.Session:
    """An HTTP session for self-signed loopback servers.

    It ignores the environment (REQUESTS_CA_BUNDLE would override `verify`, and
    proxies have no business on loopback).
    """
    session = requests.Session()
    session.trust_env = False
    session.verify = False
    return session


def _checkout_root() -> str | None:
    """The directory holding this package when it runs from a checkout."""
    root = Path(__file__).resolve().parent.parent
    return str(root) if (root / "setup.cfg").exists() else None


class PostgresCluster:
    """A throwaway PostgreSQL server: initdb and pg_ctl into a temporary directory.

    initdb and postgres refuse to run as root; as root they run as the `postgres`
    system user that Debian's package creates.
    """

    def __init__(self) -> None:
        self.bindir = self.find_bindir()
        if self.bindir is None:
            raise RuntimeError(
                "PostgreSQL is not installed (on Debian: apt-get install postgresql)"
            )
        self.port = free_port()
        self.directory = Path(tempfile.mkdtemp(prefix="synapse-relay-pg-"))
        self._databases = 0

    @staticmethod
    def find_bindir() -> Path | None:
        pg_config = shutil.which("pg_config")
        if pg_config:
            out = subprocess.run(
                [pg_config, "--bindir"], capture_output=True, text=True, check=False
            ).stdout.strip()
            if out and (Path(out) / "initdb").exists():
                return Path(out)
        candidates = sorted(
            Path("/usr/lib/postgresql").glob("*/bin/initdb"),
            key=lambda p: (
                int(p.parent.parent.name) if p.parent.parent.name.isdigit() else 0
            ),
        )
        return candidates[-1].parent if candidates else None

    def _run(self, program: str, *args: str) -> subprocess.CompletedProcess[str]:
        assert self.bindir is not None
        command = [str(self.bindir / program), *args]
        if os.geteuid() == 0:
            command = ["runuser", "-u", "postgres", "--", *command]
        return subprocess.run(command, capture_output=True, text=True, check=False)

    def start(self, timeout: float = 60) -> None:
        if os.geteuid() == 0:
            shutil.chown(self.directory, "postgres")
        data = str(self.directory / "data")
        result = self._run(
            "initdb", "-D", data, "--auth=trust", "-U", "postgres",
            "--encoding=UTF8", "--locale=C",
        )  # fmt: skip
        if result.returncode != 0:
            raise RuntimeError(f"initdb failed: {result.stderr}")
        options = (
            f"-h 127.0.0.1 -p {self.port} -k {self.directory} -c fsync=on"
            " -c max_connections=200"
        )
        result = self._run(
            "pg_ctl", "-D", data, "-l", str(self.directory / "postgres.log"),
            "-o", options, "-w", "-t", str(int(timeout)), "start",
        )  # fmt: skip
        if result.returncode != 0:
            raise RuntimeError(f"pg_ctl start failed: {result.stdout}{result.stderr}")

    def create_database(self, name: str | None = None) -> dict[str, Any]:
        """A new database as Synapse wants it; returns Synapse's `database:` config."""
        self._databases += 1
        name = name or f"synapse{self._databases}"
        result = self._run(
            "psql", "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres",
            "-v", "ON_ERROR_STOP=1", "-c",
            f"CREATE DATABASE {name} TEMPLATE template0 LC_COLLATE 'C' LC_CTYPE 'C'",
        )  # fmt: skip
        if result.returncode != 0:
            raise RuntimeError(f"creating database {name} failed: {result.stderr}")
        return {
            "name": "psycopg2",
            "args": {
                "user": "postgres",
                "database": name,
                "host": "127.0.0.1",
                "port": self.port,
                "cp_min": 1,
                "cp_max": 5,
            },
        }

    def stop(self) -> None:
        self._run("pg_ctl", "-D", str(self.directory / "data"), "-m", "fast", "stop")
        shutil.rmtree(self.directory, ignore_errors=True)
