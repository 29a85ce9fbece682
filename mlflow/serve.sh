#!/usr/bin/env bash
# Start an MLflow tracking server for the team and wait until its /health endpoint answers (see mlflow/README.md).
#   bash mlflow/serve.sh [options] [-- more `mlflow server` options]
#   --host HOST                 interface to bind: 127.0.0.1 (default, this machine only) or 0.0.0.0 (the network)
#   --port PORT                 5000
#   --backend-store-uri URI     runs and registry: sqlite:///mlruns/mlflow.db (default, the store `semi-llie train`
#                               writes when MLFLOW_TRACKING_URI is unset) or postgresql://USER:PASS@HOST:5432/DB
#   --artifacts-destination URI where the server stores uploaded artifacts: mlruns/artifacts (default), a shared
#                               folder or s3://bucket/path; clients upload through the server, no shared disk needed
#   --allowed-hosts LIST        Host headers to accept when reached by name (MLflow's default: localhost, private IPs)
#   --workers N                 server worker processes (MLflow's default: 4)
#   --health-timeout SECONDS    how long to wait for /health before giving up (120)
#   --detach                    return once healthy and leave the server running in the background
#   --stop                      stop the server that --detach started on --port
#   --log-dir DIR               where --detach keeps server-PORT.log and server-PORT.pid (mlruns)
# Exits 0 once /health answers (with --detach) or when the server is stopped; non-zero if the port is taken, the
# server dies, or /health does not answer in time. Relative paths are relative to the project root.
set -euo pipefail
cd "$(dirname "$0")/.."
[[ -x .venv/bin/mlflow ]] && PATH="$PWD/.venv/bin:$PATH"

host=127.0.0.1
port=5000
backend=sqlite:///mlruns/mlflow.db
artifacts=mlruns/artifacts
health_timeout=120
detach=0
stop=0
log_dir=mlruns
extra=()
while (( $# )); do
  case "$1" in
    --host) host=${2:?}; shift ;;
    --port) port=${2:?}; shift ;;
    --backend-store-uri) backend=${2:?}; shift ;;
    --artifacts-destination) artifacts=${2:?}; shift ;;
    --allowed-hosts|--workers) extra+=("$1" "${2:?}"); shift ;;
    --health-timeout) health_timeout=${2:?}; shift ;;
    --detach) detach=1 ;;
    --stop) stop=1 ;;
    --log-dir) log_dir=${2:?}; shift ;;
    --) shift; extra+=("$@"); break ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | grep -v '^set ' | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "mlflow/serve.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done

# Clients always reach a server bound to every interface through loopback on this machine.
client_host=$host
[[ "$host" == 0.0.0.0 || "$host" == :: ]] && client_host=127.0.0.1
url="http://$client_host:$port"
pid_file="$log_dir/server-$port.pid"
log_file="$log_dir/server-$port.log"

healthy() {
  python -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=2).read()' "$url/health" \
    2>/dev/null
}

stop_server() {  # the whole process group: `mlflow server` runs its web workers as children
  kill -TERM -- "-$1" 2>/dev/null || return 0
  for _ in $(seq 50); do
    kill -0 "$1" 2>/dev/null || return 0
    sleep 0.2
  done
  kill -KILL -- "-$1" 2>/dev/null || true
}

if (( stop )); then
  if [[ ! -f "$pid_file" ]]; then
    echo "mlflow/serve.sh: no $pid_file; was a server started with --detach --port $port (--log-dir)?" >&2
    exit 1
  fi
  stop_server "$(cat "$pid_file")"
  rm -f "$pid_file"
  echo "stopped the MLflow server on port $port"
  exit 0
fi

if healthy; then
  echo "mlflow/serve.sh: something already answers at $url; choose another --port" >&2
  exit 1
fi
case "$backend" in
  postgresql*)
    python -c 'import psycopg2' 2>/dev/null || python -c 'import psycopg' 2>/dev/null || {
      echo "mlflow/serve.sh: a PostgreSQL backend needs a driver: pip install psycopg2-binary" >&2
      exit 2
    } ;;
  sqlite:///*)
    db=${backend#sqlite:///}
    mkdir -p "$(dirname "$db")" ;;
esac
[[ "$artifacts" == *://* ]] || mkdir -p "$artifacts"
mkdir -p "$log_dir"

server=(mlflow server --host "$host" --port "$port" --backend-store-uri "$backend"
        --serve-artifacts --artifacts-destination "$artifacts" "${extra[@]}")
echo "starting: ${server[*]}"
# setsid: the server gets its own process group, so stopping it also stops its workers.
if (( detach )); then
  setsid "${server[@]}" >>"$log_file" 2>&1 </dev/null &
else
  setsid "${server[@]}" &
fi
server_pid=$!

deadline=$(( SECONDS + health_timeout ))
until healthy; do
  if ! kill -0 "$server_pid" 2>/dev/null; then
    echo "mlflow/serve.sh: the server exited before answering at $url/health" >&2
    (( detach )) && tail -n 20 "$log_file" >&2
    exit 1
  fi
  if (( SECONDS >= deadline )); then
    echo "mlflow/serve.sh: no answer at $url/health after $health_timeout s; stopping the server" >&2
    stop_server "$server_pid"
    exit 1
  fi
  sleep 0.5
done
echo "MLflow tracking server ready: export MLFLOW_TRACKING_URI=$url"

if (( detach )); then
  echo "$server_pid" >"$pid_file"
  echo "running in the background (pid $server_pid, log $log_file)"
  echo "stop it with: bash mlflow/serve.sh --stop --port $port --log-dir $log_dir"
  exit 0
fi
trap 'stop_server "$server_pid"' INT TERM
while kill -0 "$server_pid" 2>/dev/null; do
  wait "$server_pid" || true
done
