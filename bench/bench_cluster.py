"""Benchmark: kmsenv on PostgreSQL (1 and 2 nodes) against the SQLite single node, in one invocation.

Three configurations, each with the same CPU budget (`--workers` worker processes in total):

- (a) `sqlite`: one `kmsenv server --workers W` on the embedded SQLite store (the reference);
- (b) `pg-1-node`: one `kmsenv server --workers W --store postgresql://...`;
- (c) `pg-2-nodes`: two `kmsenv server --workers W/2 --store ...` on that one database, the load
  spread by **client-side round robin**: each load-generator connection is bound to one node,
  alternately (no proxy in the path, which would spend CPU of the same 2 cores).

For each, the same preparation (an AccessKey, a CMK, `alias/bench`, 200 Decrypt blobs); all
nodes are started first, then `--repeat` rounds, each running GenerateDataKey and Decrypt at
concurrency `--concurrency` (16) with `--count` timed requests (after an untimed warm-up) on every
configuration in a rotated order, so that load from elsewhere on a shared machine falls on all
three alike; the median run per (configuration, Action) is reported, with the load average. Requests are ACS3-signed as
the Tea SDK signs them, built by `bench/loadgen.py`'s functions; this file only adds a runner
that spreads connections over several nodes and runs in its own process (`--loadgen`), so its CPU
is not the servers'. Printed: requests/s, p50/p99, the ratio of each configuration's requests/s
to (a)'s, the server-side CPU per request (the nodes' process trees plus, for PostgreSQL, the
database server's: a cost a busy machine disturbs far less than requests/s), and the targets
(c) >= 0.8x (a) and p99 <= 25 ms, as MET/MISSED — never asserted.

PostgreSQL is a throwaway server started for the run (`tests/pg_harness.py`'s `Cluster`, with its
disk flushes on, as in production; as root it runs as the `postgres` user), or `--pg-url URL` (an
empty database for (b); (c) gets a new database beside it, so the user needs CREATEDB). Audit
stays on (each node writes its own chain). Everything listens on 127.0.0.1 only; servers and the
temp folder are removed even on failure. Any failed request stops the run.

Usage:
  python bench/bench_cluster.py [--count 2000] [--repeat 3] [--concurrency 16] [--workers 2]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
sys.path.insert(1, str(BENCH.parent / "tests"))

import bench_server  # noqa: E402 (bench/ and tests/ are put on the path just above)
import loadgen  # noqa: E402

ACTIONS = ("GenerateDataKey", "Decrypt")
TARGET_RATIO = 0.8
TARGET_P99_MS = 25.0
BLOBS = bench_server.BLOBS
CONFIGS = ("sqlite", "pg-1-node", "pg-2-nodes")


class BenchError(Exception):
    """The benchmark could not produce valid numbers."""


# ------------------------------------------------------------------------ the load generator --
async def _run_multi(spec: dict[str, Any]) -> dict[str, Any]:
    """``loadgen``'s timed run, with connection ``i`` bound to target ``i % len(targets)``."""
    action = spec["action"]
    jobs = [
        loadgen.Job(
            target=loadgen.Target(**t),
            action=action,
            key_id=spec.get("key_id", ""),
            blobs=tuple(spec.get("blobs", ())),
        )
        for t in spec["targets"]
    ]
    builders = [loadgen.request_builder(job) for job in jobs]
    expect = loadgen.EXPECT[action]
    concurrency = spec["concurrency"]
    connections = [
        (n % len(jobs), loadgen._Connection(jobs[n % len(jobs)].target.host, jobs[n % len(jobs)].target.port))
        for n in range(concurrency)
    ]
    latencies: list[float] = []
    blobs: list[str] = []
    errors: list[str] = []
    taken = 0

    def take(limit: int) -> Callable[[], int | None]:
        def next_index() -> int | None:
            nonlocal taken
            if taken >= limit:
                return None
            taken += 1
            return taken - 1

        return next_index

    async def caller(which: int, conn: Any, quota: Callable[[], int | None], record: bool) -> None:
        while (i := quota()) is not None:
            request = builders[which](i)
            start = time.perf_counter()
            try:
                status, body = await asyncio.wait_for(conn.exchange(request), 30)
            except (OSError, asyncio.IncompleteReadError, TimeoutError, ValueError) as exc:
                status, body = 0, repr(exc).encode()
                await conn.close()
            elapsed = time.perf_counter() - start
            if status != 200 or expect not in body:
                errors.append(f"{status} {body[:300].decode(errors='replace')}")
                continue
            if record:
                latencies.append(elapsed)
                if spec.get("collect"):
                    blobs.append(json.loads(body)["CiphertextBlob"])

    await asyncio.gather(*(caller(w, c, take(spec["warmup"] + concurrency), False) for w, c in connections))
    taken = 0
    started = time.perf_counter()
    await asyncio.gather(*(caller(w, c, take(spec["count"]), True) for w, c in connections))
    seconds = time.perf_counter() - started
    for _, conn in connections:
        await conn.close()
    latencies.sort()
    return {
        "action": action,
        "concurrency": concurrency,
        "ok": len(latencies),
        "errors": len(errors),
        "error_samples": errors[:5],
        "seconds": seconds,
        "rps": len(latencies) / seconds if seconds > 0 else 0.0,
        "p50_ms": loadgen.percentile(latencies, 50) * 1000,
        "p99_ms": loadgen.percentile(latencies, 99) * 1000,
        "blobs": blobs,
    }


def _loadgen_main() -> int:
    spec = json.load(sys.stdin)
    result = asyncio.run(asyncio.wait_for(_run_multi(spec), spec["timeout_s"]))
    json.dump(result, sys.stdout)
    return 0


def drive(spec: dict[str, Any]) -> dict[str, Any]:
    """Run one load job in a separate process; any failed request is an error."""
    result = bench_server.run_loadgen_process([sys.executable, __file__, "--loadgen"], spec)
    if result["errors"]:
        raise BenchError(f"{result['errors']} failed request(s): " + "\n  ".join(result["error_samples"]))
    return result


# ---------------------------------------------------------------------------- the servers --
@contextlib.contextmanager
def nodes(
    env: dict[str, str], homes: Sequence[Path], workers: int, store: str, logs: Path
) -> Iterator[list[tuple[int, int]]]:
    """Start one ``kmsenv server`` per home (same store); yields their (port, pid); always stops them."""
    with contextlib.ExitStack() as stack:
        ports = []
        for n, home in enumerate(homes):
            port = bench_server.free_port()
            cmd = [sys.executable, "-m", "kmsenv", "server", "--host", "127.0.0.1", "--port", str(port)]
            cmd += ["--workers", str(workers), "--log-level", "warning"]
            # As in bench_server: the per-AccessKey rate limit stays on, far above the load.
            cmd += ["--rate-limit", str(bench_server.RATE_LIMIT), "--rate-burst", str(bench_server.RATE_LIMIT)]
            if store:
                cmd += ["--store", store]
            node_env = {**env, "KMSENV_HOME": str(home)}
            proc = stack.enter_context(
                bench_server.running(cmd, node_env, logs / f"node{n}.log", f"http://127.0.0.1:{port}/health")
            )
            ports.append((port, proc.pid))
        yield ports


def prepare(env: dict[str, str], home: Path, store: str) -> tuple[dict[str, str], str]:
    """An AccessKey and ``alias/bench`` in the KMS of ``home`` (on ``store``)."""
    cli_env = {**env, "KMSENV_HOME": str(home)}
    if store:
        cli_env["KMSENV_STORE"] = store
    created = json.loads(bench_server.kmsenv_cli(cli_env, "access-key", "create", "--description", "bench"))
    key_id = json.loads(bench_server.kmsenv_cli(cli_env, "kms", "CreateKey"))["KeyMetadata"]["KeyId"]
    bench_server.kmsenv_cli(cli_env, "kms", "CreateAlias", "--AliasName", "alias/bench", "--KeyId", key_id)
    return created, "alias/bench"


def start_config(
    stack: contextlib.ExitStack, name: str, work: Path, store: str, *, workers: int, concurrency: int, timeout_s: float
) -> dict[str, Any]:
    """Prepare one configuration's KMS, start its node(s), make its Decrypt blobs; returns the
    base of its load jobs. The nodes stay up until ``stack`` closes."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("KMSENV_")}
    folder = work / name
    homes = [folder / "home0"] + ([folder / "home1"] if name == "pg-2-nodes" else [])
    created, key_id = prepare(env, homes[0], store)
    for home in homes[1:]:  # further nodes: their own homes, the first node's root key
        home.mkdir(parents=True, mode=0o700)
        shutil.copy2(homes[0] / "root.key", home / "root.key")
    per_node = max(1, workers // len(homes))
    spread = ", client-side round robin" if len(homes) > 1 else ""
    print(f"{name}: {len(homes)} node(s) x {per_node} worker(s){spread}", flush=True)
    started = stack.enter_context(nodes(env, homes, per_node, store, folder))
    ports = [port for port, _ in started]
    targets = [
        {
            "kind": "kmsenv",
            "host": "127.0.0.1",
            "port": port,
            "access_key_id": created["AccessKeyId"],
            "secret": created["AccessKeySecret"],
        }
        for port in ports
    ]
    base = {"targets": targets, "key_id": key_id, "timeout_s": timeout_s, "concurrency": concurrency}
    blobs = drive({**base, "action": "GenerateDataKey", "count": BLOBS, "warmup": 0, "collect": True})["blobs"]
    return {**base, "blobs": blobs, "pids": [pid for _, pid in started]}


def measure(
    bases: dict[str, dict[str, Any]], *, count: int, repeat: int, concurrency: int, db_pid: int | None = None
) -> dict[str, list[dict[str, Any]]]:
    """``repeat`` rounds; in each, every (Action, configuration) once, the configurations in a
    rotated order: on a shared machine, load that comes and goes then falls on all of them
    alike, not on whichever ran at that moment. The median run by requests/s is reported."""
    runs: dict[tuple[str, str], list[dict[str, Any]]] = {}
    names = list(bases)
    for round_ in range(repeat):
        order = names[round_ % len(names) :] + names[: round_ % len(names)]
        for action in ACTIONS:
            for name in order:
                job = {**bases[name], "action": action, "count": count}
                job["warmup"] = min(max(count // 10, concurrency), 200)
                pids = job.pop("pids")
                if action != "Decrypt":
                    job.pop("blobs")
                # CPU per request, of the nodes (process trees) and of the database server: a
                # measure of cost that a busy machine disturbs far less than requests/s.
                cpu0 = sum(bench_server.tree_cpu_seconds(pid) for pid in pids)
                db0 = bench_server.tree_cpu_seconds(db_pid) if db_pid else 0.0
                run = drive(job)
                sent = run["ok"] + job["warmup"] + concurrency
                run["server_cpu_ms_per_request"] = (
                    (sum(bench_server.tree_cpu_seconds(pid) for pid in pids) - cpu0) * 1000 / sent
                )
                if db_pid:
                    run["db_cpu_ms_per_request"] = (bench_server.tree_cpu_seconds(db_pid) - db0) * 1000 / sent
                run.pop("blobs")
                run["loadavg"] = os.getloadavg()
                runs.setdefault((name, action), []).append(run)
                print(
                    f"  round {round_ + 1}: {name:<11} {action:<16} {run['rps']:8.0f} req/s  "
                    f"p99 {run['p99_ms']:6.2f} ms  cpu/req: nodes {run['server_cpu_ms_per_request']:.2f} ms"
                    f"{', database ' + format(run['db_cpu_ms_per_request'], '.2f') + ' ms' if db_pid else ''}"
                    f"  (load avg {run['loadavg'][0]:.2f})",
                    flush=True,
                )
    results: dict[str, list[dict[str, Any]]] = {name: [] for name in names}
    for (name, _action), measured in runs.items():
        measured.sort(key=lambda r: float(r["rps"]))
        median = measured[len(measured) // 2]
        results[name].append({**median, "config": name, "rps_runs": [r["rps"] for r in measured]})
    return results


def report(runs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    reference = {r["action"]: r for r in runs["sqlite"]}
    print(
        f"\n{'configuration':<12} {'Action':<16} {'req/s':>8} {'p50 ms':>7} {'p99 ms':>7} {'x sqlite':>8} "
        f"{'cpu ms/req':>10} {'(db)':>6}"
    )
    ratios: dict[str, dict[str, float]] = {}
    for name, results in runs.items():
        for r in results:
            ratio = r["rps"] / reference[r["action"]]["rps"]
            ratios.setdefault(name, {})[r["action"]] = ratio
            db = r.get("db_cpu_ms_per_request", 0.0) if name != "sqlite" else 0.0
            print(
                f"{name:<12} {r['action']:<16} {r['rps']:8.0f} {r['p50_ms']:7.2f} {r['p99_ms']:7.2f} {ratio:8.2f} "
                f"{r['server_cpu_ms_per_request'] + db:10.2f} {db:6.2f}"
            )
    summary: dict[str, Any] = {"ratio_vs_sqlite": ratios, "targets": {}}
    for r in runs.get("pg-2-nodes", []):
        ratio_met = ratios["pg-2-nodes"][r["action"]] >= TARGET_RATIO
        p99_met = r["p99_ms"] <= TARGET_P99_MS
        summary["targets"][r["action"]] = {"ratio_met": ratio_met, "p99_met": p99_met}
        print(
            f"target pg-2-nodes {r['action']}: >= {TARGET_RATIO}x sqlite: {ratios['pg-2-nodes'][r['action']]:.2f}x "
            f"{'MET' if ratio_met else 'MISSED'}; p99 <= {TARGET_P99_MS:.0f} ms: {r['p99_ms']:.2f} ms "
            f"{'MET' if p99_met else 'MISSED'}"
        )
    return summary


@contextlib.contextmanager
def database(url: str | None) -> Iterator[tuple[str, int | None]]:
    """(URL, the PostgreSQL server's postmaster pid, when it is ours and its CPU can be read)."""
    if url:
        yield url, None
        return
    from pg_harness import Cluster

    cluster = Cluster(durable=True)
    try:
        pid = int((cluster.data / "postmaster.pid").read_text().split()[0])
        yield cluster.create_database(), pid
    finally:
        cluster.stop()


def main(argv: Sequence[str] | None = None) -> int:
    if argv is None and sys.argv[1:2] == ["--loadgen"]:
        return _loadgen_main()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--count", type=int, default=2000, help="timed requests per Action and run")
    ap.add_argument("--repeat", type=int, default=3, help="runs per Action; the median is reported")
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--workers", type=int, default=2, help="worker processes per configuration, over all its nodes")
    ap.add_argument("--pg-url", help="an empty PostgreSQL database to use (default: a throwaway server)")
    ap.add_argument("--timeout", type=float, default=300.0, help="bound on each load job, seconds")
    ap.add_argument("--out", type=Path, default=BENCH / "out" / "cluster.json")
    args = ap.parse_args(argv)
    if min(args.count, args.repeat, args.concurrency, args.workers) < 1:
        ap.error("--count, --repeat, --concurrency and --workers must be positive")
    opts = {
        "workers": args.workers,
        "count": args.count,
        "repeat": args.repeat,
        "concurrency": args.concurrency,
        "timeout_s": args.timeout,
    }
    work = Path(tempfile.mkdtemp(prefix="kmsenv-bench-cluster-"))
    results: dict[str, Any] = {"setup": {**opts, "blobs": BLOBS, "machine": bench_server.machine()}}
    try:
        with database(args.pg_url) as (url, db_pid), contextlib.ExitStack() as stack:
            start = {"workers": args.workers, "concurrency": args.concurrency, "timeout_s": args.timeout}
            bases = {"sqlite": start_config(stack, "sqlite", work, "", **start)}
            bases["pg-1-node"] = start_config(stack, "pg-1-node", work, url, **start)
            # (c) gets a database of its own beside (b)'s, on the same PostgreSQL server.
            bases["pg-2-nodes"] = start_config(stack, "pg-2-nodes", work, _second_database(url), **start)
            runs = measure(bases, count=args.count, repeat=args.repeat, concurrency=args.concurrency, db_pid=db_pid)
        results["runs"] = runs
        results["summary"] = report(runs)
        results["setup"]["loadavg_at_end"] = os.getloadavg()
    except (BenchError, bench_server.BenchError) as exc:
        print(f"bench_cluster: error: {exc}", file=sys.stderr)
        return 1
    finally:
        shutil.rmtree(work, ignore_errors=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    print(f"results: {args.out}")
    return 0


def _second_database(url: str) -> str:
    """A new database beside the one at ``url`` (same server and user), for configuration (c)."""
    from urllib.parse import urlsplit, urlunsplit

    import psycopg

    name = f"kmsenv_bench_{os.getpid()}_{int(time.time())}"
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return urlunsplit(urlsplit(url)._replace(path=f"/{name}"))


if __name__ == "__main__":
    sys.exit(main())
