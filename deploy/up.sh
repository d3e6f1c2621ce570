#!/usr/bin/env bash
# Bring affgate up on this machine and show it working: installs what is
# missing, starts ClickHouse, PostgreSQL and Redis (deploy/services.sh),
# builds, migrates, starts a collector (UDP :7400, admin API :9300, metrics
# :9200) and an edge reading its links from Redis (:8080, metrics :9100);
# creates a network, an offer, a three-level affiliate tree and a link
# through the admin API, sends a click and a postback, and shows the click
# in ClickHouse and the conversion with its commissions from the admin API.
# State lives in .local/; stop with deploy/down.sh (the databases keep
# running: deploy/services.sh stop).
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
token_file="$local_dir/admin_token"
[ -s "$token_file" ] || openssl rand -hex 24 >"$token_file"
admin_token=$(cat "$token_file")
admin_port=${AFFGATE_DEMO_ADMIN_PORT:-9300}
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
[redis]
url = "redis://127.0.0.1:6379/0"
[admin]
listen = "127.0.0.1:$admin_port"
token = "$admin_token"
[metrics]
listen = "127.0.0.1:9200"
TOML
cat >"$local_dir/edge.toml" <<TOML
edge_id = 1
secret = "$(cat "$secret_file")"
[http]
listen = "127.0.0.1:$http_port"
[links]
redis_url = "redis://127.0.0.1:6379/0"
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

api() { # METHOD PATH [JSON]
  curl -sS -X "$1" "http://127.0.0.1:$admin_port/api/v1/$2" \
    -H "Authorization: Bearer $admin_token" ${3:+-d "$3"}
}
field() { python3 -c "import json, sys; print(json.load(sys.stdin)['$1'])"; }
run=$(date +%s)
network_token="demo-token-$run"

echo "== the admin API: a network, an offer paying 12.50 over three levels, an affiliate tree, a link"
network=$(api POST networks "{\"name\": \"Demo Network\", \"postback_token\": \"$network_token\"}" | field id)
offer=$(api POST offers "{\"name\": \"Demo Offer\", \"network_id\": $network, \"payout\": \"12.50\", \"currency\": \"USD\", \"commission_levels\": [\"0.70\", \"0.20\", \"0.10\"], \"fallback_url\": \"https://example.com/offer-closed\"}" | field id)
root=$(api POST affiliates '{"name": "Root Agency"}' | field id)
mid=$(api POST affiliates "{\"name\": \"Sub Agency\", \"parent_id\": $root}" | field id)
leaf=$(api POST affiliates "{\"name\": \"Publisher\", \"parent_id\": $mid}" | field id)
link=$(api POST links "{\"offer_id\": $offer, \"affiliate_id\": $leaf, \"slug\": \"demo-$run\", \"destination\": \"https://merchant.example/landing?click={click_id}&s1={sub1}\"}")
echo "$link"
slug=$(echo "$link" | field slug)

echo "== a click: GET /c/$slug?sub1=newsletter (the edge learnt the link from Redis)"
headers=$(curl -sS -o /dev/null -D - "http://127.0.0.1:$http_port/c/$slug?sub1=newsletter")
echo "$headers" | grep -Ei '^(HTTP|location|x-request-id|cache-control)'
click_id=$(echo "$headers" | tr -d '\r' | awk -F'click=' '/^[Ll]ocation:/ {split($2, a, "&"); print a[1]}')
[ -n "$click_id" ] || { echo "no click id in Location" >&2; exit 1; }

echo "== a postback for it: GET /postback?click_id=$click_id&txid=T-1&token=..."
curl -sS -i "http://127.0.0.1:$http_port/postback?click_id=$click_id&txid=T-1&token=$network_token" | grep -Ei '^(HTTP|x-request-id)|^OK'

echo "== the click in ClickHouse (delivered, acknowledged, freed from the ring)"
q="SELECT click_id, slug, sub1, edge_id, received_ms - ts_ms AS lag_ms FROM affgate.clicks FINAL WHERE click_id = '$click_id' FORMAT Vertical"
for _ in $(seq 1 100); do
  n=$(curl -fsS "http://127.0.0.1:8123/" --data-binary "SELECT count() FROM affgate.clicks FINAL WHERE click_id = '$click_id'")
  [ "$n" = "1" ] && break
  sleep 0.1
done
curl -fsS "http://127.0.0.1:8123/" --data-binary "$q"
echo "== the conversion and its commissions (70/20/10 % of 12.50 up the tree), from the admin API"
for _ in $(seq 1 100); do
  n=$(api GET "conversions?click_id=$click_id" | python3 -c "import json, sys; print(len(json.load(sys.stdin)['items']))")
  [ "$n" = "1" ] && break
  sleep 0.1
done
api GET "conversions?click_id=$click_id" | python3 -m json.tool

echo "== what the ring still holds: affgate-edge ring inspect"
"$bin" --config "$local_dir/edge.toml" ring inspect

echo
echo "edge running (pid $(cat "$local_dir/edge.pid")), http://127.0.0.1:$http_port, metrics http://127.0.0.1:$metrics_port/metrics"
echo "collector running (pid $(cat "$local_dir/collector.pid")), udp 127.0.0.1:$ingest_port, metrics http://127.0.0.1:9200/metrics"
echo "admin API http://127.0.0.1:$admin_port/api/v1/ (Authorization: Bearer \$(cat $token_file)); docs/admin.md"
echo "logs: $local_dir/edge.log, $local_dir/collector.log; stop with deploy/down.sh"
