#!/usr/bin/env bash
# A PostgreSQL cluster on 127.0.0.1 for a Prefect server (Debian's `postgresql` package; no system service needed).
#
#   scripts/postgres.sh start     create the cluster in $PGDATA if it is not there, start it, create the database
#                                 $PGDATABASE, print its Prefect connection URL on stdout
#   scripts/postgres.sh stop      stop it (the data stays: the next start reuses it)
#   scripts/postgres.sh destroy   stop it and delete $PGDATA (a throw-away cluster)
#   scripts/postgres.sh url       print the connection URL
#
# PGDATA (default /var/tmp/fedscan-postgres), PGPORT (default 5433, beside a distribution cluster on 5432) and
# PGDATABASE (default prefect) are PostgreSQL's own variables. The cluster listens on 127.0.0.1 only, with no Unix
# socket, and trusts local TCP connections as user `postgres`: one host, one operator. PostgreSQL refuses to run
# as root, so as root the cluster belongs to the system user `postgres` (the package creates it) and $PGDATA must
# be reachable by that user (not under a 0700 directory such as pytest's or /root).
set -euo pipefail
cmd="${1:-}"
PGDATA="${PGDATA:-/var/tmp/fedscan-postgres}"
PGPORT="${PGPORT:-5433}"
PGDATABASE="${PGDATABASE:-prefect}"
url="postgresql+asyncpg://postgres@127.0.0.1:${PGPORT}/${PGDATABASE}"

die() { echo "postgres.sh: $*" >&2; exit 1; }

bindir=""
for d in $(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V -r); do
  [ -x "$d/initdb" ] && bindir="$d" && break
done
if [ -z "$bindir" ] && command -v initdb >/dev/null 2>&1; then
  bindir="$(dirname "$(readlink -f "$(command -v initdb)")")"
fi
[ -n "$bindir" ] || die "PostgreSQL is not installed (Debian: apt-get install postgresql)"

as_owner() {  # run a server command as a user PostgreSQL accepts
  if [ "$(id -u)" = "0" ]; then
    id postgres >/dev/null 2>&1 || die "running as root and there is no system user 'postgres' to own the cluster"
    runuser -u postgres -- "$@"
  else
    "$@"
  fi
}

running() { as_owner "$bindir/pg_ctl" -D "$PGDATA" status >/dev/null 2>&1; }

case "$cmd" in
  start)
    if [ ! -f "$PGDATA/PG_VERSION" ]; then
      mkdir -p "$PGDATA"
      if [ "$(id -u)" = "0" ]; then
        chown postgres: "$PGDATA" && chmod 0700 "$PGDATA"
        runuser -u postgres -- test -w "$PGDATA" || die "user 'postgres' cannot write $PGDATA (a parent is private)"
      fi
      as_owner "$bindir/initdb" -D "$PGDATA" -U postgres --auth=trust --encoding=UTF8 --locale=C.UTF-8 \
        --no-instructions >"$PGDATA.initdb.log" 2>&1 || { cat "$PGDATA.initdb.log" >&2; die "initdb failed"; }
      rm -f "$PGDATA.initdb.log"
      {
        echo "listen_addresses = '127.0.0.1'"
        echo "unix_socket_directories = ''"
        echo "max_connections = 200"       # a Prefect server and its services hold up to ~30 each
      } | as_owner tee -a "$PGDATA/postgresql.conf" >/dev/null
    fi
    if ! running; then
      as_owner "$bindir/pg_ctl" -D "$PGDATA" -l "$PGDATA/server.log" -o "-p $PGPORT" -w -t 120 start >/dev/null \
        || { tail -n 20 "$PGDATA/server.log" >&2 || true; die "the server did not start (log: $PGDATA/server.log)"; }
    fi
    psql=("$bindir/psql" -h 127.0.0.1 -p "$PGPORT" -U postgres -d postgres -v ON_ERROR_STOP=1 -qtA)
    if [ "$("${psql[@]}" -c "SELECT 1 FROM pg_database WHERE datname = '$PGDATABASE'")" != "1" ]; then
      "${psql[@]}" -c "CREATE DATABASE \"$PGDATABASE\"" >/dev/null
    fi
    echo "$url"
    ;;
  stop)
    if [ -f "$PGDATA/PG_VERSION" ] && running; then
      as_owner "$bindir/pg_ctl" -D "$PGDATA" -m fast -w -t 60 stop >/dev/null
    fi
    ;;
  destroy)
    "$0" stop
    rm -rf "$PGDATA"
    ;;
  url)
    echo "$url"
    ;;
  *)
    die "usage: PGDATA=DIR PGPORT=PORT $0 start|stop|destroy|url"
    ;;
esac
