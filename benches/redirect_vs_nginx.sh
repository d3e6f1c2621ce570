#!/usr/bin/env bash
# The edge against nginx on the same load: click redirects (`GET /c/{slug}`,
# nginx: `map $uri` + `return 302`) or postbacks (`GET /postback`, nginx:
# `return 200 "OK\n"`), in alternating rounds, with CPU time per request.
#
#   benches/redirect_vs_nginx.sh [--route click|postback] [--rounds N] [--secs S]
#                                [--conns C] [--threads T] [--no-build] [--edge PATH]
#                                [--no-delivery] [--window-ms MS]
#   defaults: click, 5 rounds of 10 s, 64 connections, 1 wrk thread
#
# What it does, all on 127.0.0.1:
#  1. installs nginx and wrk from Debian when missing, starts the stack
#     (deploy/services.sh), builds the release edge and collector (skipped
#     with --no-build; binaries from $CARGO_TARGET_DIR/release, default
#     target/release; --edge PATH runs another edge binary, e.g. an older
#     commit's, against the same collector);
#  2. the same 10,000 slugs as an nginx config and an edge links file;
#     nginx runs by hand (own prefix, config, pid and logs in a temp dir,
#     worker_processes = cores, access_log off); the edge delivers its UDP
#     batches to a real collector writing to its own ClickHouse and
#     PostgreSQL databases (dropped at exit);
#  3. postback route only: the ledger in PostgreSQL (the network, an
#     affiliate three levels deep, one offer, the same 10,000 links), then
#     1,000 clicks through the edge, whose click ids the postbacks carry
#     (each postback has its own txid, so each is a new conversion with an
#     event and three commissions);
#  4. a warm-up of 2 s each, then N rounds nginx, edge, nginx, edge...:
#     wrk keep-alive, a random slug (click id) per request; per round the
#     requests/s, p50/p99/p99.9 latency (wrk's histogram, from a Lua done()),
#     and the server's CPU time (utime + stime of all its processes from
#     /proc, before and after) over the requests wrk counted;
#  5. prints per server the median over rounds and the ratios edge/nginx,
#     and what the edge's rounds also cost on the same cores: the
#     collector's CPU and the stores' (clickhouse-server and postgres
#     processes, found by name and only read) per request;
#     --no-delivery is a diagnostic: no collector, the edge keeps every
#     event in its ring (size AFFGATE_BENCH_RING_MB, default 1024 MiB), so
#     the edge is compared with nginx without delivery and stores sharing
#     the cores; the check is then that the ring holds every event;
#     --window-ms sets the collector's [ingest] window_ms (default: its own);
#  6. checks, not assumes, zero loss: every request the edge answered was a
#     302 (200 for postbacks) by its own metrics, every event it minted (its
#     ring sequence) is in ClickHouse (clicks, FINAL) or PostgreSQL
#     (postback_inbox), exactly once, within a deadline;
#  7. postback route only: for up to AFFGATE_BENCH_PROCESS_SECS (default 20)
#     with no load, how fast the conversion processor works through the
#     inbox backlog the rounds left (rows/s) and the collector's and the
#     stores' CPU per processed row; then checks that every processed
#     postback was recorded as a conversion with its commissions.
# Bounded: every wrk run has a duration, every wait a deadline; a trap
# stops nginx, the edge and the collector and removes the temp dir.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)

route=click
rounds=5
secs=10
conns=64
threads=1
build=1
edge_override=""
delivery=1
window_ms=""
while [ $# -gt 0 ]; do
  case "$1" in
    --route) route=$2; shift 2 ;;
    --rounds) rounds=$2; shift 2 ;;
    --secs) secs=$2; shift 2 ;;
    --conns) conns=$2; shift 2 ;;
    --threads) threads=$2; shift 2 ;;
    --no-build) build=0; shift ;;
    --edge) edge_override=$2; shift 2 ;;
    --no-delivery) delivery=0; shift ;;
    --window-ms) window_ms=$2; shift 2 ;;
    -h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
case "$route" in click | postback) ;; *) echo "--route click|postback" >&2; exit 2 ;; esac
for n in "$rounds" "$secs" "$conns" "$threads"; do
  [[ "$n" =~ ^[1-9][0-9]*$ ]] || { echo "counts must be positive integers" >&2; exit 2; }
done

need=()
command -v nginx >/dev/null || [ -x /usr/sbin/nginx ] || need+=(nginx)
command -v wrk >/dev/null || need+=(wrk)
if [ ${#need[@]} -gt 0 ]; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi
nginx_bin=$(command -v nginx || echo /usr/sbin/nginx)
./deploy/services.sh start >/dev/null
# Say where ClickHouse keeps its data: on ext4 without a journal its CPU per
# insert depends on what was deleted minutes before (benches/clickhouse_fs.sh).
echo "== $(benches/clickhouse_fs.sh status)"
if [ "$build" = 1 ]; then
  cargo build --release --locked -q -p affgate-edge -p affgate-collector
fi
bin="${CARGO_TARGET_DIR:-$root/target}/release"
edge="${edge_override:-$bin/affgate-edge}"
collector="$bin/affgate-collector"
[ -x "$edge" ] && [ -x "$collector" ] || { echo "no release binaries in $bin" >&2; exit 1; }

cores=$(nproc)
hz=$(getconf CLK_TCK)
db="affgate_bench_$$"
pg_admin="postgres://affgate:affgate@127.0.0.1:5432/affgate"
pg_url="postgres://affgate:affgate@127.0.0.1:5432/$db"
ring="/dev/shm/affgate-bench-$$.ring"
work=$(mktemp -d /tmp/affgate-vs-nginx.XXXXXX)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do
    for _ in $(seq 1 50); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$p" 2>/dev/null || true
  done
  wait 2>/dev/null || true
  curl -fsS "http://127.0.0.1:8123/" --data-binary "DROP DATABASE IF EXISTS $db" >/dev/null 2>&1 || true
  psql -q "$pg_admin" -c "DROP DATABASE IF EXISTS $db" >/dev/null 2>&1 || true
  rm -f "$ring"
  rm -rf "$work"
}
trap cleanup EXIT

ch() { curl -fsS "http://127.0.0.1:8123/" --data-binary "$1"; }
free_port() {
  python3 -c 'import socket,sys; s=socket.socket(socket.AF_INET, getattr(socket, sys.argv[1])); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])' "$1"
}
# Sum of utime + stime, in clock ticks, of a process and its child processes
# (nginx's workers). /proc/PID/stat already sums the process's threads.
cpu_ticks() {
  local total=0 p line kids
  local all=("$1")
  kids=$(cat /proc/"$1"/task/*/children 2>/dev/null || true)
  for p in $kids; do all+=("$p"); done
  for p in "${all[@]}"; do
    line=$(cat /proc/"$p"/stat 2>/dev/null) || continue
    local f
    read -ra f <<<"${line##*) }"
    total=$((total + f[11] + f[12]))
  done
  echo "$total"
}

# ---- the same 10,000 slugs for both -----------------------------------------
secret=$(openssl rand -hex 32)
token=$(openssl rand -hex 16)
{
  echo "slug,link_id,destination"
  for i in $(seq 0 9999); do echo "s$i,$((i + 1)),https://merchant.example/p?c={click_id}"; done
} >"$work/links.csv"
printf 'network_id,name,postback_token\n1,bench,%s\n' "$token" >"$work/networks.csv"

nginx_port=$(free_port SOCK_STREAM)
mkdir -p "$work/nginx/logs" "$work/nginx/tmp"
{
  cat <<NGINX
worker_processes $cores;
pid $work/nginx/nginx.pid;
error_log $work/nginx/logs/error.log warn;
events { worker_connections 4096; }
http {
  access_log off;
  client_body_temp_path $work/nginx/tmp/body;
  proxy_temp_path $work/nginx/tmp/proxy;
  fastcgi_temp_path $work/nginx/tmp/fastcgi;
  uwsgi_temp_path $work/nginx/tmp/uwsgi;
  scgi_temp_path $work/nginx/tmp/scgi;
  # The edge never closes a keep-alive connection by count; nor does nginx here.
  keepalive_requests 100000000;
  keepalive_timeout 300s;
  map_hash_max_size 65536;
  map_hash_bucket_size 128;
  map \$uri \$dest {
    default "";
NGINX
  for i in $(seq 0 9999); do echo "    /c/s$i https://merchant.example/p?c=s$i;"; done
  cat <<NGINX
  }
  server {
    listen 127.0.0.1:$nginx_port;
    location /c/ {
      if (\$dest = "") { return 404; }
      return 302 \$dest;
    }
    location = /postback { return 200 "OK\n"; }
  }
}
NGINX
} >"$work/nginx/nginx.conf"
"$nginx_bin" -t -q -p "$work/nginx" -e "$work/nginx/logs/error.log" -c "$work/nginx/nginx.conf"
"$nginx_bin" -p "$work/nginx" -e "$work/nginx/logs/error.log" -c "$work/nginx/nginx.conf" -g 'daemon off;' &
nginx_pid=$!
pids+=("$nginx_pid")

# ---- collector and edge -------------------------------------------------------
ch "DROP DATABASE IF EXISTS $db" >/dev/null
psql -q "$pg_admin" -c "DROP DATABASE IF EXISTS $db" >/dev/null
psql -q "$pg_admin" -c "CREATE DATABASE $db" >/dev/null
udp_port=$(free_port SOCK_DGRAM)
cat >"$work/collector.toml" <<TOML
secret = "$secret"
[ingest]
udp_listen = "127.0.0.1:$udp_port"
${window_ms:+window_ms = $window_ms}
[clickhouse]
url = "http://127.0.0.1:8123"
database = "$db"
[postgres]
url = "$pg_url"
[metrics]
listen = "127.0.0.1:0"
TOML
collectors_toml=""
[ "$delivery" = 1 ] && collectors_toml="\"127.0.0.1:$udp_port\""
cat >"$work/edge.toml" <<TOML
edge_id = 1
secret = "$secret"
[http]
listen = "127.0.0.1:0"
[links]
file = "$work/links.csv"
networks_file = "$work/networks.csv"
[buffer]
path = "$ring"
size_mb = ${AFFGATE_BENCH_RING_MB:-1024}
spill_dir = "$work/spill"
[delivery]
collectors = [$collectors_toml]
[metrics]
listen = "127.0.0.1:0"
TOML
rm -f "$ring"
collector_pid=""
if [ "$delivery" = 1 ]; then
  "$collector" --config "$work/collector.toml" migrate >/dev/null
  if [ "$route" = postback ]; then
    # The ledger behind the postbacks, so each one is recorded as a real
    # conversion (event, three commission levels, the ClickHouse mirror)
    # rather than refused as an unknown link: the network the edge knows,
    # an affiliate three levels deep, one offer, and the same 10,000 links.
    psql -q -v ON_ERROR_STOP=1 "$pg_url" >/dev/null <<SQL
INSERT INTO networks (id, name, postback_token) VALUES (1, 'bench', '$token');
INSERT INTO affiliates (id, name, parent_id, path) VALUES
  (1, 'top', NULL, '1'), (2, 'mid', 1, '1.2'), (3, 'leaf', 2, '1.2.3');
INSERT INTO offers (id, name, network_id, payout, currency, commission_levels)
  VALUES (1, 'bench', 1, 2.50, 'USD', '{0.5,0.2,0.1}');
INSERT INTO links (id, slug, offer_id, affiliate_id, destination)
  SELECT i + 1, 's' || i, 1, 3, 'https://merchant.example/p?c={click_id}'
  FROM generate_series(0, 9999) AS i;
SELECT setval(pg_get_serial_sequence(t, 'id'), 10000)
  FROM unnest(ARRAY['networks', 'affiliates', 'offers', 'links']) AS t;
SQL
  fi
  "$collector" --config "$work/collector.toml" >"$work/collector.out" 2>"$work/collector.log" &
  collector_pid=$!
  pids+=("$collector_pid")
fi
"$edge" --config "$work/edge.toml" >"$work/edge.out" 2>"$work/edge.log" &
edge_pid=$!
pids+=("$edge_pid")
for _ in $(seq 1 100); do grep -q listening "$work/edge.out" 2>/dev/null && break; sleep 0.1; done
edge_http=$(sed -n 's/.* http=\([^ ]*\).*/\1/p' "$work/edge.out")
edge_metrics=$(sed -n 's/.* metrics=\([^ ]*\).*/\1/p' "$work/edge.out")
[ -n "$edge_http" ] || { echo "edge did not start: $(cat "$work/edge.log")" >&2; exit 1; }
for _ in $(seq 1 100); do curl -fsS -o /dev/null "http://127.0.0.1:$nginx_port/c/s0" -w '%{http_code}' 2>/dev/null | grep -q 302 && break; sleep 0.1; done
[ "$(curl -sS -o /dev/null -w '%{http_code}' "http://127.0.0.1:$nginx_port/c/s0")" = 302 ] || { echo "nginx did not start: $(cat "$work/nginx/logs/error.log")" >&2; exit 1; }

# ---- wrk scripts ----------------------------------------------------------------
# done() prints one machine-readable line; latencies are microseconds.
cat >"$work/done.lua" <<'LUA'
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    "RESULT requests=%d duration_us=%d p50=%d p99=%d p999=%d sock_errors=%d status_errors=%d\n",
    summary.requests, summary.duration,
    latency:percentile(50), latency:percentile(99), latency:percentile(99.9),
    e.connect + e.read + e.write + e.timeout, e.status))
end
LUA
if [ "$route" = click ]; then
  cat - "$work/done.lua" >"$work/load.lua" <<'LUA'
math.randomseed(42)
request = function()
  return wrk.format("GET", "/c/s" .. math.random(0, 9999))
end
LUA
else
  echo "== 1,000 clicks through the edge for the postbacks' click ids"
  python3 - "$edge_http" >"$work/click_ids.txt" <<'PY'
import http.client, sys, urllib.parse
host, port = sys.argv[1].rsplit(":", 1)
c = http.client.HTTPConnection(host, int(port), timeout=10)
for i in range(1000):
    c.request("GET", f"/c/s{i}")
    r = c.getresponse()
    r.read()
    if r.status != 302:
        sys.exit(f"click {i}: {r.status}")
    q = urllib.parse.urlparse(r.getheader("Location")).query
    print(urllib.parse.parse_qs(q)["c"][0])
PY
  [ "$(sort -u "$work/click_ids.txt" | wc -l)" = 1000 ] || { echo "expected 1000 distinct click ids" >&2; exit 1; }
  {
    echo "local ids = {"
    sed 's/.*/"&",/' "$work/click_ids.txt"
    echo "}"
    echo "local token = \"$token\""
    cat <<'LUA'
-- A distinct txid per request: round tag (wrk argument), thread, counter.
local threads = 0
function setup(thread)
  threads = threads + 1
  thread:set("tid", threads)
end
local tag, n = "w", 0
function init(args)
  tag = (args[1] or "w") .. "-" .. tostring(tid or 0)
  math.randomseed(42)
end
request = function()
  n = n + 1
  return wrk.format("GET", "/postback?click_id=" .. ids[math.random(#ids)]
    .. "&txid=" .. tag .. "-" .. n .. "&payout=1.50&token=" .. token)
end
LUA
    cat "$work/done.lua"
  } >"$work/load.lua"
  # The nginx baseline answers the same URLs.
  [ "$(curl -sS "http://127.0.0.1:$nginx_port/postback?click_id=x")" = OK ] || { echo "nginx /postback" >&2; exit 1; }
  first=$(head -1 "$work/click_ids.txt")
  [ "$(curl -sS "http://$edge_http/postback?click_id=$first&txid=probe&token=$token")" = OK ] || { echo "edge /postback refused a valid postback" >&2; exit 1; }
fi

# CPU ticks of what else the edge's rounds make work: the collector, and the
# stores (clickhouse-server and every postgres process). Read-only lookups
# by name; nothing is signalled.
others_ticks() {
  local c s=0 p
  c=0
  [ -n "$collector_pid" ] && c=$(cpu_ticks "$collector_pid")
  # (ps truncates names to 15 characters: clickhouse-server is clickhouse-serv)
  for p in $(pgrep -x clickhouse-serv; pgrep -x postgres); do
    s=$((s + $(cpu_ticks "$p")))
  done
  echo "$c $s"
}

# run_wrk SERVER ROUND SECONDS: one wrk run; appends a result line unless ROUND is "warm".
run_wrk() {
  local server=$1 round=$2 s=$3 url pid before after line ob oa
  case "$server" in
    nginx) url="http://127.0.0.1:$nginx_port"; pid=$nginx_pid ;;
    edge) url="http://$edge_http"; pid=$edge_pid ;;
  esac
  read -ra ob <<<"$(others_ticks)"
  before=$(cpu_ticks "$pid")
  line=$(wrk -t"$threads" -c"$conns" -d"${s}s" -s "$work/load.lua" "$url" -- "r$round$server" | grep '^RESULT')
  after=$(cpu_ticks "$pid")
  read -ra oa <<<"$(others_ticks)"
  [ "$round" = warm ] && return 0
  echo "$server $round $line cpu_ticks=$((after - before)) collector_ticks=$((oa[0] - ob[0])) stores_ticks=$((oa[1] - ob[1])) load=$(cut -d' ' -f1 /proc/loadavg)" >>"$work/rounds.txt"
  printf '  round %s %-5s %s cpu_ticks=%s\n' "$round" "$server" "${line#RESULT }" "$((after - before))"
}

echo "== $route: nginx (workers=$cores, port $nginx_port) vs edge ($edge_http); $rounds rounds of ${secs}s, $conns connections, $threads wrk thread(s)"
echo "   load before: $(cut -d' ' -f1-3 /proc/loadavg)"
run_wrk nginx warm 2
run_wrk edge warm 2
for r in $(seq 1 "$rounds"); do
  run_wrk nginx "$r" "$secs"
  run_wrk edge "$r" "$secs"
done
echo "   load after: $(cut -d' ' -f1-3 /proc/loadavg)"

echo
python3 - "$work/rounds.txt" "$hz" "$route" <<'PY'
import statistics, sys
path, hz, route = sys.argv[1], int(sys.argv[2]), sys.argv[3]
rows = {}
for line in open(path):
    parts = line.split()
    server, rnd = parts[0], parts[1]
    kv = dict(p.split("=", 1) for p in parts[3:])
    req = int(kv["requests"])
    rows.setdefault(server, []).append({
        "rps": req / (int(kv["duration_us"]) / 1e6),
        "p50": int(kv["p50"]) / 1e3, "p99": int(kv["p99"]) / 1e3, "p999": int(kv["p999"]) / 1e3,
        "cpu_us": int(kv["cpu_ticks"]) / hz * 1e6 / max(req, 1),
        "coll_us": int(kv["collector_ticks"]) / hz * 1e6 / max(req, 1),
        "stores_us": int(kv["stores_ticks"]) / hz * 1e6 / max(req, 1),
        "errors": int(kv["sock_errors"]) + int(kv["status_errors"]),
        "load": float(kv["load"]),
    })
med = {s: {k: statistics.median(r[k] for r in rs) for k in ("rps", "p50", "p99", "p999", "cpu_us")} for s, rs in rows.items()}
print(f"{route}: medians over {len(rows['edge'])} rounds (per-round lines above)")
print(f"| server | requests/s | p50 ms | p99 ms | p99.9 ms | CPU µs/request | wrk errors |")
print(f"|---|---:|---:|---:|---:|---:|---:|")
for s in ("nginx", "edge"):
    m = med[s]
    errs = sum(r["errors"] for r in rows[s])
    print(f"| {s} | {m['rps']:,.0f} | {m['p50']:.2f} | {m['p99']:.2f} | {m['p999']:.2f} | {m['cpu_us']:.2f} | {errs} |")
e, n = med["edge"], med["nginx"]
print(f"| edge/nginx | {e['rps']/n['rps']:.2f}x | {e['p50']/n['p50']:.2f}x | {e['p99']/n['p99']:.2f}x | {e['p999']/n['p999']:.2f}x | {e['cpu_us']/n['cpu_us']:.2f}x | |")
ce = statistics.median(r["coll_us"] for r in rows["edge"])
se = statistics.median(r["stores_us"] for r in rows["edge"])
print(f"during the edge's rounds, also on these cores: collector {ce:.2f} µs/request, stores (ClickHouse, PostgreSQL) {se:.2f} µs/request")
loads = [r["load"] for rs in rows.values() for r in rs]
print(f"load average (1 min) at the end of rounds: {min(loads):.2f} to {max(loads):.2f}")
PY

# ---- zero loss: every request answered right, every event delivered once --------
metric() {
  curl -fsS "http://$edge_metrics/metrics" | awk -v k="$1" '$1 == k { print $2 }'
}
edge_errors=$(awk '$1 == "edge" { split($0, a, "status_errors="); split(a[2], b, " "); s += b[1] } END { print s + 0 }' "$work/rounds.txt")
[ "$edge_errors" = 0 ] || { echo "FAIL: wrk saw $edge_errors non-2xx/3xx answers from the edge" >&2; exit 1; }
minted=$(("$("$edge" --config "$work/edge.toml" ring inspect | sed -n 's/^next_seq: //p')" - 1))
clicks_3xx=$(metric 'affgate_edge_http_requests_total{route="click",status="3xx"}')
click_all=0
for c in 1xx 2xx 4xx 5xx; do click_all=$((click_all + $(metric "affgate_edge_http_requests_total{route=\"click\",status=\"$c\"}"))); done
pb_2xx=$(metric 'affgate_edge_http_requests_total{route="postback",status="2xx"}')
pb_other=0
for c in 1xx 3xx 4xx 5xx; do pb_other=$((pb_other + $(metric "affgate_edge_http_requests_total{route=\"postback\",status=\"$c\"}"))); done
append_errors=$(metric affgate_edge_ring_append_errors_total)
echo
echo "edge answered: $clicks_3xx clicks (302), $click_all other click answers; $pb_2xx postbacks (200), $pb_other other postback answers; ring append errors $append_errors"
[ "$click_all" = 0 ] && [ "$pb_other" = 0 ] && [ "$append_errors" = 0 ] || { echo "FAIL: not every request was a 302/200 stored in the ring" >&2; exit 1; }
[ "$minted" = $((clicks_3xx + pb_2xx)) ] || { echo "FAIL: ring sequence says $minted events, metrics say $((clicks_3xx + pb_2xx))" >&2; exit 1; }
if [ "$delivery" = 0 ]; then
  held=$("$edge" --config "$work/edge.toml" ring inspect | awk '$1 == "unacked_records:" || $1 == "spilled_records:" { s += $2 } END { print s + 0 }')
  [ "$held" = "$minted" ] || { echo "FAIL: the ring holds $held events, the edge minted $minted" >&2; exit 1; }
  echo "no delivery: the ring holds all $held events (zero loss)"
  exit 0
fi
echo "== waiting (up to 300 s) for the $minted events in the stores"
deadline=$(($(date +%s) + 300))
while :; do
  in_ch=$(ch "SELECT count() FROM $db.clicks FINAL")
  in_pg=$(psql -qtA "$pg_url" -c "SELECT count(*) FROM postback_inbox")
  [ "$in_ch" -ge "$clicks_3xx" ] && [ "$in_pg" -ge "$pb_2xx" ] && break
  [ "$(date +%s)" -lt "$deadline" ] || { echo "FAIL: $in_ch of $clicks_3xx clicks, $in_pg of $pb_2xx postbacks after 300 s" >&2; exit 1; }
  sleep 0.5
done
distinct=$(ch "SELECT uniqExact(click_id) FROM $db.clicks")
[ "$distinct" = "$clicks_3xx" ] && [ "$in_ch" = "$clicks_3xx" ] || { echo "FAIL: ClickHouse has $in_ch rows FINAL, $distinct distinct ids; the edge minted $clicks_3xx" >&2; exit 1; }
[ "$in_pg" = "$pb_2xx" ] || { echo "FAIL: postback_inbox has $in_pg rows; the edge stored $pb_2xx" >&2; exit 1; }
echo "delivered: $in_ch clicks in ClickHouse ($distinct distinct), $in_pg postbacks in postback_inbox: zero loss, zero extra"
echo "ring after the drain: $("$edge" --config "$work/edge.toml" ring inspect | grep -E '^(unacked_records|spilled_records):' | tr '\n' ' ')"

# Postbacks: the collector's conversion processor turns inbox rows into
# conversions far slower than the edge takes postbacks, so a backlog is left
# after the rounds. With nothing else running, measure for a bounded time how
# fast it works through that backlog and what each processed row costs:
# collector and stores (PostgreSQL, and ClickHouse for the mirror) CPU.
if [ "$route" = postback ]; then
  # The backlog from the collector's own counters: polling PostgreSQL with a
  # count of the inbox would add a scan of it per second to the stores' CPU.
  collector_metrics=$(sed -n 's/.* metrics=\([^ ]*\).*/\1/p' "$work/collector.out")
  processed() {
    curl -fsS "http://$collector_metrics/metrics" |
      awk '$1 ~ /^affgate_collector_postbacks_processed_total/ { s += $2 } END { print s + 0 }'
  }
  backlog() { echo $((in_pg - $(processed))); }
  secs=${AFFGATE_BENCH_PROCESS_SECS:-20}
  b0=$(backlog)
  echo "== conversion processing: $b0 of $in_pg inbox rows unprocessed; measuring for up to ${secs} s"
  read -ra pa <<<"$(others_ticks)"
  t0=$(date +%s%N)
  end=$(($(date +%s) + secs))
  while [ "$(date +%s)" -lt "$end" ]; do
    sleep 1
    [ "$(backlog)" = 0 ] && break
  done
  t1=$(date +%s%N)
  read -ra pz <<<"$(others_ticks)"
  b1=$(backlog)
  python3 - "$b0" "$b1" "$t0" "$t1" "$((pz[0] - pa[0]))" "$((pz[1] - pa[1]))" "$hz" <<'PY'
import sys
b0, b1, t0, t1, coll, stores, hz = map(int, sys.argv[1:])
done = b0 - b1
secs = (t1 - t0) / 1e9
per = lambda ticks: ticks / hz * 1e6 / max(done, 1)
print(f"conversion processing: {done} rows in {secs:.1f} s = {done / secs:,.0f} rows/s; "
      f"CPU per processed row: collector {per(coll):.1f} µs, stores (PostgreSQL, ClickHouse) {per(stores):.1f} µs; "
      f"{b1} left unprocessed")
PY
  # What was measured must be the recording path: every processed postback a
  # conversion with its three commissions, none refused (an unknown link, a
  # bad click id) or skipped as a duplicate.
  read -r recorded others conversions commissions <<<"$(psql -qtA -F' ' "$pg_url" -c "
    SELECT count(*) FILTER (WHERE outcome = 'recorded'), count(*) FILTER (WHERE outcome <> 'recorded'),
           (SELECT count(*) FROM conversions), (SELECT count(*) FROM commissions)
    FROM postback_inbox WHERE processed_at IS NOT NULL")"
  echo "processed inbox rows: $recorded recorded, $others otherwise; ledger: $conversions conversions, $commissions commissions"
  [ "$others" = 0 ] && [ "$conversions" = "$recorded" ] && [ "$commissions" = $((3 * recorded)) ] ||
    { echo "FAIL: not every processed postback became a conversion with three commissions" >&2; exit 1; }
fi
