#!/usr/bin/env bash
# Runs every test of leadex. Installs what a fresh Debian machine lacks first (as root:
# redis-server, prometheus/promtool, node for the k6 syntax check; cargo-nextest).
set -euo pipefail
cd "$(dirname "$0")/.."

missing=()
command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
command -v promtool >/dev/null 2>&1 || missing+=(prometheus)
command -v node >/dev/null 2>&1 || missing+=(nodejs)
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" -eq 0 ]; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}"
  else
    echo "missing: ${missing[*]} (install them with apt-get as root)" >&2
    exit 1
  fi
fi
# The Debian prometheus package starts a service; tests start their own.
systemctl stop prometheus >/dev/null 2>&1 || true
cargo nextest --version >/dev/null 2>&1 || cargo install cargo-nextest --locked

cargo build --all-targets
cargo nextest run --no-fail-fast
# The criterion benches must build. With the dev profile they reuse the build above (which
# compiled them too); `cargo bench` itself compiles every dependency again optimised with fat
# LTO, which on a slow 2-core machine takes longer than the rest of this script together.
cargo bench --no-run --profile dev
if [ -d load-tests/k6 ]; then
  for script in load-tests/k6/*.js; do
    tmp="$(mktemp --suffix=.mjs)"
    cp "$script" "$tmp"
    node --check "$tmp"
    rm -f "$tmp"
  done
  echo "k6 scripts: syntax ok"
fi
for script in load-tests/*.sh; do
  bash -n "$script"
done
echo "load-test scripts: syntax ok"
