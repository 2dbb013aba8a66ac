#!/usr/bin/env bash
# The README's demo: installs what is missing, builds, launches the mixed example
# (examples/order-fulfillment: broker + orchestrator + a C++ agent + three scriptable agents)
# with `ensemble up`, runs one order that succeeds and one that fails and is compensated,
# prints both traces, and shuts everything down — however this script exits.
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/install-deps.sh
cmake -S . -B "${ENSEMBLE_BUILD_DIR:-build}" -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo > /dev/null
cmake --build "${ENSEMBLE_BUILD_DIR:-build}" --target ensemble ensemble-broker ensemble-orchestrator ensemble-example-order

ensemble="${ENSEMBLE_BUILD_DIR:-build}/bin/ensemble"
work=$(mktemp -d)
up_pid=""
cleanup() {
  if [ -n "$up_pid" ] && kill -0 "$up_pid" 2>/dev/null; then
    kill -TERM "$up_pid" 2>/dev/null || true
    wait "$up_pid" 2>/dev/null || true
  fi
  rm -rf "$work"
}
trap cleanup EXIT

echo "== ensemble up examples/order-fulfillment"
"$ensemble" up examples/order-fulfillment --no-color > "$work/up.log" 2>&1 &
up_pid=$!
deadline=$((SECONDS + 60))
until grep -q "ensemble up: ready" "$work/up.log" 2>/dev/null; do
  if ! kill -0 "$up_pid" 2>/dev/null || [ $SECONDS -ge $deadline ]; then
    echo "demo: the deployment did not become ready:" >&2
    cat "$work/up.log" >&2
    exit 1
  fi
  sleep 0.1
done
sed -n '/^NAME /,/ensemble up: secured/p' "$work/up.log"
read -r router events < <(sed -n 's/^ensemble up: ready router=\([^ ]*\) events=\([^ ]*\).*/\1 \2/p' "$work/up.log")
# The example runs secured (security: curve): this script's commands act as its `user` identity.
keys=examples/order-fulfillment/.ensemble/keys
cli=("$ensemble" --broker "$router" --events "$events" --key "$keys/user.key_secret"
     --broker-key "$keys/broker.key")

echo
echo "== an order that succeeds: validate, charge (orchestrated), then the fulfillment choreography"
"${cli[@]}" run OrderFulfillment --id order-ok --wait \
  --input '{"orderId": "A-100", "amount": 42.5, "items": [{"sku": "BOOK", "qty": 1}]}'

echo
echo "== an order whose fulfillment fails: the charge is refunded (compensation)"
if "${cli[@]}" run OrderFulfillment --id order-out-of-stock --wait \
  --input '{"orderId": "A-101", "amount": 10, "items": [{"sku": "OUT-OF-STOCK", "qty": 1}]}'; then
  echo "demo: this order was expected to fail" >&2
  exit 1
fi

echo
echo "== ensemble consumers orders: the choreography's events are stored and consumed durably"
"${cli[@]}" consumers orders

echo
echo "== ensemble trace order-ok: commands and events, including the services' own events"
"${cli[@]}" trace order-ok
echo
echo "== ensemble trace order-out-of-stock"
"${cli[@]}" trace order-out-of-stock

echo
echo "== stopping the deployment"
kill -TERM "$up_pid"
wait "$up_pid"
up_pid=""
echo "== demo finished"
