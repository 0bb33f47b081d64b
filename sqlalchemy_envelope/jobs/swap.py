"""The last step of an in-place column conversion: the shadow column takes the column's place.

One atomic step per database, so a crash leaves either the old column or the
new one, never a table without either:

* PostgreSQL: one transaction (DDL is transactional) that first locks the
  table, so no write slips in between the last fill and the drop.
* SQLite: one transaction holding the database's write lock; the table is
  rebuilt (SQLite cannot add NOT NULL in place), see :mod:`~.sqlite_rebuild`.
* MySQL/MariaDB: ``LOCK TABLES ... WRITE`` for the last fill, then one
  ``ALTER TABLE`` that drops the column, renames the shadow and re-creates
  the indexes together (a single DDL statement is atomic there).

On PostgreSQL and MySQL the wait for the table lock is kept short and
retried (:mod:`~.locks`), since the application's queries queue behind a
waiting lock.

Indexes and unique constraints on the column are re-created on the new one
under their names; NOT NULL is restored. Foreign keys, CHECK constraints,
defaults and expression or partial indexes that involve the column are not,
since they describe the old values (each is logged).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection
from sqlalchemy.schema import CreateColumn

from ..errors import ConfigurationError
from . import sqlite_rebuild, trigger
from .batches import sqlite_write_lock
from .locks import briefly_locking

log = logging.getLogger("sqlalchemy_envelope")

FillRest = Callable[[], int]


@dataclass(frozen=True)
class Index:
    name: str
    columns: tuple[str, ...]
    unique: bool
    constraint: bool  # a UNIQUE constraint rather than an index
    named: bool = True  # False: an unnamed constraint (SQLite), ``name`` made up


def swap(
    conn: Connection,
    table: str,
    schema: str | None,
    column: str,
    shadow: str,
    new_type: sa.types.TypeEngine[Any],
    fill_rest: FillRest,
    between_tries: Callable[[], None] | None = None,
) -> None:
    """Replace ``column`` by ``shadow`` (of ``new_type``) after filling the rows still missing.

    ``between_tries`` runs while the swap waits to try its table lock again.
    """
    dialect = conn.dialect.name
    q = conn.dialect.identifier_preparer
    qt = q.format_table(sa.table(table, schema=schema))
    if dialect == "mysql":  # also MariaDB

        def mysql_lock() -> None:
            conn.exec_driver_sql(f"LOCK TABLES {qt} WRITE")

        def mysql_step() -> None:
            try:
                _check_trigger(conn, table, schema, column, shadow)
                _finish_fill(fill_rest, table, column)
                trigger.remove(conn, table, schema, shadow)
                nullable, indexes = _schema(conn, table, schema, column)
                spec = _column_spec(conn, column, new_type, nullable)
                clauses = [f"DROP INDEX {q.quote(i.name)}" for i in indexes]
                clauses += [
                    f"DROP COLUMN {q.quote(column)}",
                    f"CHANGE COLUMN {q.quote(shadow)} {spec}",
                ]
                clauses += [_add_index_clause(q, i) for i in indexes]
                conn.exec_driver_sql(f"ALTER TABLE {qt} {', '.join(clauses)}")
            finally:
                conn.exec_driver_sql("UNLOCK TABLES")

        what = f"{table}.{column}: swap"
        briefly_locking(conn, what, mysql_step, lock=mysql_lock, between=between_tries)
        log.info("swapped %s.%s for its converted copy", table, column)
        return

    def lock() -> None:
        if dialect == "postgresql":
            conn.exec_driver_sql(f"LOCK TABLE {qt} IN ACCESS EXCLUSIVE MODE")
        else:
            sqlite_write_lock(conn, table, schema, shadow)

    def step() -> tuple[bool, list[Index]]:
        _check_trigger(conn, table, schema, column, shadow)
        _finish_fill(fill_rest, table, column)
        trigger.remove(conn, table, schema, shadow)
        nullable, indexes = _schema(conn, table, schema, column)
        if dialect == "postgresql":
            kept = _pg_comment_and_grants(conn, qt, column)
            conn.exec_driver_sql(f"ALTER TABLE {qt} DROP COLUMN {q.quote(column)}")
            conn.exec_driver_sql(
                f"ALTER TABLE {qt} RENAME COLUMN {q.quote(shadow)} TO {q.quote(column)}"
            )
            if not nullable:
                conn.exec_driver_sql(
                    f"ALTER TABLE {qt} ALTER COLUMN {q.quote(column)} SET NOT NULL"
                )
            for index in indexes:
                conn.exec_driver_sql(_create_index(q, qt, index))
            for statement in kept:
                conn.exec_driver_sql(statement)
        else:
            for index in indexes:  # batch mode cannot carry them across a drop-and-rename
                if not index.constraint:
                    conn.exec_driver_sql(f"DROP INDEX {q.quote(index.name)}")
            uniques = [  # only a rebuild adds a constraint on SQLite: this one
                (i.name if i.named else None, i.columns) for i in indexes if i.constraint
            ]
            sqlite_rebuild.rebuild(
                conn, table, schema, column, shadow, nullable, uniques,
                check_foreign_keys=enforced,
            )  # fmt: skip
            for index in indexes:
                if not index.constraint:
                    conn.exec_driver_sql(_create_index(q, qt, index))
        return nullable, indexes

    what = f"{table}.{column}: swap"
    with (
        sqlite_rebuild.foreign_keys_off(conn)
        if dialect == "sqlite"
        else nullcontext(False) as enforced
    ):
        nullable, indexes = briefly_locking(conn, what, step, lock=lock, between=between_tries)
    log.info(
        "swapped %s.%s for its converted copy (nullable=%s, %d indexes)",
        table,
        column,
        nullable,
        len(indexes),
    )


def _check_trigger(
    conn: Connection, table: str, schema: str | None, column: str, shadow: str
) -> None:
    """Refuse a shadow that lost its trigger: it may have missed updates since.

    Only a swap stopped half-way on MySQL (the trigger's drop commits at once)
    leaves one; another worker of a distributed job may come to swap it.
    """
    if not trigger.exists(conn, table, schema, shadow):
        raise ConfigurationError(
            f"{table}.{column}: {shadow} has lost its trigger (a swap stopped half-way), so "
            "it may lack updates made since; run the job again: it fills the column anew"
        )


def _finish_fill(fill_rest: FillRest, table: str, column: str) -> None:
    late = fill_rest()
    if late:
        log.info("%s.%s: converted %d rows written during the job", table, column, late)


def _schema(
    conn: Connection, table: str, schema: str | None, column: str
) -> tuple[bool, list[Index]]:
    insp = sa.inspect(conn)
    info = next(c for c in insp.get_columns(table, schema) if c["name"] == column)
    if info.get("default") is not None:
        log.warning(
            "%s.%s: its server default describes the old values and is dropped", table, column
        )
    indexes: dict[str, Index] = {}
    for uq in insp.get_unique_constraints(table, schema):
        if column in uq["column_names"]:
            uq_name = uq["name"] or f"uq_{table}_{'_'.join(uq['column_names'])}"
            indexes[uq_name] = Index(
                uq_name, tuple(uq["column_names"]), True, True, named=uq["name"] is not None
            )
    for ix in insp.get_indexes(table, schema):
        names, name = ix["column_names"], ix["name"]
        if name is None or name in indexes or ix.get("duplicates_constraint"):
            continue
        options = ix.get("dialect_options") or {}
        special = " ".join(str(v) for k, v in options.items() if k.endswith("_where"))
        special += " ".join(ix.get("expressions") or [])
        if special or None in names:
            if column in names or column in special:
                log.warning(
                    "%s: index %s has expressions or a WHERE clause; not re-created", table, name
                )
            continue
        if column in names:
            indexes[name] = Index(name, tuple(str(n) for n in names), bool(ix["unique"]), False)
    for check in insp.get_check_constraints(table, schema):
        if sqlite_rebuild.mentions(check["sqltext"], column):
            log.warning(
                "%s.%s: CHECK constraint %s describes the old values; dropped",
                table, column, check["name"] or f"({check['sqltext']})",
            )  # fmt: skip
    for fk in insp.get_foreign_keys(table, schema):
        if column in fk["constrained_columns"]:
            log.warning(
                "%s.%s: foreign key %s cannot hold on converted values; dropped",
                table,
                column,
                fk["name"],
            )
    return bool(info["nullable"]), list(indexes.values())


def _pg_comment_and_grants(conn: Connection, qt: str, column: str) -> list[str]:
    """The statements that give the new column the old one's comment and column privileges."""
    q = conn.dialect.identifier_preparer
    qc = f"{qt}.{q.quote(column)}"
    row = conn.execute(
        sa.text(
            "SELECT col_description(attrelid, attnum), attacl IS NOT NULL FROM pg_attribute "
            "WHERE attrelid = CAST(:t AS regclass) AND attname = :c"
        ),
        {"t": qt, "c": column},
    ).one()
    statements = []
    if row[0] is not None:
        text = sa.literal(row[0]).compile(
            dialect=conn.dialect, compile_kwargs={"literal_binds": True}
        )
        statements.append(f"COMMENT ON COLUMN {qc} IS {text}")
    if row[1]:  # privileges granted on this column (not on the whole table)
        grants = conn.execute(
            sa.text(
                "SELECT CASE WHEN a.grantee = 0 THEN NULL ELSE pg_get_userbyid(a.grantee) END, "
                "a.privilege_type, a.is_grantable FROM pg_attribute, aclexplode(attacl) AS a "
                "WHERE attrelid = CAST(:t AS regclass) AND attname = :c"
            ),
            {"t": qt, "c": column},
        ).all()
        for grantee, privilege, grantable in grants:
            role = "PUBLIC" if grantee is None else q.quote(grantee)
            option = " WITH GRANT OPTION" if grantable else ""
            statements.append(f"GRANT {privilege} ({q.quote(column)}) ON {qt} TO {role}{option}")
    return statements


def _column_spec(
    conn: Connection, name: str, type_: sa.types.TypeEngine[Any], nullable: bool
) -> str:
    return str(
        CreateColumn(sa.Column(name, type_, nullable=nullable)).compile(dialect=conn.dialect)
    )


def _add_index_clause(q: Any, index: Index) -> str:
    cols = ", ".join(q.quote(c) for c in index.columns)
    return f"ADD {'UNIQUE ' if index.unique else ''}INDEX {q.quote(index.name)} ({cols})"


def _create_index(q: Any, qt: str, index: Index) -> str:
    cols = ", ".join(q.quote(c) for c in index.columns)
    if index.constraint:
        return f"ALTER TABLE {qt} ADD CONSTRAINT {q.quote(index.name)} UNIQUE ({cols})"
    unique = "UNIQUE " if index.unique else ""
    return f"CREATE {unique}INDEX {q.quote(index.name)} ON {qt} ({cols})"
