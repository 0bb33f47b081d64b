"""The repository's sample Alembic environment (alembic/), run as an operator runs it."""

from __future__ import annotations

import base64
import importlib.util
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import sqlalchemy as sa

from sqlalchemy_envelope import LocalKms, wire

SAMPLE = Path(__file__).resolve().parent.parent / "alembic"
ROWS = 3000


class Alembic:
    def __init__(self, ini: Path, url: str, key: bytes) -> None:
        self.ini = ini
        self.env = {
            **os.environ,
            "DATABASE_URL": url,
            "SQLALCHEMY_ENVELOPE_MASTER_KEY": base64.b64encode(key).decode(),
        }
        self.env.pop("SQLALCHEMY_ENVELOPE_KMS", None)

    def __call__(self, *args: str, ok: bool = True) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(
            [sys.executable, "-m", "alembic", "-c", str(self.ini), *args],
            env=self.env,
            capture_output=True,
            text=True,
            cwd=self.ini.parent,
            timeout=300,
        )
        if ok and done.returncode != 0:
            pytest.fail(f"alembic {' '.join(args)} failed:\n{done.stdout}\n{done.stderr}")
        return done


def sample_models() -> ModuleType:
    """A fresh import of alembic/models.py (its own Base and Envelope)."""
    spec = importlib.util.spec_from_file_location(
        f"sample_models_{os.urandom(4).hex()}", SAMPLE / "models.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # SQLAlchemy resolves the annotations through it
    spec.loader.exec_module(module)
    return module


def people(i: int) -> dict[str, Any]:
    return {
        "id": i,
        "name": f"Ann Example {i}",
        "ssn": None if i % 10 == 0 else f"{i:04d}-SS-{i % 1000:03d}",
        "city": "Oslo",
    }


def plaintext(engine: sa.Engine) -> list[tuple[Any, ...]]:
    with engine.connect() as conn:
        return [
            tuple(r)
            for r in conn.execute(sa.text("SELECT id, name, ssn, city FROM patients ORDER BY id"))
        ]


def decrypted(engine: sa.Engine, key: bytes) -> list[tuple[Any, ...]]:
    models = sample_models()
    models.envelope.configure(kms=LocalKms(key), engine=engine)
    p = models.Patient
    with engine.connect() as conn:
        return [
            tuple(r) for r in conn.execute(sa.select(p.id, p.name, p.ssn, p.city).order_by(p.id))
        ]


def check_encrypted(engine: sa.Engine, key: bytes, expected: list[tuple[Any, ...]]) -> None:
    assert decrypted(engine, key) == expected
    with engine.connect() as conn:
        raw = conn.execute(sa.text("SELECT name, ssn FROM patients")).all()
    stored = [bytes(v) for row in raw for v in row if v is not None]
    assert len(stored) == len(expected) + sum(1 for r in expected if r[2] is not None)
    assert all(wire.parse_header(v) is not None for v in stored)
    assert not any(b"Ann Example" in v or b"-SS-" in v for v in stored)
    types = {c["name"]: c["type"] for c in sa.inspect(engine).get_columns("patients")}
    assert isinstance(types["name"], sa.LargeBinary) and isinstance(types["ssn"], sa.LargeBinary)


@pytest.mark.postgres
def test_sample_upgrade_downgrade_upgrade(
    pg_url: str, make_engine: Callable[..., sa.Engine]
) -> None:
    key = os.urandom(32)
    alembic = Alembic(SAMPLE / "alembic.ini", pg_url, key)
    engine = make_engine(pg_url)
    alembic("upgrade", "0001")
    with engine.begin() as conn:
        conn.execute(
            sa.text("INSERT INTO patients (id, name, ssn, city) VALUES (:id, :name, :ssn, :city)"),
            [people(i) for i in range(1, ROWS + 1)],
        )
    expected = plaintext(engine)

    upgraded = alembic("upgrade", "head")
    assert "encrypt_column patients.ssn: finished" in upgraded.stderr  # progress is logged...
    assert "Ann Example" not in upgraded.stderr + upgraded.stdout  # ...never values
    check_encrypted(engine, key, expected)
    checked = alembic("check")  # autogenerate sees nothing left to do
    assert "No new upgrade operations detected" in checked.stdout + checked.stderr
    duplicate = "UPDATE patients SET ssn = (SELECT ssn FROM patients WHERE id = 1) WHERE id = 2"
    with engine.connect() as conn, pytest.raises(sa.exc.IntegrityError):
        conn.execute(sa.text(duplicate))  # the unique constraint on ssn came along

    alembic("downgrade", "0001")
    assert plaintext(engine) == expected
    types = {c["name"]: c["type"] for c in sa.inspect(engine).get_columns("patients")}
    assert isinstance(types["name"], sa.String) and types["name"].length == 200

    alembic("upgrade", "head")
    check_encrypted(engine, key, expected)

    offline = alembic("upgrade", "0001:head", "--sql", ok=False)
    assert offline.returncode != 0 and "offline (--sql) mode" in offline.stderr
    ddl = alembic("upgrade", "0001", "--sql").stdout  # pure DDL works offline
    assert "CREATE TABLE envelope_data_keys" in ddl and "CREATE TABLE patients" in ddl


def test_autogenerate_writes_a_migration_that_runs(
    tmp_path: Path, make_engine: Callable[..., sa.Engine]
) -> None:
    """`alembic revision --autogenerate` against the plaintext schema, in a copy of the sample."""
    env = tmp_path / "alembic"
    shutil.copytree(
        SAMPLE, env, ignore=shutil.ignore_patterns("__pycache__", "0002_*", "*.db", "*.key")
    )
    url = f"sqlite:///{tmp_path / 'app.db'}"
    key = os.urandom(32)
    alembic = Alembic(env / "alembic.ini", url, key)
    engine = make_engine(url)
    alembic("upgrade", "head")
    with engine.begin() as conn:
        conn.execute(
            sa.text("INSERT INTO patients (id, name, ssn, city) VALUES (:id, :name, :ssn, :city)"),
            [people(i) for i in range(1, 201)],
        )
    expected = plaintext(engine)

    alembic("revision", "--autogenerate", "-m", "encrypt patients")
    (script,) = (env / "versions").glob("*encrypt_patients.py")
    text = script.read_text()
    assert "import sqlalchemy_envelope" in text
    encrypted = "sqlalchemy_envelope.Encrypted(sa.String(length=200))"
    assert f"op.encrypt_column('patients', 'name', {encrypted})" in text
    assert "op.decrypt_column('patients', 'ssn', sa.String(length=11), scope='patients')" in text

    alembic("upgrade", "head")
    check_encrypted(engine, key, expected)
    alembic("downgrade", "-1")
    assert plaintext(engine) == expected
