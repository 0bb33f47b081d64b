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
  (they describe the old values; each is logged, as on the other databases);
* other columns keep their ``COLLATE`` (SQLAlchemy's reflection, which the
  batch mode copies the table from, does not report it): a ``COLLATE NOCASE``
  unique column stays case-insensitive.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from itertools import pairwise
from typing import Any

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
    uniques: list[tuple[str | None, tuple[str, ...]]],
    *,
    check_foreign_keys: bool,
) -> None:
    """Replace ``column`` by ``shadow`` (renamed to ``column``), in the open transaction.

    ``uniques``: ``(name, columns)`` of the unique constraints on ``column``,
    which its drop takes along; they are declared again on the new table.
    """
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
    keep: list[sa.Constraint] = []
    drop: list[str] = []
    for check in sa.inspect(conn).get_check_constraints(table, schema):
        if mentions(check["sqltext"], column):  # logged by the swap
            if check["name"]:
                drop.append(check["name"])
        elif not check["name"]:  # Alembic carries named ones itself, not unnamed ones
            keep.append(sa.CheckConstraint(sa.text(check["sqltext"])))
    definitions = column_definitions(str(create))
    collations = {
        name.lower(): collation
        for name, collation in column_collations(definitions).items()
        if name.lower() != column.lower()
    }

    def keep_collation(inspector: object, table: sa.Table, info: dict[str, Any]) -> None:
        collation = collations.get(info["name"].lower())
        if collation is not None and isinstance(info["type"], sa.String):
            info["type"].collation = collation

    # Inline UNIQUE after a type with a length (``email VARCHAR(80) UNIQUE``) is not
    # reflected, so neither the batch copy nor the swap knows it: declared here.
    reflected = {
        tuple(c.lower() for c in u["column_names"])
        for u in sa.inspect(conn).get_unique_constraints(table, schema)
    }
    uniques = uniques + [
        (name, (col,)) for col, name in inline_uniques(definitions).items()
        if (col.lower(),) not in reflected
    ]  # fmt: skip
    # In the batch's copy the renamed shadow keeps its old name as its key.
    keep += [
        sa.UniqueConstraint(*(shadow if c == column else c for c in columns), name=name)
        for name, columns in uniques
    ]
    broken_before = _broken_references(conn, prefix) if check_foreign_keys else Counter()
    legacy = conn.exec_driver_sql("PRAGMA legacy_alter_table").scalar()
    conn.exec_driver_sql("PRAGMA legacy_alter_table = ON")
    try:
        ops = Operations(MigrationContext.configure(conn))
        with ops.batch_alter_table(
            table, schema=schema, recreate="always", table_args=tuple(keep),
            table_kwargs={"sqlite_autoincrement": True} if autoincrement else {},
            reflect_kwargs={"listeners": [("column_reflect", keep_collation)]},
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


#: A token of SQLite's SQL.
_TOKEN = re.compile(
    r"""
      "(?:[^"]|"")*"       # a "quoted name"
    | `(?:[^`]|``)*`       # a `quoted name`
    | \[[^\]]*\]           # a [quoted name]
    | '(?:[^']|'')*'       # a 'string'
    | --[^\n]*             # a comment to the end of the line
    | /\*.*?(?:\*/|$)      # a /* comment */
    | [(),]
    | (?:[^\s(),"'`\[/-]|/(?!\*)|-(?!-))+  # a word, up to a comment's start
    """,
    re.VERBOSE | re.DOTALL,
)
_TABLE_CONSTRAINTS = frozenset({"CONSTRAINT", "PRIMARY", "UNIQUE", "CHECK", "FOREIGN"})


def column_definitions(create_table: str) -> dict[str, list[str]]:
    """``{column: its definition's words}`` of a ``CREATE TABLE``, outside parentheses
    (not a CHECK's expression, say); table constraints left out."""
    definitions: list[list[str]] = [[]]
    depth = 0
    for part in _TOKEN.findall(create_table):
        if part.startswith(("--", "/*")):
            continue
        if part == "(":
            depth += 1
        elif part == ")":
            depth -= 1
            if depth == 0:
                break
        elif depth == 1:
            if part == ",":
                definitions.append([])
            else:
                definitions[-1].append(part)
    return {
        _unquoted(words[0]): words[1:]
        for words in definitions
        if words and words[0].upper() not in _TABLE_CONSTRAINTS
    }


def column_collations(definitions: dict[str, list[str]]) -> dict[str, str]:
    """``{column: collation}`` of the columns declared with ``COLLATE``."""
    return {
        column: _unquoted(name)
        for column, words in definitions.items()
        for word, name in pairwise(words)
        if word.upper() == "COLLATE"
    }


def inline_uniques(definitions: dict[str, list[str]]) -> dict[str, str | None]:
    """``{column: constraint name or None}`` of the columns declared ``UNIQUE`` themselves."""
    found: dict[str, str | None] = {}
    for column, words in definitions.items():
        upper = [w.upper() for w in words]
        if "UNIQUE" in upper:
            at = upper.index("UNIQUE")
            named = at >= 2 and upper[at - 2] == "CONSTRAINT"
            found[column] = _unquoted(words[at - 1]) if named else None
    return found


def _unquoted(name: str) -> str:
    if name[:1] in ('"', "`", "'"):
        return name[1:-1].replace(name[0] * 2, name[0])
    return name[1:-1] if name.startswith("[") else name


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
