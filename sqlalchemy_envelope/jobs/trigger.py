"""While a column is being converted, the application's updates to it clear its shadow.

The fill converts each row once. A row that the application updates after
its batch was converted would otherwise carry the older, converted value
into the swap. So while the shadow column exists, a trigger sets a row's
shadow back to NULL whenever an ``UPDATE`` writes the column, and the row is
converted again: by the fill if it has not got there yet, else by the swap's
last pass under its table lock. The trigger is created with the shadow (in
the same transaction on PostgreSQL) and dropped in the swap's atomic step.

* PostgreSQL: ``BEFORE UPDATE OF column``, a PL/pgSQL function of the same
  name that sets ``NEW.shadow := NULL``.
* SQLite: ``AFTER UPDATE OF column``, which updates the row's shadow by key.
* MySQL/MariaDB: ``BEFORE UPDATE``, setting the shadow to NULL when the
  column's bytes changed. Creating it needs the ``TRIGGER`` privilege (and,
  with binary logging, ``SUPER`` or ``log_bin_trust_function_creators``);
  without them the job stops with a ``ConfigurationError`` that says so.

A shadow is trusted only while its trigger exists: a shadow found without
one (left by an earlier release, or by a MySQL swap that stopped between
dropping the trigger and its ``ALTER TABLE``) may have missed updates, so
the conversion starts its fill again.

Its name is ``envelope_stale_`` and a digest of table and shadow. A
conversion is abandoned with ``jobs.abandon_conversion`` (or by running it
the other way), which drops the shadow and the trigger together; not by
dropping the shadow column by hand: the trigger would then fail every update
of the column (PostgreSQL, MySQL) or block the drop (SQLite).
"""

from __future__ import annotations

import hashlib
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from ..errors import ConfigurationError

_MYSQL_EXISTS = 1359  # ER_TRG_ALREADY_EXISTS
_MYSQL_DENIED = {1044, 1142, 1227, 1419}  # no access, no TRIGGER, no SUPER, binlog rule


def trigger_name(table: str, shadow: str) -> str:
    # Not the schema: ``None`` and the default schema's name must find the same trigger.
    digest = hashlib.sha256(f"{table}.{shadow}".encode()).hexdigest()[:16]
    return f"envelope_stale_{digest}"


def install(conn: Connection, table: str, schema: str | None, column: str, shadow: str) -> None:
    """Create the trigger unless it exists (in the caller's transaction)."""
    dialect, q = conn.dialect.name, conn.dialect.identifier_preparer
    if exists(conn, table, schema, shadow):
        return
    name = trigger_name(table, shadow)
    qt = q.format_table(sa.table(table, schema=schema))
    qn, qc, qs = q.quote(name), q.quote(column), q.quote(shadow)
    if dialect == "postgresql":
        fn = _pg_function(conn, table, schema, name)
        conn.exec_driver_sql(
            f"CREATE OR REPLACE FUNCTION {fn}() RETURNS trigger LANGUAGE plpgsql "
            f"AS $envelope$ BEGIN NEW.{qs} := NULL; RETURN NEW; END $envelope$"
        )
        conn.exec_driver_sql(
            f"CREATE TRIGGER {qn} BEFORE UPDATE OF {qc} ON {qt} "
            f"FOR EACH ROW EXECUTE FUNCTION {fn}()"
        )
    elif dialect == "sqlite":
        pk = sa.inspect(conn).get_pk_constraint(table, schema)["constrained_columns"]
        same_row = " AND ".join(f"{q.quote(c)} = NEW.{q.quote(c)}" for c in pk)
        conn.exec_driver_sql(
            f"CREATE TRIGGER {_qualified(conn, schema, name)} AFTER UPDATE OF {qc} "  # noqa: S608
            f"ON {q.quote(table)} FOR EACH ROW BEGIN "
            f"UPDATE {q.quote(table)} SET {qs} = NULL WHERE {same_row}; END"
        )
    elif dialect == "mysql":
        # As bytes: under a case- or accent-insensitive collation, 'a' <=> 'A' holds.
        changed = f"CAST(OLD.{qc} AS BINARY) <=> CAST(NEW.{qc} AS BINARY)"
        try:
            conn.exec_driver_sql(
                f"CREATE TRIGGER {_qualified(conn, schema, name)} BEFORE UPDATE ON {qt} "  # noqa: S608
                f"FOR EACH ROW SET NEW.{qs} = IF({changed}, NEW.{qs}, NULL)"
            )
        except sa.exc.DBAPIError as exc:
            code = exc.orig.args[0] if exc.orig is not None and exc.orig.args else None
            if code == _MYSQL_EXISTS:  # another worker's, created meanwhile
                return
            if code in _MYSQL_DENIED:
                raise ConfigurationError(
                    f"{table}.{column}: converting a column in place needs a trigger that "
                    "catches the application's updates meanwhile, and this user may not "
                    "create one: grant it TRIGGER (with binary logging on, also SUPER, or set "
                    "log_bin_trust_function_creators=1), then run the conversion again"
                ) from None
            raise
    else:
        raise ConfigurationError(
            f"{table}.{column}: columns are converted in place on PostgreSQL, SQLite and "
            f"MySQL/MariaDB only, not on {dialect}"
        )


def remove(conn: Connection, table: str, schema: str | None, shadow: str) -> None:
    """Drop the trigger if it exists (in the caller's transaction or table lock)."""
    dialect, q = conn.dialect.name, conn.dialect.identifier_preparer
    name = trigger_name(table, shadow)
    if dialect == "postgresql":
        qt = q.format_table(sa.table(table, schema=schema))
        conn.exec_driver_sql(f"DROP TRIGGER IF EXISTS {q.quote(name)} ON {qt}")
        conn.exec_driver_sql(f"DROP FUNCTION IF EXISTS {_pg_function(conn, table, schema, name)}()")
    elif dialect in ("sqlite", "mysql"):
        conn.exec_driver_sql(f"DROP TRIGGER IF EXISTS {_qualified(conn, schema, name)}")


def exists(conn: Connection, table: str, schema: str | None, shadow: str) -> bool:
    dialect, name = conn.dialect.name, trigger_name(table, shadow)
    params: dict[str, Any] = {"name": name}
    if dialect == "postgresql":
        sql = "SELECT 1 FROM pg_trigger WHERE tgname = :name AND tgrelid = to_regclass(:qt)"
        params["qt"] = conn.dialect.identifier_preparer.format_table(sa.table(table, schema=schema))
    elif dialect == "sqlite":
        master = _qualified(conn, schema, "sqlite_master")
        sql = f"SELECT 1 FROM {master} WHERE type = 'trigger' AND name = :name"  # noqa: S608
    elif dialect == "mysql":
        sql = (
            "SELECT 1 FROM information_schema.triggers WHERE trigger_name = :name "
            "AND event_object_table = :table AND trigger_schema = COALESCE(:schema, DATABASE())"
        )
        params.update(table=table, schema=schema)
    else:
        return False
    return conn.execute(sa.text(sql), params).first() is not None


def _pg_function(conn: Connection, table: str, schema: str | None, name: str) -> str:
    """The function's name, in the table's own schema however ``schema`` spells it."""
    qt = conn.dialect.identifier_preparer.format_table(sa.table(table, schema=schema))
    found = conn.execute(
        sa.text(
            "SELECT nspname FROM pg_class JOIN pg_namespace n ON n.oid = relnamespace "
            "WHERE pg_class.oid = to_regclass(:qt)"
        ),
        {"qt": qt},
    ).scalar_one()
    return _qualified(conn, str(found), name)


def _qualified(conn: Connection, schema: str | None, name: str) -> str:
    q = conn.dialect.identifier_preparer
    return f"{q.quote_schema(schema)}.{q.quote(name)}" if schema else q.quote(name)
