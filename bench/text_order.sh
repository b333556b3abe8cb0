#!/usr/bin/env bash
# Writes crates/confab-server/text-order.txt: the functions of the release `confab` binary that
# run while it serves chat (realtime_load) and the AI relay (ai_load), most instructions first.
# The release build then links them side by side (crates/confab-server/build.rs), so the code
# the server runs sits in a few megabytes instead of being spread over the whole text.
#
# Run it after upgrading dependencies or the toolchain (their symbols' names change; a stale
# name is skipped, which only costs memory):
#   bench/text_order.sh
# It needs valgrind and takes a few minutes (the server runs under callgrind, ~50x slower).
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/confab/target}"
out=crates/confab-server/text-order.txt
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
# The binary as `cargo run --release` builds it, alone: built together with the examples, the
# dependencies' features unify differently and many symbols get other names.
cargo build --release --locked -p confab-server --bin confab
cp "$CARGO_TARGET_DIR/release/confab" "$work/confab"
cargo build --release --locked -p confab-server --example realtime_load --example ai_load
# The load tools kill what they started; valgrind must outlive that to write its profile (the
# wrapper is killed; valgrind, its child, is then stopped with SIGTERM).
cat >"$work/under-callgrind" <<EOF
#!/usr/bin/env bash
valgrind --tool=callgrind --callgrind-out-file=$work/callgrind.%p --dump-instr=no \
  --compress-strings=no --compress-pos=no --demangle=no "$work/confab" "\$@" 2>>"$work/valgrind.log" &
wait
EOF
chmod +x "$work/under-callgrind"
stop_valgrind() {
  local pid
  for pid in $(pgrep -f "valgrind.* $work/confab" || true); do
    kill -TERM "$pid"
    while kill -0 "$pid" 2>/dev/null; do sleep 0.5; done
  done
}
tools="$CARGO_TARGET_DIR/release/examples"
"$tools/realtime_load" --binary "$work/under-callgrind" --clients 50 --rooms 5 --rates 100 --seconds 5 >/dev/null
stop_valgrind
"$tools/ai_load" --binary "$work/under-callgrind" --requests 5 --streams 20 --users 5 --seconds 5 >/dev/null
stop_valgrind
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
