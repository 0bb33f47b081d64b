"""Core statements: insert, executemany, update, upserts, RETURNING, on SQLite and Postgres."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import sqlalchemy as sa
from sqlalchemy.dialects import mysql, postgresql, sqlite

from sqlalchemy_envelope import Encrypted, Envelope, LocalKms


@pytest.fixture
def people(
    any_db_url: str, make_engine: Callable[..., sa.Engine], local_kms: LocalKms
) -> tuple[sa.Engine, sa.Table]:
    metadata = sa.MetaData()
    envelope = Envelope(metadata)
    table = sa.Table(
        "people",
        metadata,
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("email", Encrypted(sa.String(100), envelope, deterministic=True), unique=True),
        sa.Column("name", Encrypted(sa.String(100), envelope)),
        sa.Column("age", Encrypted(sa.Integer, envelope)),
    )
    engine = make_engine(any_db_url)
    metadata.create_all(engine)
    envelope.configure(kms=local_kms, engine=engine)
    return engine, table


def test_insert_values_executemany_update_delete(people: tuple[sa.Engine, sa.Table]) -> None:
    engine, t = people
    with engine.begin() as conn:
        conn.execute(t.insert().values(id=1, email="a@x", name="Ann", age=30))
        conn.execute(
            t.insert(),
            [{"id": i, "email": f"u{i}@x", "name": f"User {i}", "age": i} for i in range(2, 52)],
        )
        conn.execute(t.update().where(t.c.email == "u7@x").values(name="Seven"))
        conn.execute(t.update().where(t.c.id == 8).values(age=None))
        conn.execute(t.delete().where(t.c.email.in_(["u9@x", "u10@x"])))
    with engine.connect() as conn:
        rows = {r.id: r for r in conn.execute(sa.select(t))}
    assert len(rows) == 49
    assert rows[1].name == "Ann" and rows[1].age == 30
    assert rows[7].name == "Seven" and rows[8].age is None and 9 not in rows
    assert all(rows[i].email == f"u{i}@x" for i in rows if i > 1)


def test_returning(people: tuple[sa.Engine, sa.Table]) -> None:
    engine, t = people
    with engine.begin() as conn:
        got = conn.execute(
            t.insert().values(id=1, email="r@x", name="Ret", age=1).returning(t.c.name, t.c.email)
        ).one()
    assert tuple(got) == ("Ret", "r@x")


def test_upsert(people: tuple[sa.Engine, sa.Table]) -> None:
    engine, t = people
    with engine.begin() as conn:
        conn.execute(t.insert().values(id=1, email="a@x", name="Old", age=1))
        if engine.dialect.name == "mysql":
            stmt = mysql.insert(t).values(id=1, email="a@x", name="New", age=2)
            conn.execute(stmt.on_duplicate_key_update(name=stmt.inserted.name, age=3))
            dup = mysql.insert(t).values(id=2, email="a@x", name="Dup", age=5)
            conn.execute(dup.prefix_with("IGNORE"))
        else:
            insert = postgresql.insert if engine.dialect.name == "postgresql" else sqlite.insert
            stmt = insert(t).values(id=1, email="a@x", name="New", age=2)
            conn.execute(
                stmt.on_conflict_do_update(
                    index_elements=[t.c.id], set_={"name": stmt.excluded.name, "age": 3}
                )
            )
            # same email under the same key: the unique index sees the duplicate
            dup = insert(t).values(id=2, email="a@x", name="Dup", age=5)
            conn.execute(dup.on_conflict_do_nothing())
    with engine.connect() as conn:
        assert conn.execute(sa.select(t.c.id, t.c.name, t.c.age)).all() == [(1, "New", 3)]


def test_deterministic_unique_constraint(people: tuple[sa.Engine, sa.Table]) -> None:
    engine, t = people
    with engine.begin() as conn:
        conn.execute(t.insert().values(id=1, email="same@x", name="A"))
    with pytest.raises(sa.exc.IntegrityError), engine.begin() as conn:
        conn.execute(t.insert().values(id=2, email="same@x", name="B"))


def test_equal_plaintexts_differ_across_columns_and_randomized_rows(
    people: tuple[sa.Engine, sa.Table],
) -> None:
    engine, t = people
    with engine.begin() as conn:
        conn.execute(
            t.insert(), [{"id": 1, "email": "x", "name": "x"}, {"id": 2, "email": "y", "name": "x"}]
        )
        raw = conn.execute(sa.text("SELECT email, name FROM people ORDER BY id")).all()
    assert raw[0][0] != raw[0][1]  # same plaintext, other column: other sub-key
    assert raw[0][1] != raw[1][1]  # randomized: same plaintext, other ciphertext


def test_cached_lookup_statements_encrypt_each_new_value(
    people: tuple[sa.Engine, sa.Table],
) -> None:
    engine, t = people
    with engine.begin() as conn:
        conn.execute(
            t.insert(),
            [
                {"id": 1, "email": "one@x", "name": "One"},
                {"id": 2, "email": "two@x", "name": "Two"},
            ],
        )
    cache: dict[object, object] = {}
    with engine.connect().execution_options(compiled_cache=cache) as conn:
        first = conn.execute(sa.select(t.c.name).where(t.c.email == "one@x")).scalars().all()
        second = conn.execute(sa.select(t.c.name).where(t.c.email == "two@x")).scalars().all()
    assert (first, second) == (["One"], ["Two"])
    assert len(cache) == 1  # one compiled form, two different lookups


def test_deterministic_lookups_treat_null_as_sql_does(
    people: tuple[sa.Engine, sa.Table],
) -> None:
    engine, t = people
    with engine.begin() as conn:
        conn.execute(t.insert(), [{"id": 1, "email": "a@x"}, {"id": 2, "email": None}])

    def ids(*where: sa.ColumnElement[bool]) -> list[int]:
        with engine.connect() as conn:
            return list(conn.execute(sa.select(t.c.id).where(*where).order_by(t.c.id)).scalars())

    assert ids(t.c.email == sa.null()) == ids(t.c.email.is_(None)) == [2]
    assert ids(t.c.email != sa.null()) == [1]
    assert ids(t.c.email.in_(["a@x", None])) == [1]  # NULL equals nothing, as in SQL
    assert ids(t.c.email.not_in(["b@x"])) == [1]  # NOT IN is unknown for a NULL row
    assert ids(t.c.email.not_in([None])) == []  # NOT IN (NULL) is never true
    assert ids(t.c.email.not_in(["b@x", None])) == []


def test_building_statements_needs_no_configuration() -> None:
    from sqlalchemy_envelope import ConfigurationError

    metadata = sa.MetaData()
    envelope = Envelope(metadata)
    t = sa.Table(
        "t",
        metadata,
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("e", Encrypted(sa.String(10), envelope, deterministic=True)),
    )
    stmt = sa.select(t).where(t.c.e == "x", t.c.e.in_(["y"]))  # no KMS, no engine: fine
    engine = sa.create_engine("sqlite://")
    metadata.create_all(engine)  # DDL needs no KMS either
    with engine.connect() as conn, pytest.raises(ConfigurationError, match="configure"):
        conn.execute(stmt)
