"""Migration throughput and memory: the batch jobs against a plain batched UPDATE (Postgres).

For each table size, on a fresh table of ``(id bigint primary key, name
varchar(200))`` filled server-side:

* ``update``: ``UPDATE t SET name = name WHERE id > :lo AND id <= :hi``, one
  transaction per batch: what rewriting every row costs the database alone.
* ``encrypt_column``: ``jobs.encrypt_column`` turns the plaintext column into
  an encrypted one in place (shadow column, batches, swap).
* ``reencrypt``: after ``envelope.rotate``, ``envelope.reencrypt`` moves every
  value to the new key.

Each job runs in a child process of its own (``python -m benchmarks.migration
JOB ...``) that reports its time and its peak resident memory (``VmHWM``
from ``/proc/self/status``), so the sizes can be compared: a job whose memory is bounded
peaks at the same height at 100,000 and 1,000,000 rows. At the throughput
size the three run in several rounds; each job's share of the ``UPDATE``'s
throughput is taken against the ``UPDATE`` of its own round, and the median
share is reported (on a shared machine, speed moves from one minute to the
next, and a job compared with a baseline timed minutes apart moves with it).
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import sqlalchemy as sa

TABLE = "bench_migration"
ROOT = Path(__file__).resolve().parent.parent


# -- the parent: set up, run each job in a child, collect ----------------------------------
def run(
    pg_url: str,
    *,
    rows: int,
    rss_rows: list[int],
    batch_size: int,
    rounds: int = 1,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Time every job at each size; at ``rows``, ``rounds`` rounds, each with its own UPDATE."""
    from sqlalchemy_envelope import Envelope, LocalKms

    from .workloads import postgres_schema

    sizes = sorted(set(rss_rows) | {rows})
    master = os.urandom(32)
    results: dict[str, Any] = {
        "rows": rows, "batch_size": batch_size, "rounds": rounds, "sizes": {}
    }  # fmt: skip
    with postgres_schema(pg_url) as engine:
        url = engine.url.render_as_string(hide_password=False)
        envelope = Envelope(table_name="bench_keys")
        envelope.table.create(engine)
        envelope.configure(kms=LocalKms(master), engine=engine)
        child_env = {"url": url, "master": master.hex(), "batch_size": batch_size}
        for n in sizes:
            runs = []
            for i in range(rounds if n == rows else 1):
                log(f"migration: {n:,} rows, round {i + 1}")
                runs.append(_round(engine, envelope, child_env, n))
            results["sizes"][str(n)] = _summary(runs)
    return results


def _round(engine: sa.Engine, envelope: Any, child_env: dict[str, Any], n: int) -> dict[str, Any]:
    """One run of each job on ``n`` rows, each on a fresh table, in a child process."""
    per_job: dict[str, Any] = {}
    for job in ("update", "encrypt_column"):
        _fill(engine, n)
        per_job[job] = _child(job, child_env)
    envelope.rotate(TABLE)  # every value is now under a retired key
    _vacuum(engine)
    per_job["reencrypt"] = _child("reencrypt", child_env)
    for outcome in per_job.values():
        outcome["rows_per_s"] = n / outcome["seconds"]
        outcome["vs_update"] = outcome["rows_per_s"] / per_job["update"]["rows_per_s"]
    return per_job


def _summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per job: median time and share of its round's UPDATE, highest peak memory, every round."""
    summary: dict[str, Any] = {}
    for job in runs[0]:
        each = [r[job] for r in runs]
        summary[job] = {
            "seconds": statistics.median(o["seconds"] for o in each),
            "rows_per_s": statistics.median(o["rows_per_s"] for o in each),
            "vs_update": statistics.median(o["vs_update"] for o in each),
            "peak_rss_mb": max(o["peak_rss_mb"] for o in each),
            "start_rss_mb": max(o["start_rss_mb"] for o in each),
            "rounds": each,
        }
    return summary


def _fill(engine: sa.Engine, n: int) -> None:
    with engine.begin() as conn:
        conn.execute(sa.text(f"DROP TABLE IF EXISTS {TABLE}"))
        conn.execute(sa.text(f"CREATE TABLE {TABLE} (id bigint PRIMARY KEY, name varchar(200))"))
        conn.execute(
            sa.text(
                f"INSERT INTO {TABLE} (id, name) SELECT g, 'Patient ' || lpad(g::text, 7, '0') "
                "|| ' Example' FROM generate_series(1, :n) AS g"
            ),
            {"n": n},
        )
    _vacuum(engine)


def _vacuum(engine: sa.Engine) -> None:
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(sa.text(f"VACUUM ANALYZE {TABLE}"))


def _child(job: str, env: dict[str, Any]) -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.migration", job, json.dumps(env)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"migration child {job!r} failed:\n{done.stderr[-4000:]}")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


# -- the text --------------------------------------------------------------------------
def text(results: dict[str, Any]) -> str:
    n = str(results["rows"])
    lines = [
        f"Migration (PostgreSQL, batch_size {results['batch_size']}, one child process per job; "
        f"at {int(n):,} rows the median of {results.get('rounds', 1)} rounds, each job's share "
        "taken against the UPDATE of its own round):",
        f"{'job':<16}{'rows':>11}{'seconds':>10}{'rows/s':>10}{'vs UPDATE':>11}"
        f"{'peak RSS':>11}{'at start':>10}",
    ]
    for size, jobs in results["sizes"].items():
        for job, r in jobs.items():
            lines.append(
                f"{job:<16}{int(size):>11,}{r['seconds']:>10.1f}{r['rows_per_s']:>10,.0f}"
                f"{r['vs_update']:>10.0%}{r['peak_rss_mb']:>8.1f} MB"
                f"{r['start_rss_mb']:>7.1f} MB"
            )
    sizes = list(results["sizes"])
    if len(sizes) >= 2:
        small, large = results["sizes"][sizes[0]], results["sizes"][sizes[-1]]
        for job in ("encrypt_column", "reencrypt"):
            growth = large[job]["peak_rss_mb"] - small[job]["peak_rss_mb"]
            lines.append(
                f"{job}: peak RSS {int(sizes[-1]):,} rows minus {int(sizes[0]):,} rows: "
                f"{growth:+.1f} MB (target: within 50 MB)"
            )
    if n in results["sizes"]:
        jobs = results["sizes"][n]
        for job in ("encrypt_column", "reencrypt"):
            shares = [r["vs_update"] for r in jobs[job]["rounds"]]
            each = f", median of {len(shares)} rounds: " + ", ".join(f"{x:.0%}" for x in shares)
            lines.append(
                f"{job}: {jobs[job]['vs_update']:.0%} of the plain UPDATE's throughput at "
                f"{int(n):,} rows{each if len(shares) > 1 else ''} (target: at least 50%)"
            )
    return "\n".join(lines)


# -- the child: one job, then its time and memory as one JSON line ---------------------------
def _rss_mb(field: str) -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def child(job: str, env: dict[str, Any]) -> dict[str, Any]:
    from sqlalchemy_envelope import Encrypted, Envelope, LocalKms, jobs

    engine = sa.create_engine(env["url"])
    batch_size = int(env["batch_size"])
    metadata = sa.MetaData()
    envelope = Envelope(metadata, table_name="bench_keys")
    envelope.configure(kms=LocalKms(bytes.fromhex(env["master"])), engine=engine)
    table = sa.Table(
        TABLE,
        metadata,
        sa.Column("id", sa.BigInteger, primary_key=True),
        sa.Column("name", Encrypted(sa.String(200), envelope)),
    )
    with engine.connect() as conn:  # connect once before measuring the start
        n = conn.execute(sa.text(f"SELECT count(*) FROM {TABLE}")).scalar_one()
    start_rss = _rss_mb("VmRSS")
    started = time.perf_counter()
    if job == "update":
        with engine.connect() as conn:
            stmt = sa.text(f"UPDATE {TABLE} SET name = name WHERE id > :lo AND id <= :hi")
            for lo in range(0, n, batch_size):
                with conn.begin():
                    conn.execute(stmt, {"lo": lo, "hi": lo + batch_size})
    elif job == "encrypt_column":
        jobs.encrypt_column(
            envelope, engine, TABLE, "name", Encrypted(sa.String(200)), batch_size=batch_size
        )
    elif job == "reencrypt":
        envelope.reencrypt(table, batch_size=batch_size)
    else:
        raise SystemExit(f"unknown job {job!r}")
    seconds = time.perf_counter() - started
    engine.dispose()
    return {
        "seconds": seconds,
        "start_rss_mb": start_rss,
        # VmHWM is this process's own peak. ru_maxrss is not: Linux carries
        # into it the parent's resident size at fork, before the exec.
        "peak_rss_mb": _rss_mb("VmHWM"),
        "ru_maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


if __name__ == "__main__":
    print(json.dumps(child(sys.argv[1], json.loads(sys.argv[2]))))
