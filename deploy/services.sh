#!/usr/bin/env bash
# The stack the collector and the tests need, on this machine: ClickHouse,
# PostgreSQL and Redis from Debian 12's packages, on their default ports,
# listening on loopback only.
#
#   deploy/services.sh start  [clickhouse|postgres|redis|all]   install what is missing, start, wait
#   deploy/services.sh stop   [clickhouse|postgres|redis|all]
#   deploy/services.sh status [clickhouse|postgres|redis|all]   exit 0 when all named are up, 3 if not
#
# Idempotent: a service already answering is left alone; the PostgreSQL
# role and database are created or reset to the known password. Meant for
# development and CI (run as root, or with sudo available), not production.
#
# What start leaves behind:
#   ClickHouse  http://127.0.0.1:8123, user `default`, no password (Debian's
#               users.xml), run as the `clickhouse` user from
#               /etc/clickhouse-server/config.xml; Debian's package does not
#               start it by itself.
#   PostgreSQL  postgres://affgate:affgate@127.0.0.1:5432/affgate: role
#               `affgate` (LOGIN CREATEDB, password `affgate`, the tests
#               create and drop databases of their own), database `affgate`
#               owned by it, extension ltree in it. Debian's pg_hba.conf
#               already asks loopback TCP for a scram password, so it is
#               left as it is.
#   Redis       redis://127.0.0.1:6379, Debian's /etc/redis/redis.conf.
#
# Environment: AFFGATE_PG_VERSION (default: the newest installed, else 15),
# AFFGATE_SERVICES_TIMEOUT seconds to wait for each service (default 60).
set -euo pipefail

action=${1:-}
which=${2:-all}
timeout=${AFFGATE_SERVICES_TIMEOUT:-60}

usage() {
  echo "usage: $0 start|stop|status [clickhouse|postgres|redis|all]" >&2
  exit 2
}
case "$action" in start | stop | status) ;; *) usage ;; esac
case "$which" in clickhouse | postgres | redis | all) ;; *) usage ;; esac

SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"

log() { echo "services.sh: $*"; }
die() {
  echo "services.sh: $*" >&2
  exit 1
}
want() { [ "$which" = all ] || [ "$which" = "$1" ]; }

# Run a command as a system user; runuser is in util-linux (always on Debian).
as_user() {
  local user=$1
  shift
  if [ "$(id -u)" -eq 0 ]; then
    runuser -u "$user" -- "$@"
  else
    sudo -u "$user" -- "$@"
  fi
}

# Poll a command until it succeeds or $timeout seconds pass.
wait_for() {
  local what=$1
  shift
  local deadline=$((SECONDS + timeout))
  until "$@" >/dev/null 2>&1; do
    ((SECONDS < deadline)) || return 1
    sleep 0.2
  done
  log "$what is up"
}

# ---- packages -------------------------------------------------------------

have_pkg() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q "install ok installed"; }

install_missing() {
  local need=()
  for pkg in "$@"; do
    have_pkg "$pkg" || need+=("$pkg")
  done
  ((${#need[@]})) || return 0
  log "installing ${need[*]}"
  # Debian's maintainer scripts try to start services; inside a container
  # without an init they fail or start copies we do not manage. Forbid it
  # for the duration of the install (exit 101 = "action forbidden").
  local policy=/usr/sbin/policy-rc.d created_policy=""
  if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' | $SUDO tee "$policy" >/dev/null
    $SUDO chmod +x "$policy"
    created_policy=1
  fi
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
  [ -z "$created_policy" ] || $SUDO rm -f "$policy"
}

packages_for() {
  case "$1" in
  clickhouse) echo "clickhouse-server clickhouse-client curl ca-certificates" ;;
  postgres) echo "postgresql postgresql-contrib" ;;
  redis) echo "redis-server" ;;
  esac
}

# ---- ClickHouse -----------------------------------------------------------

CH_URL="http://127.0.0.1:8123"
CH_PIDFILE=/run/clickhouse-server/clickhouse-server.pid

ch_up() { [ "$(curl -fsS --max-time 2 "$CH_URL/?query=SELECT%201" 2>/dev/null)" = "1" ]; }

ch_start() {
  if ch_up; then
    log "clickhouse already running at $CH_URL"
    return
  fi
  # The package creates the user and the data directory; make sure of the
  # directories the server writes to and the pid file's, which /run loses
  # on every boot.
  for d in /var/lib/clickhouse /var/log/clickhouse-server /run/clickhouse-server; do
    $SUDO mkdir -p "$d"
    $SUDO chown clickhouse:clickhouse "$d"
  done
  log "starting clickhouse"
  # --daemon forks; the server logs to /var/log/clickhouse-server/.
  (cd /var/lib/clickhouse && as_user clickhouse clickhouse-server \
    --config-file=/etc/clickhouse-server/config.xml --pid-file="$CH_PIDFILE" --daemon)
  wait_for "clickhouse ($CH_URL)" ch_up ||
    die "clickhouse did not answer SELECT 1 on $CH_URL within ${timeout}s; see /var/log/clickhouse-server/clickhouse-server.err.log"
}

ch_stop() {
  local pid=""
  [ -s "$CH_PIDFILE" ] && pid=$(cat "$CH_PIDFILE")
  if [ -z "$pid" ] || ! kill -0 "$pid" 2>/dev/null; then
    # Started some other way: find the server by its exact executable.
    pid=$(pgrep -o -x -u clickhouse clickhouse-serv || true)
  fi
  if [ -z "$pid" ]; then
    log "clickhouse not running"
    return
  fi
  log "stopping clickhouse (pid $pid)"
  $SUDO kill -TERM "$pid"
  local deadline=$((SECONDS + timeout))
  while kill -0 "$pid" 2>/dev/null; do
    ((SECONDS < deadline)) || die "clickhouse (pid $pid) did not stop within ${timeout}s"
    sleep 0.2
  done
  $SUDO rm -f "$CH_PIDFILE"
}

ch_status() {
  if ch_up; then
    log "clickhouse up: $CH_URL"
  else
    log "clickhouse down"
    return 3
  fi
}

# ---- PostgreSQL -----------------------------------------------------------

pg_version() {
  if [ -n "${AFFGATE_PG_VERSION:-}" ]; then
    echo "$AFFGATE_PG_VERSION"
    return
  fi
  local newest=15 d v
  for d in /usr/lib/postgresql/*/bin/postgres; do
    [ -e "$d" ] || continue
    v=${d#/usr/lib/postgresql/}
    v=${v%%/*}
    [[ $v =~ ^[0-9]+$ ]] && ((v >= newest)) && newest=$v
  done
  echo "$newest"
}

PG_CLUSTER=main
PG_USER=affgate
PG_PASSWORD=affgate
PG_DB=affgate

pg_port() {
  pg_lsclusters -h 2>/dev/null | awk -v v="$(pg_version)" -v c="$PG_CLUSTER" '$1 == v && $2 == c { print $3 }'
}

pg_online() { pg_lsclusters -h 2>/dev/null | awk -v v="$(pg_version)" -v c="$PG_CLUSTER" '$1 == v && $2 == c { print $4 }' | grep -q online; }

pg_ready() { pg_isready -q -h 127.0.0.1 -p "$(pg_port)"; }

pg_sql() { PGOPTIONS="-c client_min_messages=warning" as_user postgres psql -X -q -v ON_ERROR_STOP=1 -p "$(pg_port)" "$@"; }

pg_start() {
  local v
  v=$(pg_version)
  if ! pg_lsclusters -h 2>/dev/null | awk -v v="$v" -v c="$PG_CLUSTER" '$1 == v && $2 == c' | grep -q .; then
    # The package makes the cluster on install; this covers a removed one.
    log "creating postgresql cluster $v/$PG_CLUSTER"
    $SUDO pg_createcluster "$v" "$PG_CLUSTER" >/dev/null
  fi
  if pg_online; then
    log "postgresql $v/$PG_CLUSTER already running"
  else
    log "starting postgresql $v/$PG_CLUSTER"
    $SUDO pg_ctlcluster "$v" "$PG_CLUSTER" start
  fi
  wait_for "postgresql (127.0.0.1:$(pg_port))" pg_ready ||
    die "postgresql did not accept connections within ${timeout}s; see /var/log/postgresql/postgresql-$v-$PG_CLUSTER.log"

  # Role, database, extension: create if missing, reset the password always
  # (cheap, and repairs a role someone changed).
  pg_sql -d postgres <<SQL
DO \$\$
BEGIN
  IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '$PG_USER') THEN
    CREATE ROLE $PG_USER LOGIN CREATEDB PASSWORD '$PG_PASSWORD';
  ELSE
    ALTER ROLE $PG_USER LOGIN CREATEDB PASSWORD '$PG_PASSWORD';
  END IF;
END
\$\$;
SQL
  if [ "$(pg_sql -d postgres -tA -c "SELECT 1 FROM pg_database WHERE datname = '$PG_DB'")" != 1 ]; then
    pg_sql -d postgres -c "CREATE DATABASE $PG_DB OWNER $PG_USER"
  fi
  pg_sql -d "$PG_DB" -c "CREATE EXTENSION IF NOT EXISTS ltree"
  # Check the way the collector connects: TCP, password.
  PGPASSWORD=$PG_PASSWORD psql -X -q -h 127.0.0.1 -p "$(pg_port)" -U "$PG_USER" -d "$PG_DB" -tA -c "SELECT 1" >/dev/null ||
    die "cannot log in as $PG_USER over TCP; check /etc/postgresql/$v/$PG_CLUSTER/pg_hba.conf"
}

pg_stop() {
  local v
  v=$(pg_version)
  if ! pg_online; then
    log "postgresql not running"
    return
  fi
  log "stopping postgresql $v/$PG_CLUSTER"
  $SUDO pg_ctlcluster "$v" "$PG_CLUSTER" stop
}

pg_status() {
  if command -v pg_lsclusters >/dev/null && pg_online && pg_ready; then
    log "postgresql up: postgres://$PG_USER:$PG_PASSWORD@127.0.0.1:$(pg_port)/$PG_DB"
  else
    log "postgresql down"
    return 3
  fi
}

# ---- Redis ----------------------------------------------------------------

REDIS_PORT=6379
REDIS_CONF=/etc/redis/redis.conf

redis_up() { [ "$(redis-cli -h 127.0.0.1 -p "$REDIS_PORT" ping 2>/dev/null)" = PONG ]; }

redis_start() {
  if redis_up; then
    log "redis already running on 127.0.0.1:$REDIS_PORT"
    return
  fi
  for d in /run/redis /var/lib/redis /var/log/redis; do
    $SUDO mkdir -p "$d"
    $SUDO chown redis:redis "$d"
  done
  log "starting redis"
  # Debian's config (loopback, /var/lib/redis, pid in /run/redis); the
  # command line wins over it where it needs to for running without systemd.
  (cd /var/lib/redis && as_user redis redis-server "$REDIS_CONF" \
    --port "$REDIS_PORT" --daemonize yes --supervised no)
  wait_for "redis (127.0.0.1:$REDIS_PORT)" redis_up ||
    die "redis did not answer PING within ${timeout}s; see /var/log/redis/redis-server.log"
}

redis_stop() {
  if ! redis_up; then
    log "redis not running"
    return
  fi
  log "stopping redis"
  redis-cli -h 127.0.0.1 -p "$REDIS_PORT" shutdown >/dev/null 2>&1 || true
  local deadline=$((SECONDS + timeout))
  while redis_up; do
    ((SECONDS < deadline)) || die "redis did not stop within ${timeout}s"
    sleep 0.2
  done
}

redis_status() {
  if redis_up; then
    log "redis up: redis://127.0.0.1:$REDIS_PORT"
  else
    log "redis down"
    return 3
  fi
}

# ---- main -----------------------------------------------------------------

services=()
for s in clickhouse postgres redis; do
  want "$s" && services+=("$s")
done

case "$action" in
start)
  pkgs=()
  for s in "${services[@]}"; do
    # shellcheck disable=SC2207
    pkgs+=($(packages_for "$s"))
  done
  install_missing "${pkgs[@]}"
  for s in "${services[@]}"; do
    case "$s" in
    clickhouse) ch_start ;;
    postgres) pg_start ;;
    redis) redis_start ;;
    esac
  done
  echo
  echo "connection URLs:"
  for s in "${services[@]}"; do
    case "$s" in
    clickhouse) echo "  clickhouse  $CH_URL  (user default, no password)" ;;
    postgres) echo "  postgres    postgres://$PG_USER:$PG_PASSWORD@127.0.0.1:$(pg_port)/$PG_DB" ;;
    redis) echo "  redis       redis://127.0.0.1:$REDIS_PORT" ;;
    esac
  done
  ;;
stop)
  for s in "${services[@]}"; do
    case "$s" in
    clickhouse) ch_stop ;;
    postgres) command -v pg_lsclusters >/dev/null && pg_stop ;;
    redis) command -v redis-cli >/dev/null && redis_stop ;;
    esac
  done
  ;;
status)
  rc=0
  for s in "${services[@]}"; do
    case "$s" in
    clickhouse) ch_status || rc=3 ;;
    postgres) pg_status || rc=3 ;;
    redis) redis_status || rc=3 ;;
    esac
  done
  exit $rc
  ;;
esac
