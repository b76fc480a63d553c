"""Real servers for the tests: PostgreSQL, Redis, Prometheus + Pushgateway, MinIO,
stripe-mock and an SMTP server, each on a free loopback port with a throwaway data
directory under the run directory.

Each starter returns the KEY=value pairs that tell tests and users where it is.
Passwords are random per run; they belong to throwaway servers but are still kept
out of logs (only the env file, mode 0600, holds them).

PostgreSQL and Redis also serve TLS, with certificates of a CA made for the run
(`services_ca`, ``$BMAD_SERVICES_CA``) and valid for 127.0.0.1 and localhost only:
Redis on a second port of the same server, PostgreSQL as a second server started
from a copy of the first one's data directory (one PostgreSQL cannot serve TLS on one
port and refuse it on another, and the tests need both). The plaintext ports stay
what they were.
"""

from __future__ import annotations

import functools
import os
import pwd
import secrets
import shutil
import socket
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from bmad_testbed import pki, procs

ALL_SERVICES = ("postgres", "redis", "prometheus", "minio", "stripe", "smtp")


SERVICES_PKI = "services-pki"


def services_ca(run_dir: Path) -> pki.Pki:
    """The CA of the services' TLS certificates (made at the first call of a run)."""
    return pki.Pki(run_dir / SERVICES_PKI)


def _serving_cert(run_dir: Path, name: str) -> pki.CertPair:
    """A server certificate of the services' CA for loopback: 127.0.0.1 and localhost."""
    return services_ca(run_dir).issue(
        name, cn="localhost", server=True, dns=("localhost",), ips=("127.0.0.1",)
    )


def _as_user(user: str) -> list[str]:
    """PostgreSQL refuses to run as root: drop to its own account when we are root."""
    if os.geteuid() != 0:
        return []
    return ["setpriv", f"--reuid={user}", f"--regid={user}", "--init-groups", "--"]


def start_postgres(
    run_dir: Path, binaries: dict[str, Path], records: list[procs.ProcRecord]
) -> dict[str, str]:
    bindir = binaries["postgres"]
    password = secrets.token_hex(12)
    wrap = _as_user("postgres")
    if wrap:
        # Its own folder directly under /tmp: the run directory may sit below folders
        # that the postgres user cannot traverse (pytest's tmp_path is one).
        data = Path(tempfile.mkdtemp(prefix="bmad-pg-"))
        ent = pwd.getpwnam("postgres")
        os.chown(data, ent.pw_uid, ent.pw_gid)
    else:
        data = run_dir / "postgres"
        data.mkdir(parents=True, exist_ok=True)
    pwfile = data / "initdb.pw"
    pwfile.write_text(password + "\n")
    if wrap:
        os.chown(pwfile, ent.pw_uid, ent.pw_gid)
    data = data / "data"
    port = procs.free_port()
    init = procs.spawn(
        "postgres-initdb",
        [
            *wrap,
            str(bindir / "initdb"),
            "-D",
            str(data),
            "-U",
            "postgres",
            f"--pwfile={pwfile}",
            "--auth-local=trust",
            "--auth-host=scram-sha-256",
            "--no-sync",
            "-E",
            "UTF8",
            "--locale=C",
        ],
        log_dir=run_dir / "logs",
    )
    _wait_exit(init, timeout=120)
    pwfile.unlink()
    # The TLS server: a copy of the fresh cluster (same roles and password), with the
    # certificate and key inside its data directory, owned by the server's user.
    tls_data = data.parent / "data-tls"
    _wait_exit(
        procs.spawn(
            "postgres-copy", [*wrap, "cp", "-a", str(data), str(tls_data)], log_dir=run_dir / "logs"
        ),
        timeout=60,
    )
    served = _serving_cert(run_dir, "postgres")
    for source, target in ((served.cert, "server.crt"), (served.key, "server.key")):
        shutil.copyfile(source, tls_data / target)
        (tls_data / target).chmod(0o600)
        if wrap:
            os.chown(tls_data / target, ent.pw_uid, ent.pw_gid)
    tls_port = procs.free_port()
    for name, directory, at, extra in (
        ("postgres", data, port, ()),
        ("postgres-tls", tls_data, tls_port, ("-c", "ssl=on")),
    ):
        rec = procs.spawn(
            name,
            [*wrap, str(bindir / "postgres"), *_pg_options(directory, at), *extra],
            log_dir=run_dir / "logs",
        )
        records.append(rec)
        procs.wait_until(
            rec, functools.partial(_pg_ready, at), timeout=60, what="accepting connections"
        )
    ca = services_ca(run_dir).ca.cert
    return {
        "BMAD_POSTGRES_URL": f"postgresql://postgres:{password}@127.0.0.1:{port}/postgres",
        "BMAD_POSTGRES_HOST": "127.0.0.1",
        "BMAD_POSTGRES_PORT": str(port),
        "BMAD_POSTGRES_USER": "postgres",
        "BMAD_POSTGRES_PASSWORD": password,
        "BMAD_POSTGRES_DATA": str(data),
        "BMAD_POSTGRES_TLS_PORT": str(tls_port),
        "BMAD_POSTGRES_TLS_URL": (
            f"postgresql://postgres:{password}@localhost:{tls_port}/postgres"
            f"?sslmode=verify-full&sslrootcert={ca}"
        ),
        "BMAD_SERVICES_CA": str(ca),
    }


def _pg_options(data: Path, port: int) -> list[str]:
    return [
        "-D",
        str(data),
        "-p",
        str(port),
        "-c",
        "listen_addresses=127.0.0.1",
        "-c",
        f"unix_socket_directories={data}",
        "-c",
        "fsync=off",
        "-c",
        "synchronous_commit=off",
        "-c",
        "full_page_writes=off",
        "-c",
        "max_connections=300",
    ]


def _pg_ready(port: int) -> bool:
    # The server answers an SSLRequest with one byte ('N' or 'S') once it accepts
    # connections; before that the port is closed or the startup is refused.
    with socket.create_connection(("127.0.0.1", port), timeout=1) as sock:
        sock.sendall(b"\x00\x00\x00\x08\x04\xd2\x16\x2f")
        return sock.recv(1) in (b"N", b"S")


def _wait_exit(rec: procs.ProcRecord, *, timeout: float) -> None:
    pid = rec["pid"]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            done, status = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            return
        if done:
            if os.waitstatus_to_exitcode(status) != 0:
                raise procs.StartupError(
                    f"{rec['name']} failed; log {rec['log']}:\n" + procs.log_tail(rec["log"])
                )
            return
        time.sleep(0.1)
    raise procs.StartupError(f"{rec['name']} did not finish within {timeout:.0f}s")


def start_redis(
    run_dir: Path, binaries: dict[str, Path], records: list[procs.ProcRecord]
) -> dict[str, str]:
    data = run_dir / "redis"
    data.mkdir(parents=True, exist_ok=True)
    port = procs.free_port()
    password = secrets.token_hex(12)
    tls_port = procs.free_port()
    served = _serving_cert(run_dir, "redis")
    ca = services_ca(run_dir).ca.cert
    conf = data / "redis.conf"
    # The password goes in a config file rather than on the command line (ps shows argv).
    conf.write_text(
        f'bind 127.0.0.1\nport {port}\nsave ""\nappendonly no\ndir {data}\n'
        f"requirepass {password}\nprotected-mode yes\ndaemonize no\n"
        f"tls-port {tls_port}\ntls-cert-file {served.cert}\ntls-key-file {served.key}\n"
        f"tls-ca-cert-file {ca}\ntls-auth-clients no\n"
    )
    conf.chmod(0o600)
    rec = procs.spawn("redis", [str(binaries["redis-server"]), str(conf)], log_dir=run_dir / "logs")
    records.append(rec)
    procs.wait_until(rec, lambda: _redis_ping(port, password), timeout=30, what="answering PING")
    return {
        "BMAD_REDIS_URL": f"redis://:{password}@127.0.0.1:{port}/0",
        "BMAD_REDIS_HOST": "127.0.0.1",
        "BMAD_REDIS_PORT": str(port),
        "BMAD_REDIS_PASSWORD": password,
        "BMAD_REDIS_TLS_PORT": str(tls_port),
        "BMAD_REDIS_TLS_URL": f"rediss://:{password}@localhost:{tls_port}/0",
        "BMAD_SERVICES_CA": str(ca),
    }


def _redis_ping(port: int, password: str) -> bool:
    with socket.create_connection(("127.0.0.1", port), timeout=1) as sock:
        sock.sendall(f"AUTH {password}\r\nPING\r\n".encode())
        data = b""
        while data.count(b"\r\n") < 2:
            chunk = sock.recv(256)
            if not chunk:
                return False
            data += chunk
        return b"+PONG" in data


def start_prometheus(
    run_dir: Path, binaries: dict[str, Path], records: list[procs.ProcRecord]
) -> dict[str, str]:
    data = run_dir / "prometheus"
    data.mkdir(parents=True, exist_ok=True)
    pg_port, prom_port = procs.free_port(), procs.free_port()
    pgw = procs.spawn(
        "pushgateway",
        [str(binaries["pushgateway"]), f"--web.listen-address=127.0.0.1:{pg_port}"],
        log_dir=run_dir / "logs",
    )
    records.append(pgw)
    # Processes a test starts (real `bmad runtime` replicas) are scraped too: the test
    # writes a file_sd target file into this folder, and Prometheus picks it up.
    targets = data / "targets"
    targets.mkdir(exist_ok=True)
    conf = data / "prometheus.yml"
    conf.write_text(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
        "scrape_configs:\n"
        "  - job_name: pushgateway\n    honor_labels: true\n"
        f"    static_configs:\n      - targets: ['127.0.0.1:{pg_port}']\n"
        "  - job_name: file-targets\n"
        "    file_sd_configs:\n"
        f"      - files: ['{targets}/*.json']\n"
        "        refresh_interval: 1s\n"
    )
    prom = procs.spawn(
        "prometheus",
        [
            str(binaries["prometheus"]),
            f"--config.file={conf}",
            f"--storage.tsdb.path={data / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{prom_port}",
            "--web.enable-lifecycle",
            "--storage.tsdb.retention.time=1d",
        ],
        log_dir=run_dir / "logs",
    )
    records.append(prom)
    procs.wait_until(
        pgw, lambda: procs.http_ok(f"http://127.0.0.1:{pg_port}/-/ready"), timeout=30, what="ready"
    )
    procs.wait_until(
        prom,
        lambda: procs.http_ok(f"http://127.0.0.1:{prom_port}/-/ready"),
        timeout=60,
        what="ready",
    )
    return {
        "BMAD_PROMETHEUS_URL": f"http://127.0.0.1:{prom_port}",
        "BMAD_PUSHGATEWAY_URL": f"http://127.0.0.1:{pg_port}",
        "BMAD_PROMETHEUS_TARGETS_DIR": str(targets),
    }


def start_minio(
    run_dir: Path, binaries: dict[str, Path], records: list[procs.ProcRecord]
) -> dict[str, str]:
    data = run_dir / "minio"
    data.mkdir(parents=True, exist_ok=True)
    port, console = procs.free_port(), procs.free_port()
    access, secret = "bmad" + secrets.token_hex(4), secrets.token_hex(16)
    rec = procs.spawn(
        "minio",
        [
            str(binaries["minio"]),
            "server",
            str(data),
            "--address",
            f"127.0.0.1:{port}",
            "--console-address",
            f"127.0.0.1:{console}",
            "--quiet",
        ],
        log_dir=run_dir / "logs",
        env={
            "MINIO_ROOT_USER": access,
            "MINIO_ROOT_PASSWORD": secret,
            "MINIO_BROWSER": "off",
            "MINIO_UPDATE": "off",
            "MINIO_CI_CD": "1",
            "HOME": str(data),
        },
    )
    records.append(rec)
    procs.wait_until(
        rec,
        lambda: procs.http_ok(f"http://127.0.0.1:{port}/minio/health/ready"),
        timeout=60,
        what="ready",
    )
    return {
        "BMAD_S3_ENDPOINT": f"http://127.0.0.1:{port}",
        "BMAD_S3_ACCESS_KEY": access,
        "BMAD_S3_SECRET_KEY": secret,
        "BMAD_S3_REGION": "us-east-1",
    }


def start_stripe(
    run_dir: Path, binaries: dict[str, Path], records: list[procs.ProcRecord]
) -> dict[str, str]:
    port, https_port = procs.free_port(), procs.free_port()
    rec = procs.spawn(
        "stripe-mock",
        [
            str(binaries["stripe-mock"]),
            "-http-addr",
            f"127.0.0.1:{port}",
            "-https-addr",
            f"127.0.0.1:{https_port}",
        ],
        log_dir=run_dir / "logs",
    )
    records.append(rec)
    procs.wait_until(rec, lambda: procs.port_open(port), timeout=60, what="listening")
    return {"BMAD_STRIPE_API_BASE": f"http://127.0.0.1:{port}"}


def start_smtp(
    run_dir: Path, binaries: dict[str, Path], records: list[procs.ProcRecord]
) -> dict[str, str]:
    """aiosmtpd, a real SMTP server, delivering every message into a Maildir."""
    del binaries
    maildir = run_dir / "smtp" / "Maildir"
    maildir.parent.mkdir(parents=True, exist_ok=True)
    port = procs.free_port()
    rec = procs.spawn(
        "smtp",
        [
            sys.executable,
            "-m",
            "aiosmtpd",
            "-n",
            "-l",
            f"127.0.0.1:{port}",
            "-c",
            "aiosmtpd.handlers.Mailbox",
            str(maildir),
        ],
        log_dir=run_dir / "logs",
    )
    records.append(rec)
    procs.wait_until(rec, lambda: _smtp_banner(port), timeout=30, what="greeting")
    return {
        "BMAD_SMTP_HOST": "127.0.0.1",
        "BMAD_SMTP_PORT": str(port),
        "BMAD_SMTP_MAILDIR": str(maildir),
    }


def _smtp_banner(port: int) -> bool:
    with socket.create_connection(("127.0.0.1", port), timeout=1) as sock:
        return sock.recv(64).startswith(b"220")


STARTERS: dict[str, Callable[[Path, dict[str, Path], list[procs.ProcRecord]], dict[str, str]]] = {
    "postgres": start_postgres,
    "redis": start_redis,
    "prometheus": start_prometheus,
    "minio": start_minio,
    "stripe": start_stripe,
    "smtp": start_smtp,
}


def cleanup_data(run_dir: Path) -> None:
    for name in ("postgres", "redis", "prometheus", "minio", "smtp", "etcd", SERVICES_PKI):
        shutil.rmtree(run_dir / name, ignore_errors=True)
