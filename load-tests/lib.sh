# Shared by the load-test scripts (sourced, not run): the processes a script starts, waiting
# for a port, the parts of leadex's config every script writes, and leadex's CPU by thread.

pids=()

# Runs a command in the background with its output in $1, and remembers it for stop_started.
start() {
  local log="$1"
  shift
  "$@" >"$log" 2>&1 &
  pids+=("$!")
}

# Stops everything started (in pids) and waits for it.
stop_started() {
  local pid
  for pid in "${pids[@]}"; do
    kill "$pid" 2>/dev/null || true
  done
  for pid in "${pids[@]}"; do
    wait "$pid" 2>/dev/null || true
  done
}

# Waits until something listens on 127.0.0.1:$1, at most $2 tenths of a second (default 100).
wait_port() {
  local i
  for i in $(seq 1 "${2:-100}"); do
    if (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; then
      return 0
    fi
    sleep 0.1
  done
  echo "nothing listens on 127.0.0.1:$1" >&2
  return 1
}

# The rate limit far above any load and the one seller every load script sells for.
limit_and_seller_toml() {
  cat <<EOF

[rate_limit]
requests = 100000000
window_secs = 60

[[sellers]]
code = "LOAD0001"
slug = "load"
EOF
}

# A campaign of seller LOAD0001: id, category, ping and post timeouts (ms).
campaign_toml() {
  cat <<EOF

[[campaigns]]
id = "$1"
seller = "LOAD0001"
category = "$2"
ping_timeout_ms = $3
post_timeout_ms = $4
floor_price = 1.0
EOF
}

# A buyer: id, campaign, base URL (its /ping and /post), most requests in flight.
buyer_toml() {
  cat <<EOF

[[buyers]]
id = "$1"
campaigns = ["$2"]
ping_url = "$3/ping"
post_url = "$3/post"
max_in_flight = $4
EOF
}

# CPU ticks of a process's threads so far, summed by part: "workers writer applier other"
# (leadex's HTTP workers, its store's writer and applier, every other thread).
# The name (comm) can hold spaces, so fields are counted from the `)` that closes it.
thread_ticks() {
  cat /proc/"$1"/task/*/stat 2>/dev/null | awk '{
      close_at = 0
      for (i = length($0); i > 0; i--) if (substr($0, i, 1) == ")") { close_at = i; break }
      comm = substr($0, index($0, "(") + 1, close_at - index($0, "(") - 1)
      split(substr($0, close_at + 2), f, " ")
      t = f[12] + f[13]
      if (comm ~ /^actix-rt/) w += t
      else if (comm == "leadex-store-wr") s += t
      else if (comm == "leadex-store-ap") a += t
      else o += t
    } END {print w + 0, s + 0, a + 0, o + 0}'
}
