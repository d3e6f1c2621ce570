#!/usr/bin/env bash
# Install what affgate needs to build, test and run on Debian 12, from
# Debian's packages. Idempotent: installs only what is missing.
#
#   capnproto      the Cap'n Proto compiler (affgate-schema's build)
#   redis-server   link source for edges, and the tests' Redis
#   openssl, curl  test certificates; the demo's requests
#   python3        the demo's and load harnesses' JSON and port helpers
set -euo pipefail

need=()
have() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q "install ok installed"; }
for pkg in capnproto redis-server openssl curl ca-certificates python3; do
  have "$pkg" || need+=("$pkg")
done

if ((${#need[@]})); then
  echo "install.sh: installing ${need[*]}"
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

# Debian starts redis-server as a service on install; the project runs its
# own instances on their own ports, so the packaged one is left as it is.
command -v capnp >/dev/null || { echo "install.sh: capnp missing after install" >&2; exit 1; }
command -v redis-server >/dev/null || { echo "install.sh: redis-server missing after install" >&2; exit 1; }
command -v cargo >/dev/null || { echo "install.sh: cargo (Rust) is required" >&2; exit 1; }
echo "install.sh: dependencies present"
