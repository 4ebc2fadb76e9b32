"""A real PostgreSQL server for tests and examples: its own cluster in a temp dir,
listening on 127.0.0.1 at a free port, stopped and deleted at the end.

``initdb`` refuses to run as root, so as root the cluster belongs to the ``postgres``
user (which Debian's package creates) and lives outside any root-private temp dir.
Passwords are checked (SCRAM) on TCP, as a real deployment's would be.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import secrets
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from graven.testing.net import free_port

SERVER_USER = "postgres"
_WAIT = 60  # seconds pg_ctl may wait for the server to start or stop


@dataclass(frozen=True)
class Postgres:
    """Where a running server is, and how to log in."""

    host: str
    port: int
    user: str
    password: str
    database: str
    data_dir: Path

    def env(self) -> dict[str, str]:
        """libpq's variables, which the examples read too."""
        return {
            "PGHOST": self.host,
            "PGPORT": str(self.port),
            "PGUSER": self.user,
            "PGPASSWORD": self.password,
            "PGDATABASE": self.database,
        }


def postgres_bin() -> Path | None:
    """The newest installed server's bin directory (Debian keeps it off PATH)."""
    found = sorted(
        Path("/usr/lib/postgresql").glob("*/bin/initdb"),
        key=lambda p: int(p.parent.parent.name) if p.parent.parent.name.isdigit() else 0,
    )
    if found:
        return found[-1].parent
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


@contextlib.contextmanager
def running_postgres(
    *, password: str | None = None, bin_dir: Path | None = None
) -> Iterator[Postgres]:
    """A server for the duration of the block (``password``: of its superuser, random
    by default); the cluster is deleted afterwards."""
    password = password or secrets.token_urlsafe(16)
    bin_dir = bin_dir or postgres_bin()
    if bin_dir is None:
        raise FileNotFoundError("PostgreSQL's initdb is not installed (apt-get install postgresql)")
    as_root = os.geteuid() == 0
    owner = pwd.getpwnam(SERVER_USER) if as_root else None
    base = Path(tempfile.mkdtemp(prefix="graven-pg-"))
    data, sockets, log = base / "data", base / "run", base / "server.log"
    sockets.mkdir()
    pwfile = base / "pwfile"
    pwfile.write_text(password + "\n")
    pwfile.chmod(0o600)
    if owner is not None:
        for path in (base, sockets, pwfile):
            os.chown(path, owner.pw_uid, owner.pw_gid)
    as_owner: dict[str, object] = (
        {"user": owner.pw_uid, "group": owner.pw_gid, "extra_groups": []} if owner else {}
    )
    port = free_port()
    started = False
    try:
        subprocess.run(
            [
                str(bin_dir / "initdb"),
                "-D", str(data),
                "-U", SERVER_USER,
                "--pwfile", str(pwfile),
                "--auth-local=trust",
                "--auth-host=scram-sha-256",
                "-E", "UTF8",
                "--no-sync",
            ],
            check=True, capture_output=True, timeout=_WAIT, cwd=base, **as_owner,  # type: ignore[call-overload]
        )  # fmt: skip
        options = f"-c listen_addresses=127.0.0.1 -p {port} -k {sockets} -c fsync=off"
        subprocess.run(
            [str(bin_dir / "pg_ctl"), "-D", str(data), "-l", str(log), "-w", "-t", str(_WAIT),
             "-o", options, "start"],
            check=True, capture_output=True, timeout=_WAIT + 10, cwd=base, stdin=subprocess.DEVNULL,
            **as_owner,  # type: ignore[call-overload]
        )  # fmt: skip
        started = True
        yield Postgres("127.0.0.1", port, SERVER_USER, password, "postgres", data)
    finally:
        if started:
            subprocess.run(
                [str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "-t", str(_WAIT),
                 "stop"],
                check=False, capture_output=True, timeout=_WAIT + 10, cwd=base, **as_owner,  # type: ignore[call-overload]
            )  # fmt: skip
        shutil.rmtree(base, ignore_errors=True)
