#!/usr/bin/env bash
# Start a worker in the background on the embedded SQLite broker, send a few tasks, print
# their results, stop the worker. Run from anywhere: it works in examples/quickstart.
set -euo pipefail
cd "$(dirname "$0")/../examples/quickstart"
rm -f qctl.sqlite3 qctl.sqlite3-wal qctl.sqlite3-shm worker.log

qctl -A tasks worker -l INFO -c 2 --logfile worker.log --pidfile worker.pid &
worker=$!
trap 'kill -TERM $worker 2>/dev/null || true' EXIT
for _ in $(seq 100); do grep -q "ready\." worker.log 2>/dev/null && break; sleep 0.1; done

echo "add(2, 2)      = $(qctl -A tasks call tasks.add --args '[2, 2]' --wait 2>/dev/null)"
echo "mul(6, 7)      = $(qctl -A tasks call tasks.mul --args '[6, 7]' --wait 2>/dev/null)"
echo "flaky(1)       = $(qctl -A tasks call tasks.flaky --args '[1]' --wait 2>/dev/null)"
python - <<'PY'
from tasks import add
results = [add.delay(i, i) for i in range(10)]
print("add(i, i) x10  =", [r.get(timeout=10) for r in results])
PY

kill -TERM $worker
wait $worker
trap - EXIT
echo "worker stopped; its log is examples/quickstart/worker.log"
