#!/usr/bin/env bash
# Run a command with a throwaway PostgreSQL server on 127.0.0.1, then stop it and delete its data.
#
#   tests/fakes/postgres/with-postgres.sh make test
#   tests/fakes/postgres/with-postgres.sh .venv/bin/pytest -q tests/storage tests/bot/discord_app
#
# The server gets a free port, a data folder under $TMPDIR, fsync off (the data is thrown away), one
# password user and one database; the command sees TEST_DATABASE_URL (postgresql+asyncpg://...) and
# the command's exit status is this script's. Needs the PostgreSQL server binaries (Debian: apt-get
# install postgresql; PG_BINDIR overrides where they are looked for). As root, the server runs as the
# `postgres` user, since PostgreSQL refuses to run as root.
set -euo pipefail

if [ "$#" -eq 0 ]; then
    echo "usage: $0 COMMAND [ARG...]" >&2
    exit 2
fi

find_bindir() {
    if [ -n "${PG_BINDIR:-}" ]; then
        echo "$PG_BINDIR"
        return
    fi
    local dir
    # Debian keeps the server binaries out of PATH, one folder per major version: take the newest.
    dir=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1 || true)
    if [ -n "$dir" ] && [ -x "$dir/postgres" ]; then
        echo "$dir"
        return
    fi
    if command -v postgres >/dev/null 2>&1; then
        dirname "$(command -v postgres)"
        return
    fi
    return 1
}

if ! BINDIR=$(find_bindir); then
    echo "with-postgres: no PostgreSQL server binaries found (apt-get install postgresql, or set PG_BINDIR)" >&2
    exit 3
fi

free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()'
}

# As root: every server command runs as `postgres`, which must be able to write the data folder.
AS=()
if [ "$(id -u)" -eq 0 ]; then
    AS=(runuser -u postgres --)
fi

WORK=$(mktemp -d "${TMPDIR:-/tmp}/idefics-pg.XXXXXX")
chmod 755 "$WORK"
DATA="$WORK/data"
LOG="$WORK/server.log"
PORT=$(free_port)
USER_NAME=idefics
DB_NAME=idefics_test
# A fresh random password per run: the server only listens on loopback and lives for this run.
PASSWORD=$(python3 -c 'import secrets; print(secrets.token_hex(16))')
printf '%s\n' "$PASSWORD" >"$WORK/pwfile"
if [ "${#AS[@]}" -gt 0 ]; then
    chown -R postgres: "$WORK"
fi

started=0
stop_server() {
    local status=$?
    if [ "$started" -eq 1 ]; then
        "${AS[@]}" "$BINDIR/pg_ctl" -D "$DATA" -m fast -w stop >/dev/null 2>&1 || true
    fi
    if [ "$status" -ne 0 ] && [ -f "$LOG" ] && [ "$started" -eq 0 ]; then
        echo "with-postgres: server log:" >&2
        tail -n 30 "$LOG" >&2 || true
    fi
    rm -rf "$WORK"
    exit "$status"
}
trap stop_server EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# scram-sha-256 over TCP (what a real deployment uses, and what asyncpg must speak); trust on the
# private Unix socket in $WORK, only for creating the database below.
"${AS[@]}" "$BINDIR/initdb" -D "$DATA" --username="$USER_NAME" --pwfile="$WORK/pwfile" \
    --auth-host=scram-sha-256 --auth-local=trust --encoding=UTF8 --locale=C >"$WORK/initdb.log" 2>&1 \
    || { cat "$WORK/initdb.log" >&2; exit 3; }

# Durability off: the data is deleted at exit, and per-test schema resets are then fast.
"${AS[@]}" "$BINDIR/pg_ctl" -D "$DATA" -l "$LOG" -w -t 60 start -o \
    "-c listen_addresses=127.0.0.1 -c port=$PORT -c unix_socket_directories=$WORK \
     -c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=200" >/dev/null \
    || { echo "with-postgres: the server did not start:" >&2; tail -n 30 "$LOG" >&2; exit 3; }
started=1

"${AS[@]}" "$BINDIR/createdb" -h "$WORK" -p "$PORT" -U "$USER_NAME" "$DB_NAME"

VERSION=$("${AS[@]}" "$BINDIR/postgres" --version)
export TEST_DATABASE_URL="postgresql+asyncpg://$USER_NAME:$PASSWORD@127.0.0.1:$PORT/$DB_NAME"
echo "with-postgres: $VERSION on 127.0.0.1:$PORT, database $DB_NAME (TEST_DATABASE_URL is set)"

# Not exec: the EXIT trap must stop the server after the command.
set +e
"$@"
status=$?
set -e
exit "$status"
