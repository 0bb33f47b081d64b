"""The timed work: five paths through SQLAlchemy, and the raw cipher alone (the floor).

Each path function does its setup untimed, then times exactly the work named
and returns seconds. Results are checked after timing, so a system that
returned wrong values could not look fast.
"""

from __future__ import annotations

import gc
import os
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, AESSIV
from sqlalchemy.orm import Session
from sqlalchemy.pool import StaticPool

from sqlalchemy_envelope import LocalKms

from .systems import SYSTEMS, Schema, System, build_schema, row_values

PATHS: tuple[str, ...] = ("core_insert", "core_select", "lookup", "orm_insert", "orm_select")
PATH_LABELS = {
    "core_insert": "Core executemany insert",
    "core_select": "Core select",
    "lookup": "deterministic == lookup",
    "orm_insert": "ORM add_all + flush",
    "orm_select": "ORM select entities",
}
#: Which direction of the cipher a path pays for (the floor it is compared with).
DIRECTION = {
    "core_insert": "encrypt",
    "core_select": "decrypt",
    "lookup": "encrypt",
    "orm_insert": "encrypt",
    "orm_select": "decrypt",
}


@dataclass
class Database:
    name: str
    label: str
    engine: sa.Engine
    schema: Schema

    def clear(self, table: sa.Table) -> None:
        with self.engine.begin() as conn:
            if self.engine.dialect.name == "postgresql":
                conn.execute(sa.text(f'TRUNCATE "{table.name}" RESTART IDENTITY'))
            else:
                conn.execute(table.delete())


@contextmanager
def sqlite_memory() -> Iterator[sa.Engine]:
    # One shared connection: the keyring lives in the same in-memory database.
    engine = sa.create_engine(
        "sqlite://", poolclass=StaticPool, connect_args={"check_same_thread": False}
    )
    try:
        yield engine
    finally:
        engine.dispose()


@contextmanager
def postgres_schema(url: str, **engine_options: Any) -> Iterator[sa.Engine]:
    """An engine whose connections see a fresh schema, dropped afterwards."""
    schema = f"bench_{uuid.uuid4().hex[:12]}"
    admin = sa.create_engine(url, poolclass=sa.NullPool)
    with admin.begin() as conn:
        conn.execute(sa.text(f'CREATE SCHEMA "{schema}"'))
    scoped = sa.make_url(url).update_query_dict({"options": f"-csearch_path={schema}"})
    engine = sa.create_engine(scoped, **engine_options)
    try:
        yield engine
    finally:
        engine.dispose()
        with admin.begin() as conn:
            conn.execute(sa.text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()


def open_database(
    name: str, label: str, engine: sa.Engine, systems: tuple[System, ...]
) -> Database:
    """Create the tables, configure the envelope, and create every data key (untimed)."""
    schema = build_schema(systems)
    schema.metadata.create_all(engine)
    schema.envelope.configure(kms=LocalKms(os.urandom(32)), engine=engine)
    db = Database(name, label, engine, schema)
    warm_up(db, systems)
    return db


def warm_up(db: Database, systems: tuple[System, ...]) -> None:
    """Run every path once on a few rows: keys created and unwrapped, statements compiled."""
    rows = row_values(50)
    for system in systems:
        table = db.schema.tables[system.key]
        core_insert(db, system, rows)
        core_select(db, system, len(rows))
        if system.lookup:
            lookup(db, system, [rows[0]["email"]])
        orm_insert(db, system, rows)
        orm_select(db, system, len(rows))
        db.clear(table)


# -- the paths ---------------------------------------------------------------------------
#: The clock: wall time (``perf_counter``, the default), or this process's CPU
#: time (``process_time``: steadier on a busy machine, but blind to the time the
#: Postgres server spends). ``run.py --clock`` sets it.
CLOCKS: dict[str, Callable[[], float]] = {"wall": time.perf_counter, "cpu": time.process_time}
clock = CLOCKS["wall"]


def set_clock(name: str) -> None:
    global clock
    clock = CLOCKS[name]


def _timed(work: Callable[[], Any]) -> tuple[float, Any]:
    gc.collect()
    start = clock()
    result = work()
    return clock() - start, result


def core_insert(db: Database, system: System, rows: list[dict[str, str]]) -> float:
    table = db.schema.tables[system.key]
    db.clear(table)
    with db.engine.begin() as conn:
        elapsed, _ = _timed(lambda: conn.execute(table.insert(), rows))
    with db.engine.connect() as conn:
        count = conn.execute(sa.select(sa.func.count()).select_from(table)).scalar_one()
    if count != len(rows):
        raise AssertionError(f"{system.key}: inserted {count} rows, not {len(rows)}")
    return elapsed


def core_select(db: Database, system: System, expected: int) -> float:
    table = db.schema.tables[system.key]
    stmt = sa.select(table.c.name, table.c.email)
    with db.engine.connect() as conn:
        elapsed, result = _timed(lambda: conn.execute(stmt).all())
    _check_rows(system, [(r.name, r.email) for r in result], expected)
    return elapsed


def lookup(db: Database, system: System, emails: list[str]) -> float:
    """One indexed ``email == value`` query per value; each must find its row."""
    table = db.schema.tables[system.key]
    email, id_ = table.c.email, table.c.id

    def work() -> list[Any]:
        with db.engine.connect() as conn:
            return [conn.execute(sa.select(id_).where(email == value)).scalar() for value in emails]

    elapsed, found = _timed(work)
    if any(f is None for f in found):
        raise AssertionError(f"{system.key}: an equality lookup found nothing")
    return elapsed


def orm_insert(db: Database, system: System, rows: list[dict[str, str]]) -> float:
    model = db.schema.models[system.key]
    db.clear(db.schema.tables[system.key])
    objects = [model(**row) for row in rows]  # built untimed: the same for every system
    with Session(db.engine) as session:

        def work() -> None:
            session.add_all(objects)
            session.flush()

        elapsed, _ = _timed(work)
        session.commit()
    return elapsed


def orm_select(db: Database, system: System, expected: int) -> float:
    model = db.schema.models[system.key]
    with Session(db.engine) as session:
        elapsed, objects = _timed(lambda: session.scalars(sa.select(model)).all())
        _check_rows(system, [(o.name, o.email) for o in objects], expected)
    return elapsed


def _check_rows(system: System, rows: list[tuple[str, str]], expected: int) -> None:
    if len(rows) != expected:
        raise AssertionError(f"{system.key}: read {len(rows)} rows, not {expected}")
    if rows and not (rows[0][0].startswith("Patient ") and rows[0][1].endswith("@example.org")):
        raise AssertionError(f"{system.key}: read back values that are not the ones written")


# -- one database, every path and system ------------------------------------------------
Times = dict[str, dict[str, list[float]]]


def run_paths(
    db: Database,
    systems: tuple[System, ...],
    floor: Floor,
    *,
    rows: int,
    repeat: int,
    lookups: int,
    log: Callable[[str], None] = print,
) -> tuple[Times, Times]:
    """``({path: {system: [seconds]}}, {path: {"gcm"|"siv": [seconds per value]}})``.

    Repetitions are interleaved (one of each system, then again), and each
    round also times the raw cipher, so a slow patch on a shared machine hits
    every system and the floor they are compared with, rather than one.
    """
    data = row_values(rows)
    step = max(1, rows // max(1, lookups))
    emails = [row["email"] for row in data[::step]][:lookups]
    times: Times = {}
    floors: Times = {}
    for path in PATHS:  # in this order: the select paths read what the inserts wrote
        todo = [s for s in systems if path != "lookup" or s.lookup]
        per_system: dict[str, list[float]] = {s.key: [] for s in todo}
        per_cipher: dict[str, list[float]] = {"gcm": [], "siv": []}
        for rep in range(repeat):
            for system in todo:
                if path == "core_insert":
                    elapsed = core_insert(db, system, data)
                elif path == "orm_insert":
                    elapsed = orm_insert(db, system, data)
                elif path == "lookup":
                    elapsed = lookup(db, system, emails)
                elif path == "core_select":
                    elapsed = core_select(db, system, rows)
                else:
                    elapsed = orm_select(db, system, rows)
                per_system[system.key].append(elapsed)
            for algorithm in per_cipher:
                per_cipher[algorithm].append(
                    floor.seconds_per_value(f"{algorithm}_{DIRECTION[path]}")
                )
            log(f"  {db.name} {path}: repetition {rep + 1}/{repeat} done")
        times[path] = per_system
        floors[path] = per_cipher
    return times, floors


# -- the floor: the raw cipher alone -----------------------------------------------------
class Floor:
    """The raw cipher alone: AES-256-GCM and AES-SIV with ``cryptography``, in a Python loop.

    The same values as the tables hold (encoded), associated data of the same
    size as ours, a fresh 96-bit nonce from ``os.urandom`` per GCM value: the
    least any correct Python implementation has to pay per value.
    """

    NAMES = ("gcm_encrypt", "gcm_decrypt", "siv_encrypt", "siv_decrypt")

    def __init__(self, rows: int) -> None:
        self.values = [v.encode() for row in row_values(rows) for v in row.values()]
        self.aad = b"\x01\x01\x00\x00\x00\x01\x00\x0bbench_table\x00\x05email"
        self.gcm = AESGCM(os.urandom(32))
        self.siv = AESSIV(os.urandom(64))
        self.gcm_sealed = self.gcm_encrypt()
        self.siv_sealed = self.siv_encrypt()
        if self.gcm_decrypt() != self.values or self.siv_decrypt() != self.values:
            raise AssertionError("the raw cipher did not round-trip")

    def gcm_encrypt(self) -> list[bytes]:
        urandom, encrypt, aad = os.urandom, self.gcm.encrypt, self.aad
        out = []
        for value in self.values:
            nonce = urandom(12)
            out.append(nonce + encrypt(nonce, value, aad))
        return out

    def gcm_decrypt(self) -> list[bytes]:
        decrypt, aad = self.gcm.decrypt, self.aad
        return [decrypt(v[:12], v[12:], aad) for v in self.gcm_sealed]

    def siv_encrypt(self) -> list[bytes]:
        encrypt, aad = self.siv.encrypt, [self.aad]
        return [encrypt(v, aad) for v in self.values]

    def siv_decrypt(self) -> list[bytes]:
        decrypt, aad = self.siv.decrypt, [self.aad]
        return [decrypt(v, aad) for v in self.siv_sealed]

    def seconds_per_value(self, name: str) -> float:
        elapsed, _ = _timed(getattr(self, name))
        return elapsed / len(self.values)


__all__ = ["PATHS", "SYSTEMS", "Database", "Floor", "open_database", "run_paths"]
