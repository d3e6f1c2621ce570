#!/usr/bin/env bash
# Stop what deploy/up.sh started.
set -euo pipefail
cd "$(dirname "$0")/.."
pidfile=.local/edge.pid
if [ -s "$pidfile" ]; then
  pid=$(cat "$pidfile")
  if kill -0 "$pid" 2>/dev/null; then
    kill -TERM "$pid"
    for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    echo "edge $pid stopped"
  fi
  rm -f "$pidfile"
fi
