#!/usr/bin/env bash
# Makes sure the services the tests talk to are running on 127.0.0.1 and exports the TEST_*
# variables that point the tests at them. Source it: `. scripts/services.sh`.
# Idempotent: a running service is left alone; a stopped one is started with the command the
# project's machines use. A service that cannot be started is not exported: its tests then
# print a skip line, except under CI=true, where they fail. Nothing here leaves this machine.

_port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

_wait_port() { # name port seconds
  local i
  for ((i = 0; i < $3 * 10; i++)); do
    _port_open "$2" && return 0
    sleep 0.1
  done
  echo "services: $1 did not come up on 127.0.0.1:$2 within $3 s; its tests will be skipped" >&2
  return 1
}

_ensure() { # name port seconds start-command...
  local name=$1 port=$2 secs=$3
  shift 3
  if _port_open "$port"; then
    echo "services: $name is up on 127.0.0.1:$port"
    return 0
  fi
  if ! command -v "$1" >/dev/null 2>&1; then
    echo "services: $name is not installed ($1 not found); its tests will be skipped" >&2
    return 1
  fi
  echo "services: starting $name"
  "$@" >/dev/null 2>&1 || true
  _wait_port "$name" "$port" "$secs"
}

ensure_postgres() {
  if _ensure postgresql 5432 30 pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql 2>/dev/null | head -n1)" main start; then
    export TEST_DATABASE_URL="${TEST_DATABASE_URL:-postgres://postgres@127.0.0.1:5432/postgres}"
  fi
  return 0
}

ensure_redis() {
  if _ensure redis 6379 15 redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no; then
    export TEST_REDIS_URL="${TEST_REDIS_URL:-redis://127.0.0.1:6379}"
  fi
  return 0
}

ensure_rabbitmq() {
  if _ensure rabbitmq 5672 90 rabbitmq-server -detached; then
    export TEST_AMQP_URL="${TEST_AMQP_URL:-amqp://guest:guest@127.0.0.1:5672/%2f}"
  fi
  return 0
}

# Peers from PyPI live in one virtualenv outside the clone, reused across runs.
PEERS_DIR="${CONFAB_PEERS_DIR:-$HOME/.cache/confab-peers}"

_ensure_venv_package() { # module pip-spec
  local python="$PEERS_DIR/venv/bin/python"
  if [ ! -x "$python" ]; then
    python3 -m venv "$PEERS_DIR/venv" >/dev/null 2>&1 || return 1
  fi
  "$python" -c "import $1" >/dev/null 2>&1 && return 0
  echo "services: installing $2 from PyPI (once; cached in $PEERS_DIR)"
  "$PEERS_DIR/venv/bin/pip" install --quiet --disable-pip-version-check "$2" >/dev/null 2>&1
}

# An S3-compatible server (moto's server mode) for the BlobStore tests. Signatures are not
# checked and state is in memory: every run starts empty.
ensure_s3() {
  local port=${CONFAB_S3_PORT:-9011}
  if ! _port_open "$port"; then
    if ! _ensure_venv_package moto 'moto[server]'; then
      echo "services: cannot install moto; the S3 tests will be skipped" >&2
      return 0
    fi
    echo "services: starting the S3 peer (moto) on 127.0.0.1:$port"
    nohup "$PEERS_DIR/venv/bin/moto_server" -H 127.0.0.1 -p "$port" >"$PEERS_DIR/moto.log" 2>&1 &
    _wait_port s3 "$port" 30 || return 0
  else
    echo "services: S3 peer is up on 127.0.0.1:$port"
  fi
  export TEST_S3_ENDPOINT="${TEST_S3_ENDPOINT:-http://127.0.0.1:$port}"
}

# A real SMTP server that keeps what it receives in a Maildir (aiosmtpd), for the mail tests.
ensure_smtp() {
  local port=${CONFAB_SMTP_PORT:-9025}
  local maildir="$PEERS_DIR/maildir"
  # Always: tests also run sinks of their own with this virtualenv's Python.
  if ! _ensure_venv_package aiosmtpd aiosmtpd; then
    echo "services: cannot install aiosmtpd; the SMTP tests will be skipped" >&2
    return 0
  fi
  if ! _port_open "$port"; then
    mkdir -p "$maildir/tmp" "$maildir/new" "$maildir/cur"
    echo "services: starting the SMTP sink (aiosmtpd) on 127.0.0.1:$port"
    nohup "$PEERS_DIR/venv/bin/python" -m aiosmtpd -n -l "127.0.0.1:$port" \
      -c aiosmtpd.handlers.Mailbox "$maildir" >"$PEERS_DIR/aiosmtpd.log" 2>&1 &
    _wait_port smtp "$port" 30 || return 0
  else
    echo "services: SMTP sink is up on 127.0.0.1:$port"
  fi
  export TEST_SMTP_ADDR="${TEST_SMTP_ADDR:-127.0.0.1:$port}"
  export TEST_SMTP_MAILDIR="${TEST_SMTP_MAILDIR:-$maildir}"
  # Tests that stop and start a sink of their own run this Python (it has aiosmtpd).
  export TEST_SMTP_PYTHON="${TEST_SMTP_PYTHON:-$PEERS_DIR/venv/bin/python}"
}

# The official JavaScript Socket.IO client (npm socket.io-client v4), run with the machine's
# Node.js by the realtime tests: proof of wire compatibility with the clients frontends use.
ensure_socketio_client() {
  local dir="$PEERS_DIR/node"
  if ! command -v node >/dev/null 2>&1 || ! command -v npm >/dev/null 2>&1; then
    echo "services: node/npm not found; the Socket.IO client tests will be skipped" >&2
    return 0
  fi
  if [ ! -f "$dir/node_modules/socket.io-client/package.json" ]; then
    echo "services: installing socket.io-client@4 from npm (once; cached in $dir)"
    mkdir -p "$dir"
    if ! npm install --prefix "$dir" --no-audit --no-fund --silent socket.io-client@4 >/dev/null 2>&1; then
      echo "services: cannot install socket.io-client; its tests will be skipped" >&2
      return 0
    fi
  fi
  export TEST_SOCKETIO_NODE_MODULES="${TEST_SOCKETIO_NODE_MODULES:-$dir/node_modules}"
}
