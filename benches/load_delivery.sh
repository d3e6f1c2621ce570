#!/usr/bin/env bash
# Load harness: clicks from wrk through an edge, UDP batches and a collector
# into ClickHouse, against ClickHouse's own insert rate for the same rows.
#
#   benches/load_delivery.sh [seconds]      (default 60; AFFGATE_LOAD_CONNS=64)
#   AFFGATE_LOAD_PACED=1 benches/load_delivery.sh 60
#       paced instead of flat out: every connection waits 1 ms between
#       requests (wrk's delay()), so AFFGATE_LOAD_CONNS sets the rate
#       (about 72 connections give 20,000 clicks/s here); for the lag target.
#   AFFGATE_LOAD_WINDOW_MS=50: the collector's [ingest] window_ms (default: its own).
#   AFFGATE_LOAD_BIN_DIR=DIR: run DIR/affgate-edge and DIR/affgate-collector
#       instead of this tree's release build (A/B against another commit).
#   AFFGATE_LOAD_NO_ROLLUP=1: diagnostic, drops the clicks_hourly view after
#       the migration, to see what the rollup costs ClickHouse per insert.
#   AFFGATE_LOAD_BACKLOG=1 benches/load_delivery.sh 20
#       the collector's own capacity: wrk fills the ring of an edge that has
#       no collector configured for the given time, wrk stops, the edge is
#       stopped (SIGTERM), then the collector starts and the edge restarts on
#       its ring, delivering to it: the backlog drains with nothing else
#       competing for the cores.
#       The rate is the drain's (first to last row into ClickHouse); the lag
#       figures then only say how old the backlog was.
#
# What it does, all on 127.0.0.1:
#  1. starts the stack (deploy/services.sh), builds release binaries;
#  2. a links file of 10,000 slugs, a collector (own ClickHouse database
#     affgate_load) and an edge delivering to it;
#  3. wrk, keep-alive, 64 connections, a random slug per request, for the
#     given time;
#  4. waits until ClickHouse holds every click the edge minted (zero loss is
#     checked, not assumed) and reports clicks/s, drain time after wrk
#     stopped, and delivery lag percentiles (collector receive time minus
#     click time, per row);
#  5. the ceiling: the same rows exported as TSV and inserted by
#     clickhouse-client into a copy of the table; reports its rows/s and the
#     ratio.
# Bounded: wrk runs for the given seconds; every wait has a deadline.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
secs=${1:-60}
conns=${AFFGATE_LOAD_CONNS:-64}
paced=${AFFGATE_LOAD_PACED:-}
window_ms=${AFFGATE_LOAD_WINDOW_MS:-}
backlog=${AFFGATE_LOAD_BACKLOG:-}
no_rollup=${AFFGATE_LOAD_NO_ROLLUP:-}
bin_dir=${AFFGATE_LOAD_BIN_DIR:-}
# Every AFFGATE_* variable is a config key to the binaries: keep ours out.
unset AFFGATE_LOAD_CONNS AFFGATE_LOAD_PACED AFFGATE_LOAD_WINDOW_MS AFFGATE_LOAD_BACKLOG AFFGATE_LOAD_NO_ROLLUP AFFGATE_LOAD_BIN_DIR
db=affgate_load

./deploy/install.sh >/dev/null
./deploy/services.sh start >/dev/null
# Say where ClickHouse keeps its data: on ext4 without a journal its CPU per
# insert depends on what was deleted minutes before (benches/clickhouse_fs.sh).
echo "== $(benches/clickhouse_fs.sh status)"
command -v wrk >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk >/dev/null; }
if [ -n "$bin_dir" ]; then
  edge="$bin_dir/affgate-edge"
  collector="$bin_dir/affgate-collector"
  [ -x "$edge" ] && [ -x "$collector" ] || { echo "no affgate-edge and affgate-collector in $bin_dir" >&2; exit 2; }
  echo "== binaries from $bin_dir"
else
  cargo build --release --locked -q -p affgate-edge -p affgate-collector
  edge="$root/target/release/affgate-edge"
  collector="$root/target/release/affgate-collector"
fi

work=$(mktemp -d /tmp/affgate-load.XXXXXX)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

ch() { curl -fsS "http://127.0.0.1:8123/" --data-binary "$1"; }
ch "DROP DATABASE IF EXISTS $db" >/dev/null

secret=$(openssl rand -hex 32)
{
  echo "slug,link_id,destination"
  for i in $(seq 0 9999); do echo "s$i,$((i + 1)),https://merchant.example/p?c={click_id}"; done
} >"$work/links.csv"
echo "network_id,name,postback_token" >"$work/networks.csv"

udp_port=$(python3 -c 'import socket; s=socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
cat >"$work/collector.toml" <<TOML
secret = "$secret"
[ingest]
udp_listen = "127.0.0.1:$udp_port"
${window_ms:+window_ms = $window_ms}
[clickhouse]
url = "http://127.0.0.1:8123"
database = "$db"
[postgres]
url = "postgres://affgate:affgate@127.0.0.1:5432/affgate"
[metrics]
listen = "127.0.0.1:0"
TOML
cat >"$work/edge.toml" <<TOML
edge_id = 1
secret = "$secret"
[http]
listen = "127.0.0.1:0"
[links]
file = "$work/links.csv"
networks_file = "$work/networks.csv"
[buffer]
path = "/dev/shm/affgate-load-$$.ring"
size_mb = 1024
spill_dir = "$work/spill"
[delivery]
collectors = ["127.0.0.1:$udp_port"]
[metrics]
listen = "127.0.0.1:0"
TOML
rm -f "/dev/shm/affgate-load-$$.ring"

"$collector" --config "$work/collector.toml" migrate >/dev/null
if [ -n "$no_rollup" ]; then
  ch "DROP TABLE $db.clicks_hourly_mv" >/dev/null
  echo "== diagnostic: the clicks_hourly view dropped, inserts feed clicks only"
fi
start_collector() {
  "$collector" --config "$work/collector.toml" >"$work/collector.out" 2>"$work/collector.log" &
  collector_pid=$!
  pids+=("$collector_pid")
  for _ in $(seq 1 100); do grep -q listening "$work/collector.out" 2>/dev/null && break; sleep 0.1; done
  grep -q listening "$work/collector.out" || { echo "collector did not start: $(cat "$work/collector.log")" >&2; exit 1; }
}
[ -n "$backlog" ] || start_collector
start_edge() {
  "$edge" --config "$1" >"$work/edge.out" 2>"$work/edge.log" &
  edge_pid=$!
  pids+=("$edge_pid")
}
if [ -n "$backlog" ]; then
  # The same edge without a collector: events stay in the ring.
  sed '/^\[delivery\]/,/^collectors/d' "$work/edge.toml" >"$work/edge-fill.toml"
  start_edge "$work/edge-fill.toml"
else
  start_edge "$work/edge.toml"
fi
for _ in $(seq 1 100); do grep -q listening "$work/edge.out" 2>/dev/null && break; sleep 0.1; done
http=$(sed -n 's/.* http=\([^ ]*\).*/\1/p' "$work/edge.out")
[ -n "$http" ] || { echo "edge did not start: $(cat "$work/edge.log")" >&2; exit 1; }

cat >"$work/random.lua" <<'LUA'
math.randomseed(42)
request = function()
  return wrk.format("GET", "/c/s" .. math.random(0, 9999))
end
LUA
if [ -n "$paced" ]; then
  echo 'delay = function() return 1 end' >>"$work/random.lua"
fi

# CPU time (utime + stime, clock ticks) of a process and its threads.
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
hz=$(getconf CLK_TCK)
ch_pid=$(pgrep -o -x clickhouse-server 2>/dev/null || pgrep -o -f 'clickhouse-server --config' || true)
if [ -z "$backlog" ]; then
  c0=$(cpu_ticks "$collector_pid"); s0=$( [ -n "$ch_pid" ] && cpu_ticks "$ch_pid" || echo 0)
fi

echo "== wrk: ${secs}s, $conns connections, random slugs, edge at $http${backlog:+ (no collector yet: filling the ring)}"
wrk -t1 -c"$conns" -d"${secs}s" --latency -s "$work/random.lua" "http://$http" | tee "$work/wrk.txt"
stopped=$(date +%s%N)
if [ -n "$backlog" ]; then
  kill -TERM "$edge_pid"
  wait "$edge_pid" || { echo "the filling edge did not stop cleanly: $(tail -3 "$work/edge.log")" >&2; exit 1; }
  echo "== backlog of $(( $("$edge" --config "$work/edge.toml" ring inspect | sed -n 's/^next_seq: //p') - 1 )) clicks: starting the collector, then the edge on its ring"
  s0=$( [ -n "$ch_pid" ] && cpu_ticks "$ch_pid" || echo 0)
  stopped=$(date +%s%N)
  start_collector
  c0=$(cpu_ticks "$collector_pid")
  start_edge "$work/edge.toml"
  e0=0
fi

minted=$(( $("$edge" --config "$work/edge.toml" ring inspect | sed -n 's/^next_seq: //p') - 1 ))
echo "== waiting for ClickHouse to hold all $minted clicks"
deadline=$(( $(date +%s) + 300 ))
# While it drains: the collector's last window (rows, commit seconds) and
# the edge's records in flight, sampled with each poll.
collector_metrics=$(sed -n 's/.* metrics=\([^ ]*\).*/\1/p' "$work/collector.out")
edge_metrics=$(sed -n 's/.* metrics=\([^ ]*\).*/\1/p' "$work/edge.out")
sample() {
  local c e
  c=$(curl -fsS "http://$collector_metrics/metrics" 2>/dev/null | awk '/^affgate_collector_window_rows /{r=$2} /^affgate_collector_commit_seconds /{s=$2} END{print r+0, s+0}')
  e=$(curl -fsS "http://$edge_metrics/metrics" 2>/dev/null | awk '/^affgate_edge_delivery_in_flight_records /{print $2+0}')
  a=$(awk '/^RssAnon:/{print $2}' "/proc/$edge_pid/status" 2>/dev/null)
  echo "$c ${e:-0} ${a:-0}" >>"$work/samples"
}
while :; do
  [ -z "$collector_metrics" ] || [ -z "$edge_metrics" ] || sample
  # Rows in the table's active parts first: about 2 ms of server CPU,
  # where a FINAL count of a million rows costs about 100 ms, taken from the
  # pipeline it measures. FINAL (copies collapsed) only once they add up.
  n=$(ch "SELECT sum(rows) FROM system.parts WHERE database = '$db' AND table = 'clicks' AND active")
  if [ "$n" -ge "$minted" ]; then
    n=$(ch "SELECT count() FROM $db.clicks FINAL")
    [ "$n" -ge "$minted" ] && break
  fi
  [ "$(date +%s)" -lt "$deadline" ] || { echo "only $n of $minted clicks after 300 s (rows in parts; distinct once those add up)" >&2; exit 1; }
  sleep 0.2
done
drained=$(date +%s%N)
c1=$(cpu_ticks "$collector_pid"); s1=$( [ -n "$ch_pid" ] && cpu_ticks "$ch_pid" || echo 0)
[ -z "$backlog" ] || e1=$(cpu_ticks "$edge_pid")
first_last=$(ch "SELECT min(received_ms), max(received_ms) FROM $db.clicks FORMAT TSV")
lag=$(ch "SELECT arrayStringConcat(arrayMap(x -> toString(round(x)), quantiles(0.5, 0.9, 0.99, 0.999)(received_ms - ts_ms)), ' / ') FROM $db.clicks")
distinct=$(ch "SELECT uniqExact(click_id) FROM $db.clicks")
[ "$distinct" -eq "$minted" ] || { echo "LOSS OR EXTRA: $distinct distinct ids in ClickHouse, $minted minted" >&2; exit 1; }

read -r first last <<<"$first_last"
span_ms=$(( last - first ))
rate=$(( minted * 1000 / (span_ms > 0 ? span_ms : 1) ))

echo "== ceiling: clickhouse-client inserting the same $minted rows (TSV)"
ch "CREATE TABLE $db.ceiling AS $db.clicks" >/dev/null
ch "SELECT * FROM $db.clicks FORMAT TabSeparated" >"$work/clicks.tsv"
s2=$( [ -n "$ch_pid" ] && cpu_ticks "$ch_pid" || echo 0)
t0=$(date +%s%N)
client_cpu=$( { TIMEFORMAT='%U %S'; time clickhouse-client --query "INSERT INTO $db.ceiling FORMAT TabSeparated" <"$work/clicks.tsv" >/dev/null; } 2>&1 | tail -1)
t1=$(date +%s%N)
s3=$( [ -n "$ch_pid" ] && cpu_ticks "$ch_pid" || echo 0)
ceiling=$(( minted * 1000000000 / (t1 - t0) ))
# CPU microseconds per row: the pipeline (collector + server) against the
# ceiling (clickhouse-client + server), the same rows into the same table.
cpu=$(python3 - "$minted" "$hz" "$c0" "$c1" "$s0" "$s1" "$s2" "$s3" "$client_cpu" <<'PY'
import sys
n, hz, c0, c1, s0, s1, s2, s3 = (float(x) for x in sys.argv[1:9])
cu, cs = (float(x) for x in sys.argv[9].split())
col = (c1 - c0) / hz * 1e6 / n
srv = (s1 - s0) / hz * 1e6 / n
cli = (cu + cs) * 1e6 / n
srv2 = (s3 - s2) / hz * 1e6 / n
print(f"{col:.2f} {srv:.2f} {cli:.2f} {srv2:.2f} {(cli + srv2) / (col + srv):.2f}")
PY
)
read -r cpu_col cpu_srv cpu_cli cpu_srv2 cpu_ratio <<<"$cpu"

echo
echo "clicks minted (302s):            $minted"
echo "clicks in ClickHouse (distinct): $distinct   (zero loss, zero extra)"
echo "edge->ClickHouse rate:           $rate clicks/s (first to last arrival)"
if [ -n "$backlog" ]; then
  echo "drain from collector start:      $(( (drained - stopped) / 1000000 )) ms"
  echo "edge CPU us/row while draining:  $(python3 -c "print(f'{($e1 - $e0) / $hz * 1e6 / $minted:.2f}')") (the flusher's side)"
else
  echo "drain after wrk stopped:         $(( (drained - stopped) / 1000000 )) ms"
fi
echo "delivery lag p50/p90/p99/p99.9:  $lag ms"
echo "clickhouse-client ceiling:       $ceiling rows/s"
echo "ratio (pipeline / ceiling):      $(python3 -c "print(f'{$rate/$ceiling:.2f}')")"
if [ -n "$backlog" ]; then span="from collector start to drained"; else span="while wrk ran and drained"; fi
echo "CPU us/row, collector + server:  $cpu_col + $cpu_srv (pipeline, $span)"
echo "CPU us/row, client + server:     $cpu_cli + $cpu_srv2 (clickhouse-client ceiling)"
echo "CPU ratio (ceiling / pipeline):  $cpu_ratio (1.0 = the collector costs what clickhouse-client does)"
if [ -s "$work/samples" ]; then
  python3 - "$work/samples" <<'PY'
import statistics, sys
rows = [tuple(float(x) for x in l.split()) for l in open(sys.argv[1]) if l.strip()]
w, c, f, a = ([r[i] for r in rows] for i in range(4))
m = statistics.median
print(f"sampled while draining ({len(rows)}x): last window rows median {m(w):.0f} max {max(w):.0f}; "
      f"its commit median {m(c)*1000:.0f} ms max {max(c)*1000:.0f} ms; edge records in flight median {m(f):.0f} max {max(f):.0f}; "
      f"edge RssAnon max {max(a)/1024:.1f} MiB")
PY
fi
if [ -n "$collector_metrics" ]; then
  echo "collector counters (/metrics):"
  curl -fsS "http://$collector_metrics/metrics" | grep -E '^affgate_collector_(datagrams_received|udp_coalesced_reads|entries|duplicate_entries|clicks_written|windows_committed|windows_failed|datagrams_dropped)_total' | sed 's/^/  /'
fi
if [ -n "$edge_metrics" ]; then
  echo "edge delivery (/metrics):"
  curl -fsS "http://$edge_metrics/metrics" | grep -E '^affgate_edge_delivery_(datagrams_sent_total|segmented_sends_total|segmented_datagrams_total|records_sent_total|records_resent_total|rtt_seconds|first_resend_seconds) ' | sed 's/^/  /'
fi
ch "DROP DATABASE IF EXISTS $db" >/dev/null
rm -f "/dev/shm/affgate-load-$$.ring"
