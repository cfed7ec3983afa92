"""A throwaway PostgreSQL server driven from Python, for tests that stop and restart the server itself.

The same recipe as `with-postgres.sh`: the newest server binaries found (`PG_BINDIR`, Debian's
`/usr/lib/postgresql/*/bin`, or `pg_ctl` on PATH), a data folder under $TMPDIR, 127.0.0.1 on a free port,
fsync off, one scram-sha-256 password user and one database; as root every server command runs as the
`postgres` user, since PostgreSQL refuses to run as root.

    with throwaway_server() as server:      # or pytest.skip with the reason when there is no server
        url = server.url                    # postgresql+asyncpg://...
        server.stop(); server.start()       # the same data, port and password

It is independent of TEST_DATABASE_URL: tests that restart a server must not restart a shared one.
"""

from __future__ import annotations

import contextlib
import glob
import os
import secrets
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

USER_NAME = "idefics"
DB_NAME = "idefics_restart_test"
START_TIMEOUT_S = 60


class ServerUnavailable(Exception):
    """No PostgreSQL server can be run here; `str()` says why (a skip reason)."""


def find_bindir() -> Path:
    """The folder of `pg_ctl`, `initdb` and `postgres`, or `ServerUnavailable` saying what was looked for."""
    if os.environ.get("PG_BINDIR"):
        candidates = [Path(os.environ["PG_BINDIR"])]
    else:
        # Debian keeps the server binaries out of PATH, one folder per major version: newest first.
        candidates = sorted((Path(p).parent for p in glob.glob("/usr/lib/postgresql/*/bin/pg_ctl")),
                            key=lambda p: _version_key(p.parent.name), reverse=True)
        on_path = shutil.which("pg_ctl")
        if on_path:
            candidates.append(Path(on_path).resolve().parent)
    for folder in candidates:
        if all((folder / name).is_file() for name in ("pg_ctl", "initdb", "postgres")):
            return folder
    raise ServerUnavailable("no PostgreSQL server binaries (PG_BINDIR, /usr/lib/postgresql/*/bin or pg_ctl on "
                            "PATH; Debian: apt-get install postgresql)")


def _version_key(name: str) -> tuple[int, ...]:
    return tuple(int(part) for part in name.split(".") if part.isdigit())


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class ThrowawayServer:
    """One initialised data folder and the commands that start and stop its server."""

    def __init__(self, bindir: Path) -> None:
        self.bindir = bindir
        self.as_user: list[str] = []
        if os.geteuid() == 0:
            if shutil.which("runuser") is None:
                raise ServerUnavailable("running as root without `runuser` to start PostgreSQL as another user")
            try:
                import pwd

                pwd.getpwnam("postgres")
            except KeyError:
                raise ServerUnavailable("running as root and there is no `postgres` user to run the server") from None
            self.as_user = ["runuser", "-u", "postgres", "--"]
        self.work = Path(tempfile.mkdtemp(prefix="idefics-pg-restart."))
        self.work.chmod(0o755)
        self.data = self.work / "data"
        self.log = self.work / "server.log"
        self.port = _free_port()
        # A fresh random password: the server only listens on loopback and lives for one test.
        self.password = secrets.token_hex(16)
        self.url = f"postgresql+asyncpg://{USER_NAME}:{self.password}@127.0.0.1:{self.port}/{DB_NAME}"
        self.running = False

    def init(self) -> None:
        pwfile = self.work / "pwfile"
        pwfile.write_text(self.password + "\n")
        if self.as_user:
            shutil.chown(self.work, "postgres")
            shutil.chown(pwfile, "postgres")
        self._run("initdb", "-D", str(self.data), f"--username={USER_NAME}", f"--pwfile={pwfile}",
                  "--auth-host=scram-sha-256", "--auth-local=trust", "--encoding=UTF8", "--locale=C")
        self.start()
        self._run("createdb", "-h", str(self.work), "-p", str(self.port), "-U", USER_NAME, DB_NAME)

    def start(self) -> None:
        """Start the server and wait until it accepts connections."""
        options = (f"-c listen_addresses=127.0.0.1 -c port={self.port} -c unix_socket_directories={self.work}"
                   " -c fsync=off -c synchronous_commit=off -c full_page_writes=off")
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-w", "-t", str(START_TIMEOUT_S),
                  "start", "-o", options)
        self.running = True

    def stop(self) -> None:
        """Stop the server at once (`-m fast`: open connections are ended, nothing waits for clients)."""
        self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "stop")
        self.running = False

    def close(self) -> None:
        try:
            if self.running:
                self.stop()
        finally:
            shutil.rmtree(self.work, ignore_errors=True)

    def _run(self, program: str, *args: str) -> None:
        # Output to a file, never a pipe: the server started by pg_ctl must not hold a pipe of ours open.
        with open(self.work / "commands.log", "ab") as out:
            done = subprocess.run([*self.as_user, str(self.bindir / program), *args], stdin=subprocess.DEVNULL,
                                  stdout=out, stderr=subprocess.STDOUT, timeout=START_TIMEOUT_S + 30,
                                  check=False)
        if done.returncode != 0:
            raise RuntimeError(f"{program} exited {done.returncode}:\n{self._tail()}")

    def _tail(self) -> str:
        parts = []
        for name in ("commands.log", "server.log"):
            with contextlib.suppress(OSError):
                parts.append((self.work / name).read_text(errors="replace")[-2000:])
        return "\n".join(parts)


@contextlib.contextmanager
def throwaway_server() -> Iterator[ThrowawayServer]:
    """A started server with an empty database; stopped and deleted at the end. `ServerUnavailable` if none."""
    server = ThrowawayServer(find_bindir())
    try:
        server.init()
        yield server
    finally:
        server.close()
