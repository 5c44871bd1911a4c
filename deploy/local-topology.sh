#!/usr/bin/env bash
# The multi-replica topology as plain processes on 127.0.0.1: Redis (started if none answers),
# two gateway replicas sharing one data directory and one Redis, the training sidecar, and nginx
# balancing the two replicas. gateway/tests/topology.rs drives it; it also works by hand.
#
#   deploy/local-topology.sh start DIR   # starts everything, writes DIR/topology.env, returns
#   deploy/local-topology.sh stop DIR    # stops what start started
#   deploy/local-topology.sh start-replica DIR a|b   # (re)starts one replica on its port
#
# Settings (environment): SWITCHYARD_BIN and FINETUNE_BIN (default: the release binaries under
# CARGO_TARGET_DIR or target/), MODEL (default: models/SmolLM2-135M-Instruct.Q4_1.gguf),
# REDIS_URL (default: redis://127.0.0.1:6379), ADMIN_TOKEN (default: a random one),
# ADAPTER (the adapter the sidecar trains; default: support-bot), IMPORT_ROOT (optional),
# EXTRA_GATEWAY_ARGS (appended to both replicas' command lines).
set -euo pipefail

cmd="${1:?usage: $0 start|stop DIR}"
dir="${2:?usage: $0 start|stop DIR}"
mkdir -p "$dir"
dir="$(cd "$dir" && pwd)"
root="$(cd "$(dirname "$0")/.." && pwd)"

if [ "$cmd" = stop ]; then
  for pidfile in "$dir"/*.pid; do
    [ -e "$pidfile" ] || continue
    kill "$(cat "$pidfile")" 2>/dev/null || true
    rm -f "$pidfile"
  done
  exit 0
fi
case "$cmd" in start | start-replica) ;; *) echo "usage: $0 start|stop|start-replica DIR" >&2; exit 2 ;; esac

target="${CARGO_TARGET_DIR:-$root/target}"
switchyard="${SWITCHYARD_BIN:-$target/release/switchyard}"
finetune="${FINETUNE_BIN:-$target/release/finetune}"
model="${MODEL:-$root/models/SmolLM2-135M-Instruct.Q4_1.gguf}"
redis_url="${REDIS_URL:-redis://127.0.0.1:6379}"
token="${ADMIN_TOKEN:-$(head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \n')}"
adapter="${ADAPTER:-support-bot}"
for bin in "$switchyard" "$finetune"; do
  [ -x "$bin" ] || { echo "error: $bin is missing: build with cargo build --release" >&2; exit 1; }
done
command -v nginx >/dev/null || { echo "error: nginx is not installed (apt-get install nginx)" >&2; exit 1; }

free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
wait_ready() { # url, what, log
  for _ in $(seq 600); do
    curl -fsS -o /dev/null "$1" 2>/dev/null && return 0
    sleep 0.1
  done
  echo "error: $2 did not become ready; its log:" >&2
  tail -20 "$3" >&2
  exit 1
}

# Redis: the one configured, started here when nothing answers on its port.
redis_port="${redis_url##*:}"
redis_port="${redis_port%%/*}"
if ! redis-cli -p "$redis_port" ping >/dev/null 2>&1; then
  redis-server --port "$redis_port" --bind 127.0.0.1 --save "" --appendonly no --daemonize no \
    > "$dir/redis.log" 2>&1 &
  echo $! > "$dir/redis.pid"
  for _ in $(seq 50); do redis-cli -p "$redis_port" ping >/dev/null 2>&1 && break; sleep 0.1; done
fi

data="$dir/data"
mkdir -p "$data"
start_replica() { # name port
  local imports=()
  [ -n "${IMPORT_ROOT:-}" ] && imports=(--import-root "$IMPORT_ROOT")
  # shellcheck disable=SC2086
  "$switchyard" serve --host 127.0.0.1 --port "$2" --model "$model" --data-dir "$data" \
    --redis-url "$redis_url" --admin-token "$token" --auth off "${imports[@]}" ${EXTRA_GATEWAY_ARGS:-} \
    > "$dir/gateway-$1.out" 2>> "$dir/gateway-$1.log" &
  echo $! > "$dir/gateway-$1.pid"
  wait_ready "http://127.0.0.1:$2/ready" "gateway $1" "$dir/gateway-$1.log"
}

if [ "$cmd" = start-replica ]; then
  replica="${3:?which replica: a or b}"
  # shellcheck disable=SC1091
  . "$dir/topology.env"
  token="$ADMIN_TOKEN"
  port=$(eval "echo \${GATEWAY_${replica^^}_URL##*:}")
  start_replica "$replica" "$port"
  echo "gateway $replica ready on $port (pid $(cat "$dir/gateway-$replica.pid"))"
  exit 0
fi

port_a=$(free_port)
port_b=$(free_port)
start_replica a "$port_a"
start_replica b "$port_b"

nginx_port=$(free_port)
mkdir -p "$dir/nginx"
cat > "$dir/nginx/nginx.conf" <<CONF
worker_processes 1;
pid $dir/nginx/nginx.pid;
error_log $dir/nginx/error.log warn;
events { worker_connections 1024; }
http {
    access_log $dir/nginx/access.log;
    client_body_temp_path $dir/nginx/body;
    proxy_temp_path $dir/nginx/proxy;
    fastcgi_temp_path $dir/nginx/fastcgi;
    uwsgi_temp_path $dir/nginx/uwsgi;
    scgi_temp_path $dir/nginx/scgi;
    upstream switchyard {
        # max_fails=0: never mark a replica down for a while; a refused connection costs a
        # retry on the other, and a replica back from a restart takes traffic at once.
        server 127.0.0.1:$port_a max_fails=0;
        server 127.0.0.1:$port_b max_fails=0;
        keepalive 32;
    }
    server {
        listen 127.0.0.1:$nginx_port;
        client_max_body_size 512m;
        location / {
            proxy_pass http://switchyard;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
            proxy_read_timeout 600s;
            proxy_connect_timeout 1s;
            # A replica that is draining or gone: try the other one, POSTs included (a completion
            # that a draining replica refused or never read is safe to send again).
            proxy_next_upstream error timeout http_502 http_503 non_idempotent;
        }
    }
}
CONF
nginx -p "$dir/nginx" -c "$dir/nginx/nginx.conf" -g 'daemon off;' > "$dir/nginx/stdout.log" 2>&1 &
echo $! > "$dir/nginx.pid"
wait_ready "http://127.0.0.1:$nginx_port/health" nginx "$dir/nginx/error.log"

"$finetune" watch --data-dir "$data" --base "$model" --gateway "http://127.0.0.1:$nginx_port" \
  --admin-token "$token" --redis-url "$redis_url" --adapter "$adapter" --poll-seconds 1 \
  > "$dir/sidecar.log" 2>&1 &
echo $! > "$dir/sidecar.pid"

cat > "$dir/topology.env" <<ENV
NGINX_URL=http://127.0.0.1:$nginx_port
GATEWAY_A_URL=http://127.0.0.1:$port_a
GATEWAY_B_URL=http://127.0.0.1:$port_b
GATEWAY_A_PID=$(cat "$dir/gateway-a.pid")
GATEWAY_B_PID=$(cat "$dir/gateway-b.pid")
SIDECAR_PID=$(cat "$dir/sidecar.pid")
ADMIN_TOKEN=$token
DATA_DIR=$data
REDIS_URL=$redis_url
ENV
echo "topology ready: nginx on http://127.0.0.1:$nginx_port, replicas on $port_a and $port_b"
