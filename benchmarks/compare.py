"""qctl and Celery side by side on the same Redis server and the same cores.

    python benchmarks/compare.py [--tasks 5000] [--latency 300] [--concurrency 2]

Starts a private ``redis-server`` on loopback, makes (or reuses) a virtual environment with
Celery 5.7 (the one the interop tests use), and for each of qctl and Celery measures:

- publish: no-op tasks sent one by one from one client (tasks/s);
- drain: a worker (``-c N``, prefork, log level WARNING) started on the full queue until
  every result is stored (tasks/s, from its first stored result);
- round trip: ``delay().get()`` one after the other with the worker idle (median, p90 ms).

qctl is also measured on its embedded SQLite broker. The report gives each figure and the
ratio qctl / Celery on Redis. Numbers vary with the machine's load: compare within one run.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.servers_redis import start_redis, stop_redis, with_db  # noqa: E402

APP = textwrap.dedent("""\
    import os
    IMPL = os.environ["BENCH_IMPL"]
    if IMPL == "celery":
        from celery import Celery as App
    else:
        from qctl import App
    app = App("bench", broker=os.environ["BENCH_BROKER"], backend=os.environ["BENCH_BACKEND"])
    app.conf.update(worker_prefetch_multiplier=4, result_expires=3600)

    @app.task(name="bench.noop")
    def noop(i=0):
        return i
""")

CLIENT = textwrap.dedent("""\
    import json, statistics, sys, time
    from bench import app, noop
    mode, n = sys.argv[1], int(sys.argv[2])
    if mode == "publish":
        t = time.perf_counter()
        ids = [noop.delay(i).id for i in range(n)]
        print(json.dumps({"rate": n / (time.perf_counter() - t)}))
    elif mode == "latency":
        noop.delay(0).get(timeout=30)
        times = []
        for i in range(n):
            t = time.perf_counter()
            noop.delay(i).get(timeout=30)
            times.append((time.perf_counter() - t) * 1000)
        times.sort()
        print(json.dumps({"median": statistics.median(times), "p90": times[int(len(times) * .9)]}))
""")


def celery_python() -> Path:
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "qctl-tests" / "celery-5.7-venv"
    python = cache / "bin" / "python"
    if not python.exists():
        print("creating the Celery 5.7 virtual environment ...", file=sys.stderr)
        subprocess.run([sys.executable, "-m", "venv", str(cache)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", "celery[redis]==5.7.0", "redis"], check=True)
    return python


def count_results(impl: str, backend: str) -> int:
    if backend.startswith("redis"):
        import redis
        client = redis.Redis.from_url(backend)
        try:
            return client.dbsize()
        finally:
            client.close()
    import sqlite3
    path = backend.split("sqlite:///", 1)[1]
    try:
        with sqlite3.connect(path) as db:
            return db.execute("SELECT COUNT(*) FROM results").fetchone()[0]
    except sqlite3.OperationalError:
        return 0


def run(impl: str, python: Path, broker: str, backend: str, folder: Path, tasks: int,
        latency: int, concurrency: int) -> dict:
    env = dict(os.environ, BENCH_IMPL=impl, BENCH_BROKER=broker, BENCH_BACKEND=backend,
               PYTHONPATH=os.pathsep.join([str(folder), str(ROOT)]))
    env.pop("QCTL_BROKER_URL", None)
    env.pop("QCTL_RESULT_BACKEND", None)

    def client(mode: str, n: int) -> dict:
        out = subprocess.run([str(python), "client.py", mode, str(n)], cwd=folder, env=env,
                             capture_output=True, text=True, timeout=600)
        if out.returncode:
            raise SystemExit(f"{impl} client failed:\n{out.stderr}")
        return json.loads(out.stdout.strip().splitlines()[-1])

    published = client("publish", tasks)
    command = ([str(python), "-m", "celery", "-A", "bench", "worker"] if impl == "celery"
               else [sys.executable, "-m", "qctl", "-A", "bench", "worker"])
    command += ["-c", str(concurrency), "-P", "prefork", "-l", "WARNING"]
    log = folder / f"{impl}-worker.log"
    with open(log, "w") as fh:
        worker = subprocess.Popen(command, cwd=folder, env=env, stdout=fh, stderr=subprocess.STDOUT)
    try:
        # Timed from the first stored result, so start-up costs are left out on both sides
        # (Celery prints no ready line at WARNING).
        deadline = time.monotonic() + 60
        while count_results(impl, backend) < 1:
            if time.monotonic() > deadline or worker.poll() is not None:
                raise SystemExit(f"{impl} worker did not start:\n{log.read_text()[-2000:]}")
            time.sleep(0.002)
        start = time.perf_counter()
        tasks -= 1
        while count_results(impl, backend) < tasks:
            time.sleep(0.005)
        drain = tasks / (time.perf_counter() - start)
        round_trip = client("latency", latency)
    finally:
        worker.terminate()
        worker.wait(60)
    return {"publish": published["rate"], "drain": drain, **round_trip}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=int, default=5000)
    parser.add_argument("--latency", type=int, default=300)
    parser.add_argument("--concurrency", type=int, default=2)
    args = parser.parse_args()
    celery = celery_python()
    work = Path(tempfile.mkdtemp(prefix="qctl-bench-"))
    url, server = start_redis(work / "redis")
    results = {}
    try:
        for name, impl, python, broker, backend in (
                ("celery/redis", "celery", celery, with_db(url, 1), with_db(url, 2)),
                ("qctl/redis", "qctl", Path(sys.executable), with_db(url, 3), with_db(url, 4)),
                ("qctl/sqlite", "qctl", Path(sys.executable), f"sqlite:///{work}/q.sqlite3",
                 f"sqlite:///{work}/q.sqlite3")):
            folder = work / name.replace("/", "-")
            folder.mkdir()
            (folder / "bench.py").write_text(APP)
            (folder / "client.py").write_text(CLIENT)
            print(f"running {name} ...", file=sys.stderr)
            results[name] = run(impl, python, broker, backend, folder, args.tasks, args.latency,
                                args.concurrency)
    finally:
        stop_redis(server)
        shutil.rmtree(work, ignore_errors=True)
    base = results["celery/redis"]
    print(f"\n{args.tasks} no-op tasks, -c {args.concurrency} prefork, {os.cpu_count()} cores\n")
    print(f"{'':14}{'publish/s':>12}{'drain/s':>12}{'get() median ms':>17}{'p90 ms':>9}")
    for name, r in results.items():
        print(f"{name:14}{r['publish']:12.0f}{r['drain']:12.0f}{r['median']:17.2f}{r['p90']:9.2f}")
    for name in ("qctl/redis", "qctl/sqlite"):
        r = results[name]
        print(f"{name} / celery/redis: publish x{r['publish'] / base['publish']:.2f}, "
              f"drain x{r['drain'] / base['drain']:.2f}, round trip x{base['median'] / r['median']:.2f} faster")


if __name__ == "__main__":
    main()
