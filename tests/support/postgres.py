"""A PostgreSQL server of the test's own, from the installed binaries, that it may stop and start.

``initdb`` refuses to run as root, so when the tests run as root the cluster belongs to the
``postgres`` system user (``runuser``). The server listens on 127.0.0.1 on a free port and on a
unix socket in its own directory; ``pg_hba.conf`` trusts local connections except for the user
``PASSWORD_USER``, who must give ``PASSWORD`` (scram-sha-256): the wrong-password tests use it.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import subprocess
import tempfile
from pathlib import Path

from tests.support.procs import free_port, wait_port

PASSWORD_USER = "labd_pw"
PASSWORD = "s3cret-labd"


def postgres_bindir() -> Path:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    if initdb:
        return Path(initdb).parent
    raise RuntimeError("PostgreSQL server binaries are not installed (make system-deps)")


class PostgresServer:
    def __init__(self) -> None:
        self.bindir = postgres_bindir()
        self.port = free_port()
        self.host = "127.0.0.1"
        self.root = Path(tempfile.mkdtemp(prefix="labd-pg-"))
        self.datadir = self.root / "data"
        self.log = self.root / "postgres.log"
        self._as_user: list[str] = []
        if os.geteuid() == 0:
            owner = pwd.getpwnam("postgres")
            os.chown(self.root, owner.pw_uid, owner.pw_gid)
            self._as_user = ["runuser", "-u", "postgres", "--"]
        self.initialised = False

    def _run(self, *args: str) -> None:
        subprocess.run([*self._as_user, *args], check=True, capture_output=True, timeout=60)

    def init(self) -> PostgresServer:
        self._run(str(self.bindir / "initdb"), "-D", str(self.datadir), "-U", "postgres",
                  "--auth=trust", "-E", "UTF8", "--no-sync", "--no-instructions")
        (self.datadir / "pg_hba.conf").write_text(
            f"local all {PASSWORD_USER} scram-sha-256\n"
            f"host all {PASSWORD_USER} 127.0.0.1/32 scram-sha-256\n"
            "local all all trust\n"
            "host all all 127.0.0.1/32 trust\n"
        )
        with (self.datadir / "postgresql.conf").open("a") as f:
            f.write(f"port = {self.port}\nlisten_addresses = '127.0.0.1'\n"
                    f"unix_socket_directories = '{self.root}'\nfsync = off\n"
                    "full_page_writes = off\nsynchronous_commit = off\n")
        self.initialised = True
        self.start()
        self.psql(f"CREATE ROLE {PASSWORD_USER} LOGIN PASSWORD '{PASSWORD}'")
        return self

    def start(self) -> None:
        self._run(str(self.bindir / "pg_ctl"), "-D", str(self.datadir), "-l", str(self.log),
                  "-w", "-t", "30", "start")
        wait_port(self.host, self.port)

    def stop(self, mode: str = "fast") -> None:
        self._run(str(self.bindir / "pg_ctl"), "-D", str(self.datadir), "-m", mode, "-w", "stop")

    def psql(self, sql: str, dbname: str = "postgres") -> str:
        out = subprocess.run(
            [str(self.bindir / "psql"), "-h", str(self.root), "-p", str(self.port), "-U",
             "postgres", "-d", dbname, "-v", "ON_ERROR_STOP=1", "-tA", "-c", sql],
            check=True, capture_output=True, text=True, timeout=30)
        return out.stdout.strip()

    def create_database(self, name: str) -> str:
        # Owned by the password user, so that it may create the schema too (PostgreSQL 15's
        # public schema belongs to the database owner).
        self.psql(f'CREATE DATABASE "{name}" OWNER {PASSWORD_USER}')
        return self.conninfo(name)

    def conninfo(self, dbname: str, user: str = "postgres") -> str:
        return f"host={self.host} port={self.port} dbname={dbname} user={user}"

    def cleanup(self) -> None:
        if self.initialised:
            with contextlib.suppress(subprocess.CalledProcessError):  # already stopped
                self.stop("immediate")
        shutil.rmtree(self.root, ignore_errors=True)
