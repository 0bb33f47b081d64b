"""Benchmarks of sqlalchemy-envelope: one run, one database, every system side by side.

    python benchmarks/run.py                     # 50,000 rows, SQLite + Postgres if configured
    python benchmarks/run.py --rows 10000 --repeat 3
    python benchmarks/run.py --smoke             # tiny, one repetition (CI)
    python benchmarks/run.py --migration         # batch jobs on Postgres (1,000,000 rows)

Postgres comes from ``--pg-url`` or ``SQLALCHEMY_ENVELOPE_TEST_DATABASE_URL``;
without it the Postgres part is skipped, with a note. Results go to
``benchmarks/results/`` (JSON and PNG). docs/PERFORMANCE.md explains each number.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.util
import os
import platform
import shlex
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import cryptography
import sqlalchemy as sa
import sqlalchemy_utils

from benchmarks import economy, report
from benchmarks.systems import SYSTEMS
from benchmarks.workloads import (
    Floor,
    open_database,
    postgres_schema,
    run_paths,
    set_clock,
    sqlite_memory,
)

PG_ENV = "SQLALCHEMY_ENVELOPE_TEST_DATABASE_URL"
RESULTS = Path(__file__).resolve().parent / "results"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--rows", type=int, default=50_000, help="rows per table (default 50,000)")
    p.add_argument(
        "--repeat", type=int, default=5, help="repetitions; the median is reported (default 5)"
    )
    p.add_argument(
        "--lookups", type=int, default=1_000, help="equality lookups per repetition (default 1,000)"
    )
    p.add_argument(
        "--pg-url", default=os.environ.get(PG_ENV), help=f"Postgres URL (default ${PG_ENV})"
    )
    p.add_argument(
        "--clock",
        choices=("wall", "cpu"),
        default="wall",
        help="wall time (default), or this process's CPU time: steadier on a busy machine, "
        "but blind to the Postgres server's share",
    )
    p.add_argument("--no-sqlite", action="store_true", help="skip SQLite")
    p.add_argument("--no-postgres", action="store_true", help="skip Postgres even if a URL is set")
    p.add_argument(
        "--economy-rows", type=int, default=10_000, help="rows per table for the KMS economy run"
    )
    p.add_argument(
        "--hotpath",
        action="store_true",
        help="also time the bind and result processors alone against the raw cipher",
    )
    p.add_argument("--no-economy", action="store_true", help="skip the KMS economy run")
    p.add_argument("--migration", action="store_true", help="also time the batch jobs (Postgres)")
    p.add_argument(
        "--migration-rows", type=int, default=1_000_000, help="rows for the throughput run"
    )
    p.add_argument(
        "--migration-rounds",
        type=int,
        default=3,
        help="rounds of the throughput run, each job paired with its round's UPDATE (default 3)",
    )
    p.add_argument(
        "--rss-rows",
        default="100000,1000000",
        help="comma-separated table sizes at which to measure peak RSS (default 100000,1000000)",
    )
    p.add_argument(
        "--batch-size", type=int, default=1_000, help="batch size of the jobs and of the UPDATE"
    )
    p.add_argument(
        "--smoke", action="store_true", help="tiny sizes, one repetition: checks that it works"
    )
    p.add_argument(
        "--out", type=Path, default=RESULTS, help="directory for the JSON and PNG results"
    )
    args = p.parse_args(argv)
    if args.smoke:
        args.rows, args.repeat, args.lookups, args.economy_rows = 200, 1, 20, 200
        args.migration_rows, args.rss_rows, args.migration_rounds = 2_000, "1000,2000", 1
    if min(args.rows, args.repeat, args.lookups, args.migration_rounds) < 1:
        p.error("--rows, --repeat, --lookups and --migration-rounds must be positive")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    set_clock(args.clock)
    command = "python benchmarks/run.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    pg_url = None if args.no_postgres else args.pg_url
    args.out.mkdir(parents=True, exist_ok=True)
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    payload: dict[str, Any] = {
        "command": command,
        "when": dt.datetime.now(dt.timezone.utc).isoformat(),
        "machine": {
            "python": platform.python_version(),
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "sqlalchemy": sa.__version__,
            "cryptography": cryptography.__version__,
            "sqlalchemy_utils": sqlalchemy_utils.__version__,
        },
        "rows": args.rows,
        "repeat": args.repeat,
        "clock": args.clock,
        "lookups": args.lookups,
        "databases": {},
    }
    log = _logger()
    print(f"$ {command}")
    print(
        f"Python {platform.python_version()}, SQLAlchemy {sa.__version__}, cryptography "
        f"{cryptography.__version__}, {os.cpu_count()} CPUs"
    )

    floor = Floor(args.rows)

    databases: list[tuple[str, str, Any]] = []
    if not args.no_sqlite:
        databases.append(("sqlite", "SQLite (in memory)", sqlite_memory()))
    if pg_url:
        databases.append(("postgresql", "PostgreSQL", postgres_schema(pg_url)))
    else:
        print(f"note: Postgres skipped (no --pg-url and ${PG_ENV} is not set)")

    json_path = args.out / f"bench-{stamp}.json"
    for name, label, engine_cm in databases:
        with engine_cm as engine:
            log(f"{label}: setting up")
            db = open_database(name, label, engine, SYSTEMS)
            times, floors = run_paths(
                db,
                SYSTEMS,
                floor,
                rows=args.rows,
                repeat=args.repeat,
                lookups=args.lookups,
                log=log,
            )
        summary = report.summarize(times, floors, rows=args.rows, lookups=args.lookups)
        medians = report.floor_medians(floors)
        payload["databases"][name] = {
            "label": label,
            "times_s": times,
            "floor_s_per_value": floors,
            "floor_median_s_per_value": medians,
            "summary": summary,
        }
        print()
        print(report.table(label, summary, medians, rows=args.rows, repeat=args.repeat), flush=True)
        report.write_json(json_path, payload)  # a long run keeps what it has measured

    if args.hotpath:
        from benchmarks import hotpath

        log("hot path alone")
        payload["hotpath_us"] = hotpath.measure(rounds=3 if args.smoke else 60)
        print()
        print(hotpath.text(payload["hotpath_us"]), flush=True)

    if not args.no_economy:
        log("KMS economy")
        payload["kms_economy"] = economy.run(pg_url, rows=args.economy_rows)
        print()
        print(report.economy_text(payload["kms_economy"]), flush=True)
        report.write_json(json_path, payload)

    if args.migration:
        payload["migration"] = _migration(args, pg_url, log)
        if payload["migration"]:
            from benchmarks import migration

            print()
            print(migration.text(payload["migration"]), flush=True)

    print()
    report.write_json(json_path, payload)
    print(f"results: {json_path}")
    if payload["databases"]:
        png = args.out / f"bench-{stamp}.png"
        if report.chart(png, payload["databases"], rows=args.rows, repeat=args.repeat):
            print(f"chart:   {png}")
        else:
            print("chart:   skipped (matplotlib is not installed)")
    return 0


def _migration(args: argparse.Namespace, pg_url: str | None, log: Any) -> dict[str, Any] | None:
    if not pg_url:
        print("note: --migration skipped: it needs Postgres (--pg-url)")
        return None
    if importlib.util.find_spec("sqlalchemy_envelope.jobs") is None:
        print("note: --migration skipped: sqlalchemy_envelope.jobs does not exist yet")
        return None
    from benchmarks import migration

    rss_rows = [int(n) for n in args.rss_rows.split(",") if n.strip()]
    return migration.run(
        pg_url,
        rows=args.migration_rows,
        rss_rows=rss_rows,
        batch_size=args.batch_size,
        rounds=args.migration_rounds,
        log=log,
    )


def _logger() -> Any:
    start = time.perf_counter()

    def log(message: str) -> None:
        print(f"[{time.perf_counter() - start:7.1f}s] {message}", file=sys.stderr, flush=True)

    return log


if __name__ == "__main__":
    sys.exit(main())
