#!/usr/bin/env bash
# Load runs on this machine, everything on 127.0.0.1: builds release, starts ten buyer
# simulators (five answering in 0 ms, five in 20-80 ms), leadex on embedded defaults (durable
# group commit, memory limiter on) and the bare fan-out baseline, drives both open-loop at
# each rate with `leadex loadgen`, prints every table and a leadex/baseline comparison, and
# stops everything it started. Every run is bounded: RATES x (WARMUP + DURATION) seconds.
#
#   load-tests/run.sh                         # defaults below
#   RATES="500 1000" DURATION=10 load-tests/run.sh
#   SKIP_BUILD=1 load-tests/run.sh            # reuse target/release
#
# Environment: RATES (open-loop leads/s, 0 ms buyers), SLOW_RATES (20-80 ms buyers; either
# may be empty to skip it),
# DURATION and WARMUP (seconds per run), KEYS (supplier keys), CLOSED (senders of the
# closed-loop saturation run, 0 to skip), ROUNDS (closed-loop runs of each target, taking
# turns, summed up by their median ratio; default 1), SKIP_BUILD, BIN_DIR (binaries, default
# the release folder of CARGO_TARGET_DIR or target), OUT (folder kept for the results),
# STORE_DIR (where leadex keeps its data; default a temporary folder on the disk, e.g.
# /dev/shm to take fsync out of the figures as a diagnostic), RUST_LOG (leadex's log level,
# default info as in production), and the embedded store's settings CHECKPOINT_MS, APPLY_MS,
# LINGER_US, CACHE_MIB and IDLE_APPLY, and WORKERS (HTTP workers; default: the README's). SYNC_BASELINE=1 also runs the baseline with
# `--sync-dir` (each outcome durably written before its answer, group commit) at RATES and in the
# closed loop, in the same folder as leadex's data: the least any durable exchange pays on
# this disk.
set -euo pipefail
cd "$(dirname "$0")/.."
. load-tests/lib.sh

RATES="${RATES-500 1000 2000}"
SLOW_RATES="${SLOW_RATES-500 1000 2000}"
DURATION="${DURATION:-15}"
WARMUP="${WARMUP:-3}"
KEYS="${KEYS:-50}"
CLOSED="${CLOSED:-64}"
ROUNDS="${ROUNDS:-1}"
SKIP_BUILD="${SKIP_BUILD:-0}"
SYNC_BASELINE="${SYNC_BASELINE:-0}"
LEADEX_PORT="${LEADEX_PORT:-18080}"
FAST_BASE_PORT=19100
SLOW_BASE_PORT=19110
BASELINE_FAST_PORT=18091
BASELINE_SLOW_PORT=18092
BASELINE_SYNC_PORT=18093
PING_TIMEOUT_MS=300
POST_TIMEOUT_MS=1000
SLO_P99_MS=$((PING_TIMEOUT_MS + 50))

target_dir="${CARGO_TARGET_DIR:-target}"
bin="${BIN_DIR:-$target_dir/release}"
work="$(mktemp -d -t leadex-load-XXXXXX)"
out="${OUT:-$work/results}"
data_dir="$(mktemp -d -p "${STORE_DIR:-$work}" leadex-data-XXXXXX)"
mkdir -p "$out"
summary="$out/summary.tsv"
cpu="$out/cpu.tsv"
threads="$out/threads.tsv"
machine="$out/machine.tsv"
: >"$summary"
: >"$cpu"
printf 'label\tworkers_us\twriter_us\tapplier_us\tother_us\n' >"$threads"
printf 'label\tsteal_pct\tidle_pct\n' >"$machine"

cleanup() {
  stop_started
  rm -rf "$data_dir" "${sync_dir:-}" "$work/leadex.toml"
  # leadex logs a line per lead at info (hundreds of MB per run): keep the end only.
  if [ -f "$out/leadex.log" ]; then
    tail -n 2000 "$out/leadex.log" >"$out/leadex.log.tail" 2>/dev/null || true
    rm -f "$out/leadex.log"
  fi
  if [ -n "${OUT:-}" ]; then
    rm -rf "$work"
  fi
  echo "stopped ${#pids[@]} processes; results in $out"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

if [ "$SKIP_BUILD" != 1 ]; then
  cargo build --release --bins
fi
for b in leadex fanout-baseline; do
  [ -x "$bin/$b" ] || { echo "missing $bin/$b (build first)" >&2; exit 1; }
done

echo "machine: $(nproc) cores, $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo); $(uptime)"

# Buyer simulators: bids spread so auctions have a clear winner, every post accepted.
fast_urls=()
slow_urls=()
for i in 1 2 3 4 5; do
  port=$((FAST_BASE_PORT + i))
  start "$out/buyer-fast-$i.log" "$bin/leadex" buyer-sim --listen "127.0.0.1:$port" \
    --bid "$((5 + i * 3))-$((20 + i * 5))" --latency-ms 0
  fast_urls+=("http://127.0.0.1:$port")
  port=$((SLOW_BASE_PORT + i))
  start "$out/buyer-slow-$i.log" "$bin/leadex" buyer-sim --listen "127.0.0.1:$port" \
    --bid "$((5 + i * 3))-$((20 + i * 5))" --latency-ms 20-80
  slow_urls+=("http://127.0.0.1:$port")
done

# Supplier keys and the exchange's config: one supplier per key, limits far above the load.
keys_file="$out/keys.txt"
: >"$keys_file"
config="$work/leadex.toml"
{
  cat <<EOF
[server]
listen = "127.0.0.1:$LEADEX_PORT"
workers = ${WORKERS:-0}

[storage]
backend = "embedded"
path = "$data_dir"
checkpoint_ms = ${CHECKPOINT_MS:-1000}
apply_ms = ${APPLY_MS:-20}
cache_mib = ${CACHE_MIB:-64}
linger_us = ${LINGER_US:-1000}
idle_apply = ${IDLE_APPLY:-true}
EOF
  limit_and_seller_toml
  campaign_toml load-fast "Auto Insurance" "$PING_TIMEOUT_MS" "$POST_TIMEOUT_MS"
  campaign_toml load-slow "Home Insurance" "$PING_TIMEOUT_MS" "$POST_TIMEOUT_MS"
} >"$config"
for i in $(seq 1 "$KEYS"); do
  key="lx_load_${i}_$(od -An -N12 -tx1 /dev/urandom | tr -d ' \n')"
  echo "$key" >>"$keys_file"
  cat >>"$config" <<EOF

[[suppliers]]
id = "load-$i"
sellers = ["LOAD0001"]
api_key_sha256 = ["$(printf %s "$key" | sha256sum | cut -d' ' -f1)"]
EOF
done
# Five fast buyers for the 0 ms campaign, five slow ones for the 20-80 ms campaign. Every HTTP
# worker runs its own set of buyer actors, so a lead's pings stay on the thread that took it.
for kind in fast slow; do
  for i in 1 2 3 4 5; do
    if [ "$kind" = fast ]; then url="${fast_urls[$((i - 1))]}"; else url="${slow_urls[$((i - 1))]}"; fi
    buyer_toml "$kind-$i" "load-$kind" "$url" 8192 >>"$config"
  done
done
cp "$config" "$out/leadex.toml"

start "$out/leadex.log" "$bin/leadex" serve --config "$config"
start "$out/baseline-fast.log" "$bin/fanout-baseline" --listen "127.0.0.1:$BASELINE_FAST_PORT" \
  --buyers "$(IFS=,; echo "${fast_urls[*]}")" --ping-timeout-ms "$PING_TIMEOUT_MS" --post-timeout-ms "$POST_TIMEOUT_MS"
start "$out/baseline-slow.log" "$bin/fanout-baseline" --listen "127.0.0.1:$BASELINE_SLOW_PORT" \
  --buyers "$(IFS=,; echo "${slow_urls[*]}")" --ping-timeout-ms "$PING_TIMEOUT_MS" --post-timeout-ms "$POST_TIMEOUT_MS"
for port in $(seq $((FAST_BASE_PORT + 1)) $((FAST_BASE_PORT + 5))) \
  $(seq $((SLOW_BASE_PORT + 1)) $((SLOW_BASE_PORT + 5))) \
  "$LEADEX_PORT" "$BASELINE_FAST_PORT" "$BASELINE_SLOW_PORT"; do
  wait_port "$port"
done
leadex_pid="${pids[10]}"
baseline_fast_pid="${pids[11]}"
baseline_slow_pid="${pids[12]}"
if [ "$SYNC_BASELINE" = 1 ]; then
  sync_dir="$(mktemp -d -p "$(dirname "$data_dir")" baseline-sync-XXXXXX)"
  start "$out/baseline-sync.log" "$bin/fanout-baseline" --listen "127.0.0.1:$BASELINE_SYNC_PORT" \
    --buyers "$(IFS=,; echo "${fast_urls[*]}")" --ping-timeout-ms "$PING_TIMEOUT_MS" \
    --post-timeout-ms "$POST_TIMEOUT_MS" --sync-dir "$sync_dir"
  wait_port "$BASELINE_SYNC_PORT"
  baseline_sync_pid="${pids[13]}"
fi

ticks_per_sec="$(getconf CLK_TCK)"
# CPU time (user + system, clock ticks) a process has used so far.
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
# Context switches of all of a process's threads so far.
switches() { cat /proc/"$1"/task/*/status 2>/dev/null | awk '/ctxt_switches/ {n += $2} END {print n + 0}'; }
# The machine's CPU ticks so far (/proc/stat's first line): "total idle steal". Steal is the
# time the host gave this VM's cores to others: what a shared machine takes from every run.
# The total is user to steal; the guest fields after them are already counted in user.
machine_ticks() {
  awk '$1 == "cpu" {t = 0; for (i = 2; i <= 9; i++) t += $i; print t, $5 + $6, $9; exit}' /proc/stat
}

# One loadgen run; $1 label, $2 target port, $3 target pid, $4 category, then loadgen flags.
# Also records the target's CPU time per lead answered (`cpu.tsv`), a figure the other
# engineers' load on a shared machine disturbs far less than latency.
drive() {
  local label="$1" port="$2" pid="$3" category="$4" before after sent switched parts_before parts
  local machine_before host
  shift 4
  machine_before="$(machine_ticks)"
  before="$(cpu_ticks "$pid")"
  parts_before="$(thread_ticks "$pid")"
  switched="$(switches "$pid")"
  "$bin/leadex" loadgen --target "http://127.0.0.1:$port" --keys-file "$keys_file" \
    --seller LOAD0001 --category "$category" --duration-secs "$DURATION" \
    --warmup-secs "$WARMUP" --timeout-ms 5000 --slo-p99-ms "$SLO_P99_MS" \
    --slo-max-pending-pct 1 \
    --label "$label" --summary-file "$summary" "$@"
  after="$(cpu_ticks "$pid")"
  switched=$(($(switches "$pid") - switched))
  host="$(awk -v b="$machine_before" -v a="$(machine_ticks)" -v l="$label" 'BEGIN {
      split(b, x, " "); split(a, y, " "); t = y[1] - x[1]
      if (t <= 0) t = 1
      printf "%s\t%.1f\t%.1f\n", l, 100 * (y[3] - x[3]) / t, 100 * (y[2] - x[2]) / t
    }')"
  echo "$host" >>"$machine"
  # Warm-up leads cost CPU too, so divide by everything the driver sent.
  sent="$(awk -F'\t' -v l="$label" '$1 == l {a = $17} END {print a + 0}' "$summary")"
  if [ "$pid" = "$leadex_pid" ]; then
    # Where leadex's CPU went, per lead: its HTTP workers (auctions run there), the store's
    # writer (log append and sync) and applier (redb), and every other thread.
    parts="$(awk -v b="$parts_before" -v a="$(thread_ticks "$pid")" -v hz="$ticks_per_sec" -v sent="$sent" -v l="$label" 'BEGIN {
        split(b, x, " "); split(a, y, " ")
        printf "%s", l
        for (i = 1; i <= 4; i++) printf "\t%.0f", (sent > 0 ? (y[i] - x[i]) / hz * 1e6 / sent : 0)
        printf "\n"
      }')"
    echo "$parts" >>"$threads"
    echo "$parts" | awk -F'\t' '{printf "  leadex threads: workers %s, store writer %s, store applier %s, other %s us per lead\n", $2, $3, $4, $5}'
  fi
  awk -v b="$before" -v a="$after" -v hz="$ticks_per_sec" -v sent="$sent" -v l="$label" 'BEGIN {
      us = sent > 0 ? (a - b) / hz * 1e6 / sent : 0
      printf "%s\t%.0f\n", l, us
    }' >>"$cpu"
  echo "  target CPU: $(tail -n1 "$cpu" | cut -f2) us per lead, $(awk -v s="$switched" -v n="$sent" 'BEGIN {printf "%.1f", (n > 0 ? s / n : 0)}') context switches per lead   machine: steal $(echo "$host" | cut -f2) %, idle $(echo "$host" | cut -f3) %   load: $(cut -d' ' -f1-3 /proc/loadavg)   leadex RSS: $(awk '/VmRSS/ {print $2, $3}' "/proc/$leadex_pid/status")"
}

echo
echo "### buyers answering in 0 ms (overhead = answer time)"
for rate in $RATES; do
  drive "leadex/0ms/$rate" "$LEADEX_PORT" "$leadex_pid" "Auto Insurance" --rate "$rate"
  drive "baseline/0ms/$rate" "$BASELINE_FAST_PORT" "$baseline_fast_pid" "Auto Insurance" --rate "$rate"
  if [ "$SYNC_BASELINE" = 1 ]; then
    drive "baseline+sync/0ms/$rate" "$BASELINE_SYNC_PORT" "$baseline_sync_pid" "Auto Insurance" --rate "$rate"
  fi
done
# One closed-loop run of each target; $1 the label's suffix, $2 1 to start with the baselines.
closed_round() {
  local target
  local -A port_of=([leadex]="$LEADEX_PORT" [baseline]="$BASELINE_FAST_PORT" [baseline+sync]="$BASELINE_SYNC_PORT")
  local -A pid_of=([leadex]="$leadex_pid" [baseline]="$baseline_fast_pid" [baseline+sync]="${baseline_sync_pid:-}")
  local targets=(leadex baseline)
  if [ "$SYNC_BASELINE" = 1 ]; then targets+=(baseline+sync); fi
  if [ "$2" = 1 ]; then targets=("${targets[@]:1}" leadex); fi
  for target in "${targets[@]}"; do
    drive "$target/0ms/closed$CLOSED$1" "${port_of[$target]}" "${pid_of[$target]}" "Auto Insurance" --rate 0 --concurrency "$CLOSED"
  done
}
if [ "$CLOSED" -gt 0 ]; then
  echo
  echo "### saturation: closed loop, $CLOSED senders, buyers answering in 0 ms"
  if [ "$ROUNDS" -le 1 ]; then
    closed_round "" 0
  else
    # Rounds alternate which target goes first, so a machine growing busier or quieter during
    # the series weighs on both alike; the comparison ends with the median ratio.
    for round in $(seq 1 "$ROUNDS"); do
      echo "## round $round of $ROUNDS"
      closed_round "-r$round" $(((round + 1) % 2))
    done
  fi
fi

echo
echo "### buyers answering in 20-80 ms, ${PING_TIMEOUT_MS} ms deadline"
for rate in $SLOW_RATES; do
  drive "leadex/20-80ms/$rate" "$LEADEX_PORT" "$leadex_pid" "Home Insurance" --rate "$rate"
  drive "baseline/20-80ms/$rate" "$BASELINE_SLOW_PORT" "$baseline_slow_pid" "Home Insurance" --rate "$rate"
done

# leadex against one of the baselines ($1: its label), rate by rate.
compare() {
awk -F'\t' -v ref="$1" '
  FNR == NR { cpu[$1] = $2; next }
  FNR == 1 { next }
  {
    split($1, part, "/")
    key = part[2] "/" part[3]
    if (!(key in seen)) { seen[key] = 1; order[++n] = key }
    ach[part[1], key] = $4; p50[part[1], key] = $9; p99[part[1], key] = $11
  }
  END {
    printf "%-18s %10s %10s %6s %9s %9s %9s %9s %8s %8s %6s\n", "buyers/rate", "leadex/s", "base/s", "ratio", "p50 ms", "base p50", "p99 ms", "base p99", "us/lead", "base us", "ratio"
    for (i = 1; i <= n; i++) {
      k = order[i]
      if (!(("leadex", k) in ach) || !((ref, k) in ach)) continue
      r = ach[ref, k] > 0 ? ach["leadex", k] / ach[ref, k] : 0
      cl = cpu["leadex/" k]; cb = cpu[ref "/" k]
      cr = cb > 0 ? cl / cb : 0
      printf "%-18s %10.1f %10.1f %6.2f %9.2f %9.2f %9.2f %9.2f %8d %8d %6.2f\n", k, ach["leadex", k], ach[ref, k], r, p50["leadex", k], p50[ref, k], p99["leadex", k], p99[ref, k], cl, cb, cr
    }
  }' "$cpu" "$summary"
}

# The median and range of the closed loop's throughput ratio over its rounds (ROUNDS > 1).
rounds_ratio() {
  awk -F'\t' -v ref="$1" -v closed="closed$CLOSED-r" '
    FNR == 1 { next }
    {
      split($1, part, "/")
      if (index(part[3], closed) != 1) next
      ach[part[1], part[3]] = $4; rounds[part[3]] = 1
    }
    END {
      n = 0
      for (r in rounds) if (ach[ref, r] > 0 && ("leadex", r) in ach) ratio[++n] = ach["leadex", r] / ach[ref, r]
      if (n == 0) exit
      for (i = 2; i <= n; i++) for (j = i; j > 1 && ratio[j - 1] > ratio[j]; j--) { t = ratio[j]; ratio[j] = ratio[j - 1]; ratio[j - 1] = t }
      median = n % 2 ? ratio[(n + 1) / 2] : (ratio[n / 2] + ratio[n / 2 + 1]) / 2
      at = 0
      for (i = 1; i <= n; i++) if (ratio[i] >= 0.8) at++
      printf "closed loop over %d rounds: median ratio %.3f (%.2f-%.2f), %d of %d at 0.8 or more\n", n, median, ratio[1], ratio[n], at, n
    }' "$summary"
}

echo
echo "### leadex / baseline (same run, same buyers)"
compare baseline
rounds_ratio baseline
if [ "$SYNC_BASELINE" = 1 ]; then
  echo
  echo "### leadex / baseline+sync (the baseline with each outcome durably written before its answer)"
  compare baseline+sync
  rounds_ratio baseline+sync
fi
