#!/usr/bin/env bash
# Instructions per lead, counted by valgrind's callgrind: the same figure on a busy machine as
# on a quiet one, where CPU time per lead moves by a third from run to run. Runs leadex and the
# bare fan-out baseline (one at a time) under callgrind with five buyer simulators answering
# in 0 ms, sends WARMUP seconds of leads, zeroes the counters, sends DURATION seconds at RATE
# leads/s open loop, dumps the counters and prints, for each, the instructions per lead of its
# HTTP workers (and of the store's writer and applier for leadex) and the crates the workers
# spent them in (load-tests/instructions.py). User-space instructions only: syscalls, the
# kernel's share and cache misses are not in them, so they show what leadex's own code adds,
# not what a lead costs in time.
#
#   load-tests/instructions.sh                     # both targets, 40 leads/s for 15 s
#   TARGETS=leadex RATE=20 load-tests/instructions.sh
#
# Environment: TARGETS (leadex and/or baseline), RATE, DURATION, WARMUP, SKIP_BUILD, BIN_DIR,
# OUT (folder kept for the dumps). Needs valgrind (Debian package `valgrind`). Under
# callgrind a target runs about fifty times slower, so the timeouts are long (3 s a ping);
# keep RATE low enough that every lead is sold (the script checks it).
set -euo pipefail
cd "$(dirname "$0")/.."
. load-tests/lib.sh

TARGETS="${TARGETS:-leadex baseline}"
RATE="${RATE:-40}"
DURATION="${DURATION:-15}"
WARMUP="${WARMUP:-3}"
SKIP_BUILD="${SKIP_BUILD:-0}"
LEADEX_PORT=18280
BASELINE_PORT=18291
BUYER_BASE_PORT=19300
PING_TIMEOUT_MS=3000
POST_TIMEOUT_MS=5000

command -v valgrind >/dev/null || { echo "needs valgrind (apt-get install -y valgrind)" >&2; exit 1; }
bin="${BIN_DIR:-${CARGO_TARGET_DIR:-target}/release}"
work="$(mktemp -d -t leadex-instructions-XXXXXX)"
out="${OUT:-$work/results}"
mkdir -p "$out"

cleanup() {
  stop_started
  if [ -n "${OUT:-}" ]; then
    rm -rf "$work"
  else
    rm -rf "$work/data"
  fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

if [ "$SKIP_BUILD" != 1 ]; then
  cargo build --release --bins
fi

urls=()
for i in 1 2 3 4 5; do
  port=$((BUYER_BASE_PORT + i))
  start "$out/buyer-$i.log" "$bin/leadex" buyer-sim --listen "127.0.0.1:$port" \
    --bid "$((5 + i * 3))-$((20 + i * 5))" --latency-ms 0
  urls+=("http://127.0.0.1:$port")
done
for i in 1 2 3 4 5; do
  wait_port $((BUYER_BASE_PORT + i))
done

key="lx_instr_$(od -An -N12 -tx1 /dev/urandom | tr -d ' \n')"
echo "$key" >"$work/keys.txt"
mkdir -p "$work/data"
{
  cat <<EOF
[server]
listen = "127.0.0.1:$LEADEX_PORT"

[storage]
backend = "embedded"
path = "$work/data"

[[suppliers]]
id = "load-1"
sellers = ["LOAD0001"]
api_key_sha256 = ["$(printf %s "$key" | sha256sum | cut -d' ' -f1)"]
EOF
  limit_and_seller_toml
  campaign_toml load-fast "Auto Insurance" "$PING_TIMEOUT_MS" "$POST_TIMEOUT_MS"
  for i in 1 2 3 4 5; do
    buyer_toml "fast-$i" load-fast "${urls[$((i - 1))]}" 8192
  done
} >"$work/leadex.toml"

# Sends $2 seconds of leads at $3 leads/s to port $1; the driver's table goes to $4.
drive() {
  "$bin/leadex" loadgen --target "http://127.0.0.1:$1" --keys-file "$work/keys.txt" \
    --seller LOAD0001 --category "Auto Insurance" --duration-secs "$2" --warmup-secs 0 \
    --timeout-ms 20000 --rate "$3" >"$4" 2>&1
}

for target in $TARGETS; do
  case "$target" in
    leadex)
      port=$LEADEX_PORT
      set -- "$bin/leadex" serve --config "$work/leadex.toml"
      ;;
    baseline)
      port=$BASELINE_PORT
      set -- "$bin/fanout-baseline" --listen "127.0.0.1:$port" \
        --buyers "$(IFS=,; echo "${urls[*]}")" --ping-timeout-ms "$PING_TIMEOUT_MS" \
        --post-timeout-ms "$POST_TIMEOUT_MS"
      ;;
    *)
      echo "unknown target $target (leadex or baseline)" >&2
      exit 1
      ;;
  esac
  dump="$out/$target.callgrind"
  rm -f "$dump" "$dump".*
  valgrind --tool=callgrind --separate-threads=yes --callgrind-out-file="$dump" "$@" \
    >"$out/$target.log" 2>&1 &
  pid=$!
  pids+=("$pid")
  # A target under callgrind takes a while to start: up to 60 s.
  wait_port "$port" 600
  drive "$port" "$WARMUP" "$RATE" "$out/$target-warmup.txt"
  callgrind_control -z "$pid" >/dev/null 2>&1
  drive "$port" "$DURATION" "$RATE" "$out/$target-driver.txt"
  callgrind_control -d "$pid" >/dev/null 2>&1
  kill -INT "$pid"
  wait "$pid" 2>/dev/null || true
  outcomes="$(grep -m1 '^  outcomes' "$out/$target-driver.txt" || true)"
  sold="$(echo "$outcomes" | awk '{print $3}')"
  sent="$(grep -m1 '^  achieved' "$out/$target-driver.txt" | sed 's/.*(\([0-9]*\) answered.*/\1/')"
  echo "== $target: $RATE leads/s for $DURATION s under callgrind; $outcomes"
  if [ -z "$sold" ] || [ "$sold" != "$sent" ]; then
    echo "   not every lead was sold: lower RATE (the counts below mix in other paths)" >&2
  fi
  python3 load-tests/instructions.py "${sent:-1}" "$dump".1-* | tee "$out/$target.txt"
done
workers() { awk '/^  HTTP workers/ {gsub(",", "", $3); print $3}' "$out/$1.txt" 2>/dev/null; }
if [ -n "$(workers leadex)" ] && [ -n "$(workers baseline)" ]; then
  echo "HTTP workers, leadex / baseline: $(awk -v l="$(workers leadex)" -v b="$(workers baseline)" 'BEGIN {printf "%.3f", l / b}')"
fi
echo "dumps in $out (callgrind_annotate <dump>.1-NN for one thread)"
