#!/usr/bin/env bash
# Whether leadex's CPU per lead grows with the leads it has stored: leadex alone (no baseline)
# in ROUNDS closed-loop runs one after the other against five buyer simulators answering in
# 0 ms, so its embedded store grows by every round's leads; then the same store after a
# restart, then a new empty store after another. Each run prints leads/s, CPU per lead by
# thread (HTTP workers, store writer, store applier), RSS and the store's size on disk.
# Everything on 127.0.0.1, bounded, stopped on exit.
#
#   SKIP_BUILD=1 load-tests/growth.sh           # 8 rounds of 10 s, then 3 and 3
#   ROUNDS=20 DURATION=15 load-tests/growth.sh
#
# Environment: ROUNDS, AFTER (rounds after each restart), DURATION, WARMUP, CLOSED (senders),
# SKIP_BUILD, BIN_DIR, OUT (folder for growth.tsv and the driver's output).
set -euo pipefail
cd "$(dirname "$0")/.."
. load-tests/lib.sh

ROUNDS="${ROUNDS:-8}"
AFTER="${AFTER:-3}"
DURATION="${DURATION:-10}"
WARMUP="${WARMUP:-3}"
CLOSED="${CLOSED:-64}"
SKIP_BUILD="${SKIP_BUILD:-0}"
PORT="${LEADEX_PORT:-18480}"
BUYER_BASE_PORT=19400
KEYS=50

bin="${BIN_DIR:-${CARGO_TARGET_DIR:-target}/release}"
work="$(mktemp -d -t leadex-growth-XXXXXX)"
out="${OUT:-$work/results}"
mkdir -p "$out"
trap 'stop_started; rm -rf "$work/data-1" "$work/data-2" "$work/leadex.toml"; if [ -n "${OUT:-}" ]; then rm -rf "$work"; fi' EXIT
trap 'exit 130' INT TERM

if [ "$SKIP_BUILD" != 1 ]; then
  cargo build --release --bin leadex
fi
[ -x "$bin/leadex" ] || { echo "missing $bin/leadex (build first)" >&2; exit 1; }
echo "machine: $(nproc) cores; $(uptime)"

urls=()
for i in 1 2 3 4 5; do
  port=$((BUYER_BASE_PORT + i))
  start "$out/buyer-$i.log" "$bin/leadex" buyer-sim --listen "127.0.0.1:$port" \
    --bid "$((5 + i * 3))-$((20 + i * 5))" --latency-ms 0
  urls+=("http://127.0.0.1:$port")
done
for port in $(seq $((BUYER_BASE_PORT + 1)) $((BUYER_BASE_PORT + 5))); do wait_port "$port"; done

keys_file="$out/keys.txt"
: >"$keys_file"
for i in $(seq 1 "$KEYS"); do
  echo "lx_load_${i}_$(od -An -N12 -tx1 /dev/urandom | tr -d ' \n')" >>"$keys_file"
done

# leadex's config with its store in $1.
write_config() {
  {
    cat <<EOF
[server]
listen = "127.0.0.1:$PORT"
workers = 0

[storage]
backend = "embedded"
path = "$1"
EOF
    limit_and_seller_toml
    campaign_toml load-fast "Auto Insurance" 300 1000
    local i=0 key
    while read -r key; do
      i=$((i + 1))
      cat <<EOF

[[suppliers]]
id = "load-$i"
sellers = ["LOAD0001"]
api_key_sha256 = ["$(printf %s "$key" | sha256sum | cut -d' ' -f1)"]
EOF
    done <"$keys_file"
    for i in 1 2 3 4 5; do
      buyer_toml "fast-$i" load-fast "${urls[$((i - 1))]}" 8192
    done
  } >"$work/leadex.toml"
}

ticks_per_sec="$(getconf CLK_TCK)"

leadex_pid=""
serve() {
  # Its line per lead is not what this measures; it goes with the work folder.
  start "$work/leadex-$1.log" "$bin/leadex" serve --config "$work/leadex.toml"
  leadex_pid="${pids[-1]}"
  wait_port "$PORT"
}

stop_leadex() {
  kill "$leadex_pid" 2>/dev/null || true
  wait "$leadex_pid" 2>/dev/null || true
}

printf 'label\tleads_per_s\tworkers_us\twriter_us\tapplier_us\tother_us\trss_mib\tstore_mib\n' >"$out/growth.tsv"
# One closed-loop run; $1 its label, $2 the store's folder.
run() {
  local before after sent achieved
  before="$(thread_ticks "$leadex_pid")"
  "$bin/leadex" loadgen --target "http://127.0.0.1:$PORT" --keys-file "$keys_file" \
    --seller LOAD0001 --category "Auto Insurance" --duration-secs "$DURATION" \
    --warmup-secs "$WARMUP" --timeout-ms 5000 --rate 0 --concurrency "$CLOSED" \
    --label "$1" --summary-file "$out/summary.tsv" >"$out/$1.txt" 2>&1
  after="$(thread_ticks "$leadex_pid")"
  sent="$(awk -F'\t' -v l="$1" '$1 == l {a = $17} END {print a + 0}' "$out/summary.tsv")"
  achieved="$(awk -F'\t' -v l="$1" '$1 == l {a = $4} END {print a + 0}' "$out/summary.tsv")"
  awk -v b="$before" -v a="$after" -v hz="$ticks_per_sec" -v sent="$sent" -v l="$1" \
    -v achieved="$achieved" -v rss="$(awk '/VmRSS/ {print $2}' "/proc/$leadex_pid/status")" \
    -v store="$(du -sk "$2" | cut -f1)" 'BEGIN {
      split(b, x, " "); split(a, y, " ")
      printf "%s\t%.0f", l, achieved
      for (i = 1; i <= 4; i++) printf "\t%.0f", (sent > 0 ? (y[i] - x[i]) / hz * 1e6 / sent : 0)
      printf "\t%.0f\t%.0f\n", rss / 1024, store / 1024
    }' >>"$out/growth.tsv"
  tail -n1 "$out/growth.tsv" | awk -F'\t' '{printf "%-14s %7s leads/s   us per lead: workers %s, writer %s, applier %s, other %s   RSS %s MiB   store %s MiB\n", $1, $2, $3, $4, $5, $6, $7, $8}'
}

mkdir -p "$work/data-1" "$work/data-2"
write_config "$work/data-1"
serve first
for r in $(seq 1 "$ROUNDS"); do run "growing-r$r" "$work/data-1"; done
stop_leadex
serve restarted
for r in $(seq 1 "$AFTER"); do run "restarted-r$r" "$work/data-1"; done
stop_leadex
write_config "$work/data-2"
serve empty
for r in $(seq 1 "$AFTER"); do run "empty-r$r" "$work/data-2"; done
stop_leadex
echo "results in $out/growth.tsv"
