"""The benchmarks keep working: ``benchmarks/run.py --smoke`` runs and prints its tables.

Never asserts a timing: CI machines are too noisy for that, and the numbers
belong in docs/PERFORMANCE.md, not in a test. Postgres joins in when
``SQLALCHEMY_ENVELOPE_TEST_DATABASE_URL`` is set (as in CI).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

from .conftest import PG_ENV, _unavailable

ROOT = Path(__file__).resolve().parent.parent
RUN = ROOT / "benchmarks" / "run.py"
PATHS = (
    "Core executemany insert",
    "Core select",
    "deterministic == lookup",
    "ORM add_all + flush",
    "ORM select entities",
)
SYSTEMS = (
    "plaintext",
    "Encrypted (randomized)",
    "Encrypted (deterministic)",
    "sqlalchemy-utils AesGcmEngine",
    "sqlalchemy-utils FernetEngine",
)


def _run(*args: str, out: Path) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        [sys.executable, str(RUN), "--smoke", "--out", str(out), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    return done


def test_smoke_run_prints_the_table(tmp_path: Path) -> None:
    done = _run("--hotpath", out=tmp_path)
    out = done.stdout
    assert "SQLite (in memory)" in out
    assert "raw cipher (the floor)" in out
    assert "Hot path alone" in out
    for label in PATHS + SYSTEMS:
        assert label in out
    assert "÷ cipher" in out and "x plain" in out
    assert "KMS economy" in out and "kms_calls = " in out
    if os.environ.get(PG_ENV):
        assert "PostgreSQL:" in out
    else:
        assert "Postgres skipped" in out

    (result,) = tmp_path.glob("bench-*.json")
    payload = json.loads(result.read_text())
    assert set(payload["databases"]["sqlite"]["summary"]) == {
        "core_insert",
        "core_select",
        "lookup",
        "orm_insert",
        "orm_select",
    }
    # The KMS economy run counts unwraps: one per data key, not per row.
    economy = payload["kms_economy"]["sqlite"]
    assert economy["cold_process"]["kms_calls"] == 3
    assert economy["cold_threads"]["kms_calls"] == 1
    if importlib.util.find_spec("matplotlib") is not None:
        assert list(tmp_path.glob("bench-*.png"))


def test_smoke_migration_on_postgres(tmp_path: Path) -> None:
    if not os.environ.get(PG_ENV):
        _unavailable(f"the migration benchmark needs PostgreSQL, and {PG_ENV} is not set")
    done = _run("--no-sqlite", "--no-economy", "--migration", out=tmp_path)
    assert "Migration (PostgreSQL" in done.stdout
    for job in ("update", "encrypt_column", "reencrypt"):
        assert job in done.stdout
