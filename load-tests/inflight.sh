#!/usr/bin/env bash
# Memory per in-flight auction: buyers that take BUYER_MS to answer, a deadline above it, and
# an open-loop rate of INFLIGHT / BUYER_MS leads/s, so INFLIGHT auctions are waiting at once.
# Samples leadex's RSS and its `leadex_auctions_in_flight` gauge every 0.5 s and prints the
# peak and (peak RSS - idle RSS) / in flight. Everything on 127.0.0.1, bounded, stopped on exit.
#
#   load-tests/inflight.sh                      # 9,000 in flight, 1 buyer answering in 8 s
#   INFLIGHT=3000 BUYERS=5 load-tests/inflight.sh
#   HTTP2=1 load-tests/inflight.sh              # h2c on both legs (supplier and buyers)
#
# Over HTTP/1.1 each in-flight auction holds one supplier socket and one socket per buyer in
# leadex, so INFLIGHT x (1 + BUYERS) must stay under the open-files limit (`ulimit -n`). With
# HTTP2=1 the driver and leadex's buyer clients use h2c, so the leads in flight share a few
# connections and the figure is the auction's own memory.
set -euo pipefail
cd "$(dirname "$0")/.."
. load-tests/lib.sh

INFLIGHT="${INFLIGHT:-9000}"
BUYERS="${BUYERS:-1}"
BUYER_MS="${BUYER_MS:-8000}"
HTTP2="${HTTP2:-0}"
h2_buyer=false
h2_driver=()
if [ "$HTTP2" = 1 ]; then
  h2_buyer=true
  h2_driver=(--http2)
fi
SKIP_BUILD="${SKIP_BUILD:-0}"
PORT="${LEADEX_PORT:-18180}"
BUYER_BASE_PORT=19200
bin="${BIN_DIR:-${CARGO_TARGET_DIR:-target}/release}"
work="$(mktemp -d -t leadex-inflight-XXXXXX)"

need=$((INFLIGHT * (1 + BUYERS) + 200))
if [ "$HTTP2" != 1 ] && [ "$(ulimit -n)" -lt "$need" ]; then
  echo "INFLIGHT=$INFLIGHT with $BUYERS buyers needs about $need open files; ulimit -n is $(ulimit -n)" >&2
  exit 2
fi

cleanup() {
  stop_started
  rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

if [ "$SKIP_BUILD" != 1 ]; then
  cargo build --release --bins
fi

key="lx_inflight_$(od -An -N12 -tx1 /dev/urandom | tr -d ' \n')"
{
  cat <<EOF
[server]
listen = "127.0.0.1:$PORT"
max_in_flight_auctions = $((INFLIGHT * 2))
h2c = $h2_buyer

[storage]
path = "$work/data"
EOF
  limit_and_seller_toml
  cat <<EOF

[[suppliers]]
id = "inflight"
sellers = ["LOAD0001"]
api_key_sha256 = ["$(printf %s "$key" | sha256sum | cut -d' ' -f1)"]

[[campaigns]]
id = "slow"
seller = "LOAD0001"
category = "Auto Insurance"
ping_timeout_ms = $((BUYER_MS + 2000))
post_timeout_ms = 2000
EOF
} >"$work/leadex.toml"
for i in $(seq 1 "$BUYERS"); do
  port=$((BUYER_BASE_PORT + i))
  "$bin/leadex" buyer-sim --listen "127.0.0.1:$port" --bid 10 --latency-ms "$BUYER_MS" \
    >"$work/buyer-$i.log" 2>&1 &
  pids+=("$!")
  cat >>"$work/leadex.toml" <<EOF

[[buyers]]
id = "buyer-$i"
campaigns = ["slow"]
ping_url = "http://127.0.0.1:$port/ping"
post_url = "http://127.0.0.1:$port/post"
max_in_flight = $((INFLIGHT * 2))
http2 = $h2_buyer
EOF
  wait_port "$port"
done
RUST_LOG="${RUST_LOG:-info}" "$bin/leadex" serve --config "$work/leadex.toml" >"$work/leadex.log" 2>&1 &
leadex_pid=$!
pids+=("$leadex_pid")
wait_port "$PORT"

rss_kb() { awk '/VmRSS/ {print $2}' "/proc/$leadex_pid/status"; }
in_flight() {
  curl -s "http://127.0.0.1:$PORT/metrics" | awk '/^leadex_auctions_in_flight / {printf "%d", $2}'
}

# A short warm-up at a low rate so idle RSS includes the lazily built parts.
"$bin/leadex" loadgen --target "http://127.0.0.1:$PORT" --key "$key" --seller LOAD0001 \
  --rate 50 --duration-secs 1 --warmup-secs 0 --timeout-ms $((BUYER_MS + 8000)) --quiet \
  "${h2_driver[@]}" >/dev/null
idle=$(rss_kb)

rate=$(awk -v n="$INFLIGHT" -v ms="$BUYER_MS" 'BEGIN {printf "%.1f", n * 1000 / ms}')
secs=$(awk -v ms="$BUYER_MS" 'BEGIN {printf "%.1f", ms / 1000 + 1.5}')
echo "idle RSS $idle kB; sending $rate leads/s for $secs s to buyers answering in $BUYER_MS ms ($BUYERS buyers)"
"$bin/leadex" loadgen --target "http://127.0.0.1:$PORT" --key "$key" --seller LOAD0001 \
  --rate "$rate" --duration-secs "$secs" --warmup-secs 0 --timeout-ms $((BUYER_MS + 8000)) \
  --max-in-flight $((INFLIGHT * 2)) --threads 1 --quiet --label "inflight" "${h2_driver[@]}" \
  >"$work/loadgen.txt" &
driver=$!
pids+=("$driver")

peak_n=0
peak_rss=0
limit=$(awk -v ms="$BUYER_MS" 'BEGIN {printf "%d", (ms / 1000 + 12) * 2}')
for _ in $(seq 1 "$limit"); do
  kill -0 "$driver" 2>/dev/null || break
  n=$(in_flight)
  r=$(rss_kb)
  if [ "${n:-0}" -gt "$peak_n" ]; then peak_n=$n; fi
  if [ "$r" -gt "$peak_rss" ]; then peak_rss=$r; fi
  echo "  in flight ${n:-?}  RSS $r kB"
  sleep 0.5
done
wait "$driver" || true
cat "$work/loadgen.txt"
after=$(rss_kb)
echo
echo "peak in flight: $peak_n auctions ($BUYERS buyers each)"
echo "RSS: idle $idle kB, peak $peak_rss kB, after the run $after kB"
if [ "$peak_n" -gt 0 ]; then
  awk -v i="$idle" -v p="$peak_rss" -v n="$peak_n" \
    'BEGIN {printf "per in-flight auction: %.1f KiB ((peak - idle) / peak in flight)\n", (p - i) / n}'
fi
