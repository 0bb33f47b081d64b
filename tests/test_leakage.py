"""What the stored values reveal anyway (docs/SECURITY.md, "What a database reader learns").

These tests pin down the honest list: lengths, NULLness, equality in
deterministic columns, ciphertext ordering, and unique constraints that are
blind across keys. Each is shown on SQLite and Postgres.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import pytest
import sqlalchemy as sa

from sqlalchemy_envelope import Encrypted, Envelope, LocalKms, wire


class Db:
    def __init__(self, url: str, make_engine: Callable[..., sa.Engine]) -> None:
        self.metadata = sa.MetaData()
        self.envelope = Envelope(self.metadata)
        e = self.envelope
        self.t = sa.Table(
            "people",
            self.metadata,
            sa.Column("id", sa.Integer, primary_key=True),
            sa.Column("name", Encrypted(sa.String(100), e)),
            sa.Column("city", Encrypted(sa.String(100), e, deterministic=True)),  # not unique
            sa.Column("town", Encrypted(sa.String(100), e, deterministic=True)),
            sa.Column("email", Encrypted(sa.String(100), e, deterministic=True), unique=True),
            sa.Column("salary", Encrypted(sa.Integer, e)),
            sa.Column("notes", Encrypted(sa.JSON, e)),
        )
        self.engine = make_engine(url)
        self.metadata.create_all(self.engine)
        self.envelope.configure(kms=LocalKms(os.urandom(32)), engine=self.engine)

    def insert(self, *rows: dict[str, Any]) -> None:
        with self.engine.begin() as conn:
            conn.execute(self.t.insert(), list(rows))

    def raw(self, column: str, row_id: int) -> bytes | None:
        with self.engine.connect() as conn:
            value = conn.execute(
                sa.text(f"SELECT {column} FROM people WHERE id = :id"), {"id": row_id}
            ).scalar_one()
        return None if value is None else bytes(value)


@pytest.fixture
def db(db_url: str, make_engine: Callable[..., sa.Engine]) -> Db:
    return Db(db_url, make_engine)


def test_lengths_are_visible(db: Db) -> None:
    db.insert(
        {"id": 1, "name": "Al", "salary": 5, "email": "1"},
        {"id": 2, "name": "Bartholomew Montgomery", "salary": 5_000_000, "email": "2"},
    )
    short, long = db.raw("name", 1), db.raw("name", 2)
    assert short is not None and long is not None
    assert len(long) - len(short) == len("Bartholomew Montgomery") - len("Al")
    # Integers are stored as decimal digits: the length reveals the magnitude.
    small, big = db.raw("salary", 1), db.raw("salary", 2)
    assert small is not None and big is not None
    assert len(big) - len(small) == 6


def test_null_stays_null(db: Db) -> None:
    db.insert({"id": 1, "name": None, "city": None, "salary": None, "notes": None, "email": "x"})
    for column in ("name", "city", "salary", "notes"):
        assert db.raw(column, 1) is None
    with db.engine.connect() as conn:
        assert conn.execute(sa.select(db.t.c.id).where(db.t.c.name.is_(None))).scalar_one() == 1


def test_deterministic_columns_reveal_equal_values_across_rows(db: Db) -> None:
    db.insert(
        {"id": 1, "city": "Springfield", "town": "Springfield", "email": "a"},
        {"id": 2, "city": "Springfield", "town": "Shelbyville", "email": "b"},
        {"id": 3, "city": "Shelbyville", "town": "Springfield", "email": "c"},
    )
    # Same column, same key: equal plaintexts are equal ciphertexts.
    assert db.raw("city", 1) == db.raw("city", 2) != db.raw("city", 3)
    # Another column: its own sub-key, so no equality across columns.
    assert db.raw("town", 1) != db.raw("city", 1)
    assert db.raw("town", 1) == db.raw("town", 3)


def test_rotation_changes_deterministic_ciphertext_but_lookups_still_match(db: Db) -> None:
    db.insert({"id": 1, "city": "Springfield", "email": "a"})
    db.envelope.rotate("people")
    db.insert({"id": 2, "city": "Springfield", "email": "b"})
    assert db.raw("city", 1) != db.raw("city", 2)
    with db.engine.connect() as conn:
        found = conn.execute(sa.select(db.t.c.id).where(db.t.c.city == "Springfield")).scalars()
        assert sorted(found) == [1, 2]


def test_randomized_columns_reveal_no_equality(db: Db) -> None:
    db.insert({"id": 1, "name": "Same", "email": "a"}, {"id": 2, "name": "Same", "email": "b"})
    assert db.raw("name", 1) != db.raw("name", 2)


def test_unique_constraint_is_blind_across_keys(db: Db) -> None:
    db.insert({"id": 1, "email": "dup@x.org"})
    with pytest.raises(sa.exc.IntegrityError):
        db.insert({"id": 2, "email": "dup@x.org"})  # same key: the constraint sees it
    db.envelope.rotate("people")
    db.insert({"id": 3, "email": "dup@x.org"})  # new key: a second row with the same email
    with db.engine.connect() as conn:
        stmt = sa.select(db.t.c.id).where(db.t.c.email == "dup@x.org").order_by(db.t.c.id)
        assert list(conn.execute(stmt).scalars()) == [1, 3]


def test_order_by_orders_ciphertext(db: Db) -> None:
    names = [f"person-{chr(ord('a') + i)}" for i in range(20)]  # plaintext order = id order
    db.insert(*({"id": i, "name": n, "email": str(i)} for i, n in enumerate(names)))
    with db.engine.connect() as conn:
        by_name = list(conn.execute(sa.select(db.t.c.id).order_by(db.t.c.name)).scalars())
    by_bytes = sorted(range(20), key=lambda i: db.raw("name", i) or b"")
    assert by_name == by_bytes  # the database sorts the stored bytes
    assert by_name != list(range(20))  # not the plaintext order (1 in 20! by chance)


def test_header_reveals_key_id_and_mode(db: Db) -> None:
    db.insert({"id": 1, "name": "n", "city": "c", "email": "e"})
    key = db.envelope.keys("people")[0].id
    name, city = db.raw("name", 1), db.raw("city", 1)
    assert name is not None and city is not None
    assert wire.parse_header(name) == (wire.RANDOMIZED, key)
    assert wire.parse_header(city) == (wire.DETERMINISTIC, key)


def test_json_length_follows_its_serialization(db: Db) -> None:
    db.insert(
        {"id": 1, "notes": {"a": 1}, "email": "a"}, {"id": 2, "notes": {"a": 10}, "email": "b"}
    )
    one, two = db.raw("notes", 1), db.raw("notes", 2)
    assert one is not None and two is not None and len(two) == len(one) + 1
