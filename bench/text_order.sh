#!/usr/bin/env bash
# Writes crates/confab-server/text-order.txt: the functions of the release `confab` binary that
# run while it serves chat (realtime_load) and the AI relay (ai_load), most instructions first.
# The release build then links them side by side (crates/confab-server/build.rs), so the code
# the server runs sits in a few megabytes instead of being spread over the whole text.
#
# Then, where perf is installed, it links that order and runs issue 8's memory configuration
# (1,000 clients, 100 rooms, 1k msg/s) natively under `perf record -e minor-faults`: each
# function that still faults code in outside the list is appended, for up to three rounds.
# These are mostly paths picked by CPU features valgrind does not offer (SHA-NI) and paths
# only 1,000 clients take.
#
# Run it after upgrading dependencies or the toolchain (their symbols' names change; a stale
# name is skipped, which only costs memory):
#   bench/text_order.sh
# It needs valgrind (and perf for the rounds) and takes ~10 minutes.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/confab/target}"
out=crates/confab-server/text-order.txt
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
# The binary as `cargo run --release` builds it, alone: built together with the examples, the
# dependencies' features unify differently and many symbols get other names.
build_server() {
  cargo build --release --locked -p confab-server --bin confab
  cp "$CARGO_TARGET_DIR/release/confab" "$work/confab"
}
# The load tools kill the server they started. The profiler must outlive that to write its
# profile: `wrapper NAME TOOL…` writes a script that runs `TOOL… $work/confab ARGS` in the
# background and waits (the script is killed, the profiler is its child), and
# `stop SIGNAL PATTERN` then stops the profiler and waits for it to finish writing.
wrapper() {
  local name=$1
  shift
  printf '#!/usr/bin/env bash\n%s "%s" "$@" 2>>"%s" &\nwait\n' \
    "$*" "$work/confab" "$work/$name.log" >"$work/$name"
  chmod +x "$work/$name"
}
stop() {
  local pid
  for pid in $(pgrep -f "$2" || true); do
    kill "-$1" "$pid"
    while kill -0 "$pid" 2>/dev/null; do sleep 0.5; done
  done
}
build_server
cargo build --release --locked -p confab-server --example realtime_load --example ai_load
wrapper under-callgrind valgrind --tool=callgrind "--callgrind-out-file=$work/callgrind.%p" \
  --dump-instr=no --compress-strings=no --compress-pos=no --demangle=no
tools="$CARGO_TARGET_DIR/release/examples"
"$tools/realtime_load" --binary "$work/under-callgrind" --clients 50 --rooms 5 --rates 100 --seconds 5 >/dev/null
stop TERM "valgrind.* $work/confab"
"$tools/ai_load" --binary "$work/under-callgrind" --requests 5 --streams 20 --users 5 --seconds 5 >/dev/null
stop TERM "valgrind.* $work/confab"
python3 - "$work" "$out" <<'EOF'
import os, re, sys
work, out = sys.argv[1], sys.argv[2]
binary = os.path.join(work, "confab")
cost = {}
for name in os.listdir(work):
    if not name.startswith("callgrind."):
        continue
    obj, fn = None, None
    for line in open(os.path.join(work, name)):
        if line.startswith("ob="):
            obj = line[3:].strip()
        elif line.startswith("fn="):
            # callgrind marks recursion levels with 'N.
            fn = re.sub(r"'\d+$", "", line[3:].strip()) if obj == binary else None
            if fn:
                cost.setdefault(fn, 0)
        elif fn and line[:1].isdigit():
            parts = line.split()
            if len(parts) >= 2:
                cost[fn] += int(parts[1])
if len(cost) < 1000:
    sys.exit(f"only {len(cost)} functions profiled: did the load tools run?")
with open(out, "w") as f:
    f.write("\n".join(sorted(cost, key=lambda n: (-cost[n], n))) + "\n")
print(f"{out}: {len(cost)} functions")
EOF

command -v perf >/dev/null || { echo "perf not found: no native rounds"; exit 0; }
wrapper under-perf perf record -q -e minor-faults,major-faults -c 1 -d -o "$work/perf.data" --
for round in 1 2 3; do
  build_server
  "$tools/realtime_load" --binary "$work/under-perf" --clients 1000 --rooms 100 --rates 1000 --seconds 10 >/dev/null
  stop INT "perf record -q .* -o $work/perf.data"
  # A fault on fetching an instruction has its address equal to the instruction pointer.
  perf script -i "$work/perf.data" --no-demangle -F ip,addr,sym,dso 2>/dev/null |
    awk -v dso="($work/confab)" '$1 == $4 && $3 == dso && $2 !~ /^(\[unknown\]|_init|_start)$/ { print $2 }' |
    sort -u >"$work/faulted"
  sort -u "$out" | comm -23 "$work/faulted" - >"$work/new"
  echo "round $round: $(wc -l <"$work/new") functions faulted in outside the list"
  [ -s "$work/new" ] || break
  cat "$work/new" >>"$out"
  rm -f "$work/perf.data"
done
echo "$out: $(wc -l <"$out") functions"
