#!/usr/bin/env bash
# Bring affgate up on this machine and show it working: installs what is
# missing, starts ClickHouse, PostgreSQL and Redis (deploy/services.sh),
# builds, migrates, starts a collector (UDP :7400, metrics :9200) and an edge
# with the example links (:8080, metrics :9100), sends a click and a
# postback, and shows the click in ClickHouse and the postback in the
# PostgreSQL inbox. State lives in .local/; stop with deploy/down.sh (the
# databases keep running: deploy/services.sh stop).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
local_dir="$root/.local"
mkdir -p "$local_dir/spill"

./deploy/install.sh
./deploy/services.sh start
echo "== build (release)"
cargo build --release --locked -p affgate-edge -p affgate-collector
bin="$root/target/release/affgate-edge"
cbin="$root/target/release/affgate-collector"

# Stop an edge a previous run left behind.
"$root/deploy/down.sh" >/dev/null 2>&1 || true

secret_file="$local_dir/secret"
[ -s "$secret_file" ] || openssl rand -hex 32 >"$secret_file"
cp deploy/config/links.example.csv "$local_dir/links.csv"
cp deploy/config/networks.example.csv "$local_dir/networks.csv"
http_port=${AFFGATE_DEMO_HTTP_PORT:-8080}
metrics_port=${AFFGATE_DEMO_METRICS_PORT:-9100}
ingest_port=${AFFGATE_DEMO_INGEST_PORT:-7400}
cat >"$local_dir/collector.toml" <<TOML
secret = "$(cat "$secret_file")"
[ingest]
udp_listen = "127.0.0.1:$ingest_port"
[clickhouse]
url = "http://127.0.0.1:8123"
database = "affgate"
[postgres]
url = "postgres://affgate:affgate@127.0.0.1:5432/affgate"
[metrics]
listen = "127.0.0.1:9200"
TOML
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
[delivery]
collectors = ["127.0.0.1:$ingest_port"]
[metrics]
listen = "127.0.0.1:$metrics_port"
TOML

echo "== migrate and start the collector"
"$cbin" --config "$local_dir/collector.toml" migrate
"$cbin" --config "$local_dir/collector.toml" >"$local_dir/collector.out" 2>"$local_dir/collector.log" &
echo $! >"$local_dir/collector.pid"
for _ in $(seq 1 100); do grep -q listening "$local_dir/collector.out" 2>/dev/null && break; sleep 0.1; done
cat "$local_dir/collector.out"

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

echo "== the click in ClickHouse (delivered, acknowledged, freed from the ring)"
q="SELECT click_id, slug, sub1, edge_id, received_ms - ts_ms AS lag_ms FROM affgate.clicks FINAL WHERE click_id = '$click_id' FORMAT Vertical"
for _ in $(seq 1 100); do
  n=$(curl -fsS "http://127.0.0.1:8123/" --data-binary "SELECT count() FROM affgate.clicks FINAL WHERE click_id = '$click_id'")
  [ "$n" = "1" ] && break
  sleep 0.1
done
curl -fsS "http://127.0.0.1:8123/" --data-binary "$q"
echo "== the postback in the PostgreSQL inbox"
for _ in $(seq 1 100); do
  n=$(PGPASSWORD=affgate psql -h 127.0.0.1 -U affgate -d affgate -Atc "SELECT count(*) FROM postback_inbox WHERE click_id = '$click_id'")
  [ "$n" = "1" ] && break
  sleep 0.1
done
PGPASSWORD=affgate psql -h 127.0.0.1 -U affgate -d affgate -c "SELECT click_id, txid, status, payout, currency FROM postback_inbox WHERE click_id = '$click_id'"

echo "== what the ring still holds: affgate-edge ring inspect"
"$bin" --config "$local_dir/edge.toml" ring inspect

echo
echo "edge running (pid $(cat "$local_dir/edge.pid")), http://127.0.0.1:$http_port, metrics http://127.0.0.1:$metrics_port/metrics"
echo "collector running (pid $(cat "$local_dir/collector.pid")), udp 127.0.0.1:$ingest_port, metrics http://127.0.0.1:9200/metrics"
echo "logs: $local_dir/edge.log, $local_dir/collector.log; stop with deploy/down.sh"
