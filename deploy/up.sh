#!/usr/bin/env bash
# Bring affgate up on this machine and show it working: installs what is
# missing, builds, starts an edge with the example links on :8080 (metrics on
# :9100), sends a click and a postback, and prints what the ring now holds.
# State lives in .local/; stop everything with deploy/down.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
local_dir="$root/.local"
mkdir -p "$local_dir/spill"

./deploy/install.sh
echo "== build (release)"
cargo build --release --locked -p affgate-edge
bin="$root/target/release/affgate-edge"

# Stop an edge a previous run left behind.
"$root/deploy/down.sh" >/dev/null 2>&1 || true

secret_file="$local_dir/secret"
[ -s "$secret_file" ] || openssl rand -hex 32 >"$secret_file"
cp deploy/config/links.example.csv "$local_dir/links.csv"
cp deploy/config/networks.example.csv "$local_dir/networks.csv"
http_port=${AFFGATE_DEMO_HTTP_PORT:-8080}
metrics_port=${AFFGATE_DEMO_METRICS_PORT:-9100}
cat >"$local_dir/edge.toml" <<TOML
edge_id = 1
secret = "$(cat "$secret_file")"
[http]
listen = "127.0.0.1:$http_port"
[links]
file = "$local_dir/links.csv"
networks_file = "$local_dir/networks.csv"
fallback_url = "https://example.com/fallback"
[buffer]
path = "$local_dir/edge.ring"
size_mb = 16
spill_dir = "$local_dir/spill"
[metrics]
listen = "127.0.0.1:$metrics_port"
TOML

echo "== start edge"
"$bin" --config "$local_dir/edge.toml" >"$local_dir/edge.out" 2>"$local_dir/edge.log" &
echo $! >"$local_dir/edge.pid"
for _ in $(seq 1 100); do
  curl -fsS "http://127.0.0.1:$http_port/readyz" >/dev/null 2>&1 && break
  sleep 0.1
done
curl -fsS "http://127.0.0.1:$http_port/readyz"

echo "== a click: GET /c/demo?sub1=newsletter"
headers=$(curl -sS -o /dev/null -D - "http://127.0.0.1:$http_port/c/demo?sub1=newsletter")
echo "$headers" | grep -Ei '^(HTTP|location|x-request-id|cache-control)'
click_id=$(echo "$headers" | tr -d '\r' | awk -F'click=' '/^[Ll]ocation:/ {split($2, a, "&"); print a[1]}')
[ -n "$click_id" ] || { echo "no click id in Location" >&2; exit 1; }

echo "== a postback for it: GET /postback?click_id=$click_id&txid=T-1&payout=12.50&token=..."
curl -sS -i "http://127.0.0.1:$http_port/postback?click_id=$click_id&txid=T-1&payout=12.50&token=demo-postback-token" | grep -Ei '^(HTTP|x-request-id)|^OK'

echo "== what the ring holds: affgate-edge ring inspect --records"
"$bin" --config "$local_dir/edge.toml" ring inspect --records

echo
echo "edge running (pid $(cat "$local_dir/edge.pid")), http://127.0.0.1:$http_port, metrics http://127.0.0.1:$metrics_port/metrics"
echo "logs: $local_dir/edge.log; stop with deploy/down.sh"
