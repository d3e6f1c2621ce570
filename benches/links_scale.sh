#!/usr/bin/env bash
# Memory and scale of the edge's link cache: load time and RSS with 0, 10k,
# 100k and 1M links in Redis, and RSS with a full ring.
#
#   benches/links_scale.sh [--counts "0 10000 100000 1000000"] [--ring-mb 64] [--no-build]
#
# What it does, all on 127.0.0.1:
#  1. starts its own redis-server on a free port (no persistence, its own
#     temp dir; the test Redis on 6379 is never touched), builds the
#     release edge (skipped with --no-build; binaries from
#     $CARGO_TARGET_DIR/release, default target/release);
#  2. for each count: writes that many `affgate:link:{slug}` hashes in
#     DESIGN.md's layout with `redis-cli --pipe` (generated RESP), plus 100
#     offers and 10 tokens; starts the edge on it (no collector), takes the
#     load time from its log line "links loaded from redis ... ms=", checks
#     the cache size on /metrics, reads VmRSS, RssAnon, RssFile and RssShmem
#     from /proc/PID/status once /readyz is 200, stops it;
#  3. bytes per link = (RssAnon(n) - RssAnon(0)) / n (the heap; the ring is
#     a shared mapping, counted in RssShmem);
#  4. full ring: an edge on the 10k links with a --ring-mb ring and no
#     collector, driven by wrk until the ring is full (fill ratio >= 0.99,
#     then it spills to disk), then the same RSS figures.
# Bounded: every wait has a deadline; a trap stops redis, the edge and wrk
# and removes the temp dir.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)

counts="0 10000 100000 1000000"
ring_mb=64
build=1
while [ $# -gt 0 ]; do
  case "$1" in
    --counts) counts=$2; shift 2 ;;
    --ring-mb) ring_mb=$2; shift 2 ;;
    --no-build) build=0; shift ;;
    -h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
for n in $counts "$ring_mb"; do
  [[ "$n" =~ ^[0-9]+$ ]] || { echo "counts and sizes must be integers" >&2; exit 2; }
done

command -v redis-server >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null; }
command -v wrk >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk >/dev/null; }
if [ "$build" = 1 ]; then
  cargo build --release --locked -q -p affgate-edge
fi
edge="${CARGO_TARGET_DIR:-$root/target}/release/affgate-edge"
[ -x "$edge" ] || { echo "no release edge at $edge" >&2; exit 1; }

work=$(mktemp -d /tmp/affgate-scale.XXXXXX)
ring="/dev/shm/affgate-scale-$$.ring"
redis_pid=""
edge_pid=""
cleanup() {
  [ -n "$edge_pid" ] && kill -KILL "$edge_pid" 2>/dev/null || true
  [ -n "$redis_pid" ] && kill -TERM "$redis_pid" 2>/dev/null || true
  wait 2>/dev/null || true
  rm -f "$ring"
  rm -rf "$work"
}
trap cleanup EXIT

port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
redis-server --port "$port" --bind 127.0.0.1 --save "" --appendonly no --dir "$work" \
  --daemonize no --logfile "$work/redis.log" &
redis_pid=$!
rcli() { redis-cli -p "$port" "$@"; }
for _ in $(seq 1 100); do rcli ping 2>/dev/null | grep -q PONG && break; sleep 0.1; done
rcli ping | grep -q PONG || { echo "redis did not start" >&2; exit 1; }

secret=$(openssl rand -hex 32)

# add_links FROM TO: RESP for links FROM..TO-1, piped in.
add_links() {
  python3 - "$1" "$2" <<'PY' | rcli --pipe >/dev/null
import sys
lo, hi = int(sys.argv[1]), int(sys.argv[2])
out = sys.stdout.buffer
def cmd(*args):
    parts = [b"*%d\r\n" % len(args)]
    for a in args:
        b = a if isinstance(a, bytes) else str(a).encode()
        parts.append(b"$%d\r\n%s\r\n" % (len(b), b))
    return b"".join(parts)
buf = []
for i in range(lo, hi):
    buf.append(cmd("HSET", f"affgate:link:s{i}", "link_id", i + 1,
                   "destination", "https://merchant.example/p?c={click_id}&a={affiliate_id}&s={sub1}",
                   "status", "active", "redirect_code", 302, "offer_id", i % 100 + 1,
                   "affiliate_id", i % 1000 + 1, "network_id", 1, "version", 1))
    if len(buf) >= 10000:
        out.write(b"".join(buf)); buf = []
out.write(b"".join(buf))
PY
}
add_offers_and_tokens() {
  {
    for o in $(seq 1 100); do echo "HSET affgate:offer:$o status active"; done
    for t in $(seq 1 10); do echo "SET affgate:token:$(printf '%064x' "$t") 1"; done
  } | rcli >/dev/null
}
add_offers_and_tokens

# start_edge: edge on this Redis, no collector; sets edge_pid, http, metrics.
start_edge() {
  rm -f "$ring"
  cat >"$work/edge.toml" <<TOML
edge_id = 1
secret = "$secret"
[http]
listen = "127.0.0.1:0"
[links]
redis_url = "redis://127.0.0.1:$port/0"
[buffer]
path = "$ring"
size_mb = $ring_mb
spill_dir = "$work/spill"
[delivery]
collectors = []
[metrics]
listen = "127.0.0.1:0"
TOML
  : >"$work/edge.out"
  AFFGATE_LOG=info "$edge" --config "$work/edge.toml" >"$work/edge.out" 2>"$work/edge.log" &
  edge_pid=$!
  for _ in $(seq 1 100); do grep -q listening "$work/edge.out" 2>/dev/null && break; sleep 0.1; done
  http=$(sed -n 's/.* http=\([^ ]*\).*/\1/p' "$work/edge.out")
  metrics=$(sed -n 's/.* metrics=\([^ ]*\).*/\1/p' "$work/edge.out")
  [ -n "$http" ] || { echo "edge did not start: $(cat "$work/edge.log")" >&2; exit 1; }
  local deadline=$((SECONDS + 120))
  until [ "$(curl -s -o /dev/null -w '%{http_code}' "http://$http/readyz")" = 200 ]; do
    [ "$SECONDS" -lt "$deadline" ] || { echo "edge not ready after 120 s: $(tail -3 "$work/edge.log")" >&2; exit 1; }
    sleep 0.25 # the load time comes from the edge's own log, not from this poll
  done
}
stop_edge() {
  kill -TERM "$edge_pid"
  wait "$edge_pid" 2>/dev/null || true
  edge_pid=""
}
status_kb() { awk -v k="$1:" '$1 == k { print $2 }' /proc/"$edge_pid"/status; }
metric() { curl -fsS "http://$metrics/metrics" | awk -v k="$1" '$1 == k { print $2 }'; }

echo "== link cache scale: redis on :$port, edge $edge, ring ${ring_mb} MiB"
echo "   load average: $(cut -d' ' -f1-3 /proc/loadavg)"
printf '%-9s %-9s %-10s %-10s %-10s %-10s %-10s\n' links load_ms VmRSS_KiB RssAnon RssFile RssShmem loaded
loaded=0
declare -A anon
for n in $counts; do
  if [ "$n" -gt "$loaded" ]; then
    add_links "$loaded" "$n"
    loaded=$n
  fi
  # Everything in this Redis is ours: links plus 100 offers and 10 tokens.
  keys=$(($(rcli dbsize) - 110))
  [ "$keys" = "$n" ] || { echo "redis holds $keys links, wanted $n" >&2; exit 1; }
  start_edge
  # tracing colours its fields: strip ANSI escapes before reading ms=.
  ms=$(sed 's/\x1b\[[0-9;]*m//g' "$work/edge.log" | sed -n 's/.*links loaded from redis.* ms=\([0-9]*\).*/\1/p' | head -1)
  sleep 1 # let allocator caches settle; RSS does not shrink anyway
  in_cache=$(metric affgate_edge_links_loaded)
  anon[$n]=$(status_kb RssAnon)
  printf '%-9s %-9s %-10s %-10s %-10s %-10s %-10s\n' "$n" "${ms:-?}" "$(status_kb VmRSS)" "${anon[$n]}" "$(status_kb RssFile)" "$(status_kb RssShmem)" "$in_cache"
  [ "$in_cache" = "$keys" ] || { echo "edge holds $in_cache links, redis $keys" >&2; exit 1; }
  stop_edge
done
if [ -n "${anon[0]:-}" ]; then
  for n in $counts; do
    [ "$n" -gt 0 ] || continue
    echo "bytes per link at $n: $(( (anon[$n] - anon[0]) * 1024 / n )) (RssAnon delta / links)"
  done
fi

# ---- full ring ----------------------------------------------------------------
echo "== full ring: ${ring_mb} MiB, no collector, wrk until fill >= 0.99"
rcli flushall >/dev/null
add_links 0 10000
add_offers_and_tokens
start_edge
printf '%-12s %-10s %-10s %-10s %-10s\n' state VmRSS_KiB RssAnon RssFile RssShmem
printf '%-12s %-10s %-10s %-10s %-10s\n' empty "$(status_kb VmRSS)" "$(status_kb RssAnon)" "$(status_kb RssFile)" "$(status_kb RssShmem)"
cat >"$work/random.lua" <<'LUA'
math.randomseed(7)
request = function() return wrk.format("GET", "/c/s" .. math.random(0, 9999)) end
LUA
deadline=$((SECONDS + 300))
fill=0
while python3 -c "import sys; sys.exit(0 if float('$fill') < 0.99 else 1)"; do
  [ "$SECONDS" -lt "$deadline" ] || { echo "ring not full after 300 s (fill $fill)" >&2; exit 1; }
  wrk -t1 -c32 -d5s -s "$work/random.lua" "http://$http" >/dev/null
  fill=$(metric affgate_edge_ring_fill_ratio)
done
printf '%-12s %-10s %-10s %-10s %-10s\n' "full($fill)" "$(status_kb VmRSS)" "$(status_kb RssAnon)" "$(status_kb RssFile)" "$(status_kb RssShmem)"
echo "records: $(metric affgate_edge_ring_unacked_records) in the ring, $(metric affgate_edge_spill_records) spilled"
stop_edge
