#!/usr/bin/env bash
# Stop what deploy/up.sh started (the edge, then the collector). The
# databases keep running; deploy/services.sh stop stops them.
set -euo pipefail
cd "$(dirname "$0")/.."
for name in edge collector; do
  pidfile=.local/$name.pid
  [ -s "$pidfile" ] || continue
  pid=$(cat "$pidfile")
  if kill -0 "$pid" 2>/dev/null; then
    kill -TERM "$pid"
    for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    echo "$name $pid stopped"
  fi
  rm -f "$pidfile"
done
