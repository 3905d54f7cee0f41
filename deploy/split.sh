#!/usr/bin/env bash
# Runs colony split into one process per module (checkout twice) behind nginx, on
# one machine, against PostgreSQL and NATS JetStream.
#
#   deploy/split.sh start         # prints the proxy's address when everything is ready
#   deploy/split.sh stop
#   deploy/split.sh kill NAME     # SIGKILL one process (catalog, cart, checkout-1, …)
#   deploy/split.sh revive NAME   # start it again, as before
#
# Settings (environment): COLONY_BIN (default target/release/colony),
# DATABASE_URL (postgres://…, required), NATS_URL (nats://127.0.0.1:4222),
# BASE_PORT (8100: proxy on it, modules on the next six), RUN_DIR (./run/split),
# JWT_SECRET (unset: colony's development secret, so `colony token` works as is),
# NATS_PREFIX (colony).
set -euo pipefail

COLONY_BIN=${COLONY_BIN:-target/release/colony}
NATS_URL=${NATS_URL:-nats://127.0.0.1:4222}
BASE_PORT=${BASE_PORT:-8100}
RUN_DIR=${RUN_DIR:-run/split}
NATS_PREFIX=${NATS_PREFIX:-colony}
here=$(cd "$(dirname "$0")" && pwd)

# name  modules   port offset
PROCESSES=(
  "catalog catalog 1"
  "cart cart 2"
  "checkout-1 checkout 3"
  "checkout-2 checkout 4"
  "notification notification 5"
  "delivery delivery 6"
)

launch() {
  local name=$1 modules=$2 offset=$3 run_dir=$4
  local port=$((BASE_PORT + offset))
  local secret=()
  if [ -n "${JWT_SECRET:-}" ]; then secret=("COLONY__AUTH__JWT_SECRET=$JWT_SECRET"); fi
  env COLONY__HTTP__PORT="$port" \
    COLONY__DATABASE__URL="$DATABASE_URL" \
    COLONY__BUS__TRANSPORT=nats \
    COLONY__BUS__NATS_URL="$NATS_URL" \
    COLONY__BUS__NATS_PREFIX="$NATS_PREFIX" \
    COLONY__BUS__POLL_INTERVAL_MS=200 \
    COLONY__REMOTE__CART__URL="http://127.0.0.1:$((BASE_PORT + 2))" \
    COLONY__LOG__FILTER="${LOG_FILTER:-warn}" \
    "${secret[@]}" \
    nohup "$COLONY_BIN" serve --modules "$modules" >>"$run_dir/$name.out" 2>>"$run_dir/$name.log" &
  echo $! >"$run_dir/$name.pid"
}

entry_of() {
  for entry in "${PROCESSES[@]}"; do
    read -r name _ _ <<<"$entry"
    if [ "$name" = "$1" ]; then echo "$entry"; return 0; fi
  done
  echo "no process named $1" >&2
  return 1
}

start() {
  : "${DATABASE_URL:?set DATABASE_URL to a PostgreSQL database (postgres://…)}"
  mkdir -p "$RUN_DIR"
  local run_dir
  run_dir=$(cd "$RUN_DIR" && pwd)
  for entry in "${PROCESSES[@]}"; do
    read -r name modules offset <<<"$entry"
    launch "$name" "$modules" "$offset" "$run_dir"
  done
  sed -e "s|@RUN_DIR@|$run_dir|g" \
      -e "s|@PORT_PROXY@|$BASE_PORT|g" \
      -e "s|@PORT_CATALOG@|$((BASE_PORT + 1))|g" \
      -e "s|@PORT_CART@|$((BASE_PORT + 2))|g" \
      -e "s|@PORT_CHECKOUT_1@|$((BASE_PORT + 3))|g" \
      -e "s|@PORT_CHECKOUT_2@|$((BASE_PORT + 4))|g" \
      -e "s|@PORT_NOTIFICATION@|$((BASE_PORT + 5))|g" \
      -e "s|@PORT_DELIVERY@|$((BASE_PORT + 6))|g" \
      "$here/nginx.conf.template" >"$run_dir/nginx.conf"
  for entry in "${PROCESSES[@]}"; do
    read -r name _ offset <<<"$entry"
    wait_ready "$((BASE_PORT + offset))" "$name" "$run_dir"
  done
  nginx -c "$run_dir/nginx.conf" -p "$run_dir"
  wait_ready "$BASE_PORT" nginx "$run_dir"
  echo "colony split: http://127.0.0.1:$BASE_PORT (logs and pids in $run_dir)"
}

wait_ready() {
  local port=$1 name=$2 run_dir=$3
  for _ in $(seq 1 150); do
    if curl -fsS "http://127.0.0.1:$port/health/ready" >/dev/null 2>&1; then
      return 0
    fi
    sleep 0.2
  done
  echo "$name did not become ready on port $port; see $run_dir/$name.log" >&2
  tail -5 "$run_dir/$name.log" >&2 || true
  return 1
}

stop() {
  local run_dir=$RUN_DIR
  [ -d "$run_dir" ] || return 0
  if [ -f "$run_dir/nginx.pid" ]; then
    nginx -c "$run_dir/nginx.conf" -p "$run_dir" -s quit 2>/dev/null || kill "$(cat "$run_dir/nginx.pid")" 2>/dev/null || true
  fi
  for entry in "${PROCESSES[@]}"; do
    read -r name _ _ <<<"$entry"
    if [ -f "$run_dir/$name.pid" ]; then
      kill -TERM "$(cat "$run_dir/$name.pid")" 2>/dev/null || true
      rm -f "$run_dir/$name.pid"
    fi
  done
}

kill_one() {
  local entry pid_file
  entry=$(entry_of "$1")
  pid_file="$RUN_DIR/$1.pid"
  if [ -f "$pid_file" ]; then
    kill -KILL "$(cat "$pid_file")" 2>/dev/null || true
    rm -f "$pid_file"
  fi
}

revive() {
  : "${DATABASE_URL:?set DATABASE_URL to a PostgreSQL database (postgres://…)}"
  local entry name modules offset run_dir
  entry=$(entry_of "$1")
  read -r name modules offset <<<"$entry"
  run_dir=$(cd "$RUN_DIR" && pwd)
  launch "$name" "$modules" "$offset" "$run_dir"
  wait_ready "$((BASE_PORT + offset))" "$name" "$run_dir"
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  kill) kill_one "${2:?name a process}" ;;
  revive) revive "${2:?name a process}" ;;
  *) echo "usage: $0 start|stop|kill NAME|revive NAME" >&2; exit 2 ;;
esac
