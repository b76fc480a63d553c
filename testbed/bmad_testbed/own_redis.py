"""A redis-server of a test's own, beside the test bed's: for a test that starts, stops
or configures its Redis itself (a Redis that comes up late, one with an ACL file). It
runs the test bed's redis-server (on PATH), on a loopback port chosen when it is made,
with a password of its own; its files and log are under the directory it is given."""

from __future__ import annotations

import hashlib
import secrets
import shutil
from pathlib import Path

from bmad_testbed import procs


class OwnRedis:
    """One redis-server; `start` and `stop` as often as the test likes, same port. With
    ``acl_file`` its users (the default one included) live in ``users.acl``, which
    ``ACL SAVE`` rewrites and a restart reads back."""

    def __init__(self, work: Path, *, acl_file: bool = False) -> None:
        binary = shutil.which("redis-server")
        assert binary is not None, "redis-server (the test bed's) is not on PATH"
        self.binary = binary
        self.work = work
        self.port = procs.free_port()
        self.password = secrets.token_hex(12)
        self.acl_path = work / "users.acl" if acl_file else None
        self.record: procs.ProcRecord | None = None

    @property
    def url(self) -> str:
        return f"redis://:{self.password}@127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.work.mkdir(parents=True, exist_ok=True)
        conf = self.work / "redis.conf"
        lines = [
            "bind 127.0.0.1",
            f"port {self.port}",
            'save ""',
            "appendonly no",
            f"dir {self.work}",
            "protected-mode yes",
            "daemonize no",
        ]
        if self.acl_path is None:
            lines.append(f"requirepass {self.password}")
        else:
            if not self.acl_path.exists():
                digest = hashlib.sha256(self.password.encode()).hexdigest()
                self.acl_path.write_text(f"user default on #{digest} ~* &* +@all\n")
                self.acl_path.chmod(0o600)
            lines.append(f"aclfile {self.acl_path}")
        conf.write_text("\n".join(lines) + "\n")
        conf.chmod(0o600)
        self.record = procs.spawn("own-redis", [self.binary, str(conf)], log_dir=self.work)
        procs.wait_until(
            self.record, lambda: procs.port_open(self.port), timeout=30, what="listening"
        )

    def stop(self) -> None:
        if self.record is not None:
            procs.stop(self.record)
            self.record = None
