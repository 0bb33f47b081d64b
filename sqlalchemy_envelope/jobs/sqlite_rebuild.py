"""The swap on SQLite: the table is rebuilt, keeping what a plain rebuild would lose.

SQLite cannot change a column in place (NOT NULL, for one), so the swap
copies the table with Alembic's batch mode: create a copy without the old
column, copy the rows, drop the table, rename the copy. Done naively, that
drop deletes or nulls the rows of other tables that reference this one (with
``PRAGMA foreign_keys`` on, ``ON DELETE CASCADE`` / ``SET NULL``), takes the
table's triggers with it, breaks the rename on a view of the table, forgets
``AUTOINCREMENT`` and its counter, and loses unnamed CHECK constraints. So,
following SQLite's own procedure for altering a table
(https://www.sqlite.org/lang_altertable.html#otheralter):

* foreign key enforcement is off for the swap (it can only change outside
  a transaction) and every reference is checked before the commit;
* ``legacy_alter_table`` is on for the rename, so views are left alone;
* triggers are re-created from their SQL, ``AUTOINCREMENT`` and its counter
  kept, CHECK constraints carried over, except those on the old column
  (they describe the old values; each is logged, as on the other databases).
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from ..errors import ConfigurationError


@contextmanager
def foreign_keys_off(conn: Connection) -> Iterator[bool]:
    """Foreign key enforcement off while the block runs; yields whether it was on."""
    with conn.begin():
        enforced = bool(conn.exec_driver_sql("PRAGMA foreign_keys").scalar())
    if not enforced:
        yield False
        return
    with conn.begin():  # pysqlite opens no transaction for a PRAGMA: this one takes effect
        conn.exec_driver_sql("PRAGMA foreign_keys = OFF")
    try:
        with conn.begin():
            if conn.exec_driver_sql("PRAGMA foreign_keys").scalar():
                raise ConfigurationError(
                    "SQLite kept enforcing foreign keys (the engine begins its transactions "
                    "itself); run the conversion with PRAGMA foreign_keys off"
                )
        yield True
    finally:
        with conn.begin():
            conn.exec_driver_sql("PRAGMA foreign_keys = ON")


def rebuild(
    conn: Connection,
    table: str,
    schema: str | None,
    column: str,
    shadow: str,
    nullable: bool,
    *,
    check_foreign_keys: bool,
) -> None:
    """Replace ``column`` by ``shadow`` (renamed to ``column``), in the open transaction."""
    from alembic.operations import Operations
    from alembic.runtime.migration import MigrationContext

    q = conn.dialect.identifier_preparer
    prefix = f"{q.quote(schema)}." if schema else ""
    # A rebuild killed before this transaction began may have left Alembic's copy behind.
    conn.exec_driver_sql(f"DROP TABLE IF EXISTS {prefix}{q.quote('_alembic_tmp_' + table)}")
    m = sa.table(
        "sqlite_master", *map(sa.column, ("type", "name", "tbl_name", "sql")), schema=schema
    )
    sequence = sa.table("sqlite_sequence", sa.column("name"), sa.column("seq"), schema=schema)
    create = conn.scalar(sa.select(m.c.sql).where(m.c.type == "table", m.c.name == table))
    triggers = [
        _in_schema(sql, q.quote(schema)) if schema else sql
        for sql in conn.scalars(
            sa.select(m.c.sql).where(m.c.type == "trigger", m.c.tbl_name == table)
        )
    ]
    autoincrement = re.search(r"\bAUTOINCREMENT\b", str(create), re.IGNORECASE) is not None
    counter = None
    if autoincrement:
        counter = conn.scalar(sa.select(sequence.c.seq).where(sequence.c.name == table))
    keep, drop = [], []
    for check in sa.inspect(conn).get_check_constraints(table, schema):
        if mentions(check["sqltext"], column):  # logged by the swap
            if check["name"]:
                drop.append(check["name"])
        elif not check["name"]:  # Alembic carries named ones itself, not unnamed ones
            keep.append(sa.CheckConstraint(sa.text(check["sqltext"])))
    broken_before = _broken_references(conn, prefix) if check_foreign_keys else Counter()
    legacy = conn.exec_driver_sql("PRAGMA legacy_alter_table").scalar()
    conn.exec_driver_sql("PRAGMA legacy_alter_table = ON")
    try:
        ops = Operations(MigrationContext.configure(conn))
        with ops.batch_alter_table(
            table, schema=schema, recreate="always", table_args=tuple(keep),
            table_kwargs={"sqlite_autoincrement": True} if autoincrement else {},
        ) as batch:  # fmt: skip
            for name in drop:
                batch.drop_constraint(name, type_="check")
            batch.drop_column(column)
            batch.alter_column(shadow, new_column_name=column, nullable=nullable)
    finally:
        conn.exec_driver_sql(f"PRAGMA legacy_alter_table = {int(bool(legacy))}")
    for sql in triggers:
        conn.exec_driver_sql(sql)
    if counter is not None:
        conn.execute(
            sa.update(sequence)
            .where(sequence.c.name == table)
            .values(seq=sa.func.max(sequence.c.seq, counter))
        )
    if check_foreign_keys:
        broken = _broken_references(conn, prefix) - broken_before
        if broken:
            raise ConfigurationError(
                f"{table}.{column}: after rebuilding the table, a row of {min(broken)[0]!s} no "
                "longer finds the row it references; nothing was swapped"
            )


def _broken_references(conn: Connection, prefix: str) -> Counter[tuple[object, ...]]:
    """How many rows of each table and foreign key find no parent (by key, not by rowid:
    a table without a rowid alias gets new rowids in the rebuild)."""
    rows = conn.exec_driver_sql(f"PRAGMA {prefix}foreign_key_check")
    return Counter((table, parent, fk) for table, _, parent, fk in rows)


def mentions(sql: str, column: str) -> bool:
    """Whether an expression's SQL names ``column`` (quoted or not, any case; not in strings)."""
    code = re.sub(r"'(?:[^']|'')*'", "''", sql)
    found = re.search(rf"(?<![\w$]){re.escape(column)}(?![\w$])", code, re.IGNORECASE)
    return found is not None


def _in_schema(sql: str, schema: str) -> str:
    """A trigger's stored SQL names no schema: re-create it in the attached database."""
    return re.sub(
        r"^(\s*CREATE\s+(?:TEMP\w*\s+)?TRIGGER\s+(?:IF\s+NOT\s+EXISTS\s+)?)",
        rf"\1{schema}.",
        sql,
        flags=re.IGNORECASE,
    )
