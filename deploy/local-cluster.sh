#!/usr/bin/env bash
# Starts (or stops) a local Flotilla cluster on this machine: 3 voter nodes on 127.0.0.1
# (gRPC ports 7610-7612, HTTP 7620-7622, no local worker) and 2 worker-only nodes, each with its
# own data directory under $FLOTILLA_CLUSTER_DIRECTORY (default ~/.cache/flotilla/local-cluster).
#
#   deploy/local-cluster.sh start    # builds if needed, starts 5 processes, waits for a leader
#   deploy/local-cluster.sh status   # `flotilla cluster status` on node 1
#   deploy/local-cluster.sh stop     # SIGTERM to every process, waits for them to exit
#
# TLS is on: `start` makes a development CA and node/worker certificates in $directory/tls
# (`flotilla cert`) once. Client commands then take:
#   --ca-file $directory/tls/ca.pem --address 127.0.0.1:7610,127.0.0.1:7611,127.0.0.1:7612
set -euo pipefail
cd "$(dirname "$0")/.."
. deploy/env.sh
directory="${FLOTILLA_CLUSTER_DIRECTORY:-$HOME/.cache/flotilla/local-cluster}"
members="1=127.0.0.1:7610,2=127.0.0.1:7611,3=127.0.0.1:7612"
addresses="127.0.0.1:7610,127.0.0.1:7611,127.0.0.1:7612"
tls="$directory/tls"
export FLOTILLA_CA_FILE="$tls/ca.pem"

binary() {
  flotilla_build_environment
  if [ ! -x "$CARGO_TARGET_DIR/debug/flotilla" ] || [ -n "$(find node worker raft scheduler proto address -newer "$CARGO_TARGET_DIR/debug/flotilla" -name '*.rs' -print -quit)" ]; then
    flotilla_install_dependencies
    cargo build --locked --bin flotilla >&2
  fi
  echo "$CARGO_TARGET_DIR/debug/flotilla"
}

certificates() {
  local flotilla=$1
  local signing=(--ca-file "$tls/ca.pem" --ca-key-file "$tls/ca-key.pem" --directory "$tls")
  [ -f "$tls/ca.pem" ] || "$flotilla" cert ca --directory "$tls" >/dev/null
  for id in 1 2 3; do
    [ -f "$tls/node-$id.pem" ] || "$flotilla" cert node --node-id "$id" --host 127.0.0.1,localhost "${signing[@]}" >/dev/null
  done
  for worker in 1 2; do
    [ -f "$tls/worker-worker-$worker.pem" ] || "$flotilla" cert worker --worker-id "worker-$worker" "${signing[@]}" >/dev/null
  done
}

start() {
  local flotilla
  flotilla=$(binary)
  mkdir -p "$directory"
  # One bootstrap admin token for the three nodes (whichever leads first proposes it).
  local token_file="$directory/bootstrap-token"
  if [ ! -f "$token_file" ]; then
    (umask 077 && printf 'flotilla_%s_%s\n' "$(od -An -N8 -tx1 /dev/urandom | tr -d ' \n')" \
      "$(od -An -N32 -tx1 /dev/urandom | tr -d ' \n')" >"$token_file")
  fi
  export FLOTILLA_TOKEN_FILE="$token_file"
  certificates "$flotilla"
  for id in 1 2 3; do
    if [ -f "$directory/node-$id.pid" ] && kill -0 "$(cat "$directory/node-$id.pid")" 2>/dev/null; then
      echo "node $id already running" >&2
      continue
    fi
    "$flotilla" server --node-id "$id" --data-directory "$directory/node-$id" \
      --listen-address "127.0.0.1:761$((id - 1))" --http-listen-address "127.0.0.1:762$((id - 1))" \
      --initial-members "$members" --no-worker --bootstrap-token-file "$token_file" \
      --certificate-file "$tls/node-$id.pem" --key-file "$tls/node-$id-key.pem" >"$directory/node-$id.log" 2>&1 &
    echo $! >"$directory/node-$id.pid"
  done
  for _ in $(seq 1 100); do
    if "$flotilla" --address "$addresses" cluster status 2>/dev/null | grep -q "leader [0-9]"; then
      "$flotilla" --address "$addresses" cluster status --from-leader
  for worker in 1 2; do
    if [ -f "$directory/worker-$worker.pid" ] && kill -0 "$(cat "$directory/worker-$worker.pid")" 2>/dev/null; then
      echo "worker $worker already running" >&2
      continue
    fi
    if [ ! -f "$directory/worker-$worker.token" ]; then
      (umask 077 && "$flotilla" --address "$addresses" token create --name "worker-$worker" \
        --role worker --worker-id "worker-$worker" >"$directory/worker-$worker.token")
    fi
    "$flotilla" worker --worker-id "worker-$worker" --endpoints "$addresses" \
      --data-directory "$directory/worker-$worker" --token-file "$directory/worker-$worker.token" \
      --certificate-file "$tls/worker-worker-$worker.pem" --key-file "$tls/worker-worker-$worker-key.pem" \
      >"$directory/worker-$worker.log" 2>&1 &
    echo $! >"$directory/worker-$worker.pid"
  done
      echo "cluster up; logs in $directory; admin token in $token_file (FLOTILLA_TOKEN_FILE)" >&2
      return 0
    fi
    sleep 0.2
  done
  echo "no leader after 20 s; see $directory/node-*.log" >&2
  return 1
}

stop() {
  local pids=()
  for file in "$directory"/*.pid; do
    [ -f "$file" ] || continue
    pid=$(cat "$file")
    if kill -0 "$pid" 2>/dev/null; then
      kill -TERM "$pid"
      pids+=("$pid")
    fi
    rm -f "$file"
  done
  for pid in "${pids[@]}"; do
    for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null || true
  done
  echo "stopped ${#pids[@]} processes" >&2
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  status) FLOTILLA_TOKEN_FILE="$directory/bootstrap-token" "$(binary)" --address "$addresses" cluster status --from-leader ;;
  *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
