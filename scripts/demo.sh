#!/usr/bin/env bash
# The README's demo: installs what is missing, builds, starts a broker and two example agents
# on ephemeral ports, and shows a command, its reply and the event it caused flowing between
# them. Everything it starts is stopped when it exits, however it exits.
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/install-deps.sh
cmake -S . -B build -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo > /dev/null
cmake --build build --target ensemble-broker ensemble-example-inventory ensemble-example-shop

bin=build/bin
work=$(mktemp -d)
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

# Waits (at most $3 seconds) until file $1 contains a line matching $2.
wait_for_line() {
  local deadline=$((SECONDS + $3))
  until grep -q "$2" "$1" 2>/dev/null; do
    if [ $SECONDS -ge $deadline ]; then
      echo "demo: timed out waiting for '$2' in $1:" >&2
      cat "$1" >&2
      exit 1
    fi
    sleep 0.05
  done
}

echo "== starting ensemble-broker"
"$bin/ensemble-broker" --router 'tcp://127.0.0.1:*' --events 'tcp://127.0.0.1:*' \
  > "$work/broker.out" 2> "$work/broker.err" &
pids+=($!)
wait_for_line "$work/broker.out" "ensemble-broker ready" 10
read -r router events < <(sed -n 's/.*router=\([^ ]*\) events=\([^ ]*\).*/\1 \2/p' "$work/broker.out")
echo "   router=$router events=$events"

echo "== starting the inventory agent (serves InventoryService.reserve, publishes inventory.reserved)"
"$bin/ensemble-example-inventory" --broker "$router" --events "$events" > "$work/inventory.out" 2>&1 &
pids+=($!)
wait_for_line "$work/inventory.out" "ready" 10

echo "== the shop agent places 3 orders: command -> reply, and the event the command caused"
"$bin/ensemble-example-shop" --broker "$router" --events "$events" --orders 3

echo "== the broker's log"
sed 's/^/   /' "$work/broker.err"
echo "== demo finished"
