"""Alembic autogenerate support: rendering ``Encrypted`` columns and our operations.

``render_item`` and ``process_revision_directives`` are the two hooks an
``env.py`` passes to ``context.configure`` (see :mod:`sqlalchemy_envelope.alembic`).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from typing import Any, Literal

import sqlalchemy as sa
from alembic.autogenerate import renderers
from alembic.autogenerate.api import AutogenContext
from alembic.autogenerate.rewriter import Rewriter
from alembic.operations import ops
from alembic.runtime.migration import MigrationContext

from .column import Encrypted
from .jobs.claims import jobs_table_name
from .jobs.discovery import Stored, sample_column
from .migration_ops import (
    DEFAULT_TABLE,
    ColumnOp,
    CreateKeyringTableOp,
    DecryptColumnOp,
    DropKeyringTableOp,
    EncryptColumnOp,
    KeyringOp,
    registered_envelope,
)

log = logging.getLogger("sqlalchemy_envelope")


def render_item(type_: str, obj: Any, autogen_context: AutogenContext) -> str | Literal[False]:
    """``render_item`` hook for env.py: renders ``Encrypted(...)`` with its import."""
    if type_ != "type" or not isinstance(obj, Encrypted):
        return False
    if autogen_context.imports is not None:
        autogen_context.imports.add("import sqlalchemy_envelope")
    return _render_encrypted(obj, autogen_context)


def _render_encrypted(obj: Encrypted, autogen_context: AutogenContext) -> str:
    try:
        from alembic.autogenerate.render import _repr_type

        inner = _repr_type(obj.inner_type, autogen_context)
    except ImportError:  # pragma: no cover - a future Alembic without the helper
        inner = f"sa.{obj.inner_type!r}"
    args = [inner]
    if obj.deterministic:
        args.append("deterministic=True")
    if obj.scope is not None:
        args.append(f"scope={obj.scope!r}")
    return f"sqlalchemy_envelope.Encrypted({', '.join(args)})"


def _render_args(op: ColumnOp, autogen_context: AutogenContext, *extra: str) -> str:
    args = [repr(op.table_name), repr(op.column_name), *extra]
    if op.schema is not None:
        args.append(f"schema={op.schema!r}")
    return ", ".join(args)


def _needs_import(autogen_context: AutogenContext, *more: str) -> None:
    if autogen_context.imports is not None:
        autogen_context.imports.update(("import sqlalchemy_envelope.alembic", *more))


@renderers.dispatch_for(EncryptColumnOp)
def _render_encrypt_column(autogen_context: AutogenContext, op: EncryptColumnOp) -> str:
    _needs_import(autogen_context, "import sqlalchemy_envelope")
    rendered = _render_encrypted(op.type_, autogen_context)
    return f"op.encrypt_column({_render_args(op, autogen_context, rendered)})"


@renderers.dispatch_for(DecryptColumnOp)
def _render_decrypt_column(autogen_context: AutogenContext, op: DecryptColumnOp) -> str:
    from alembic.autogenerate.render import _repr_type

    _needs_import(autogen_context)
    rendered = _repr_type(op.type_, autogen_context)
    scope = [] if op.scope is None else [f"scope={op.scope!r}"]
    return f"op.decrypt_column({_render_args(op, autogen_context, rendered, *scope)})"


@renderers.dispatch_for(CreateKeyringTableOp)
def _render_create_keyring(autogen_context: AutogenContext, op: CreateKeyringTableOp) -> str:
    _needs_import(autogen_context)
    return f"op.create_keyring_table({_keyring_args(op)})"


@renderers.dispatch_for(DropKeyringTableOp)
def _render_drop_keyring(autogen_context: AutogenContext, op: DropKeyringTableOp) -> str:
    _needs_import(autogen_context)
    return f"op.drop_keyring_table({_keyring_args(op)})"


def _keyring_args(op: KeyringOp) -> str:
    args = [] if op.table_name is None else [repr(op.table_name)]
    if op.schema is not None:
        args.append(f"schema={op.schema!r}")
    return ", ".join(args)


process_revision_directives = Rewriter()
"""``process_revision_directives`` hook for env.py (an Alembic ``Rewriter``).

Autogenerate sees a plaintext column that the models now declare
``Encrypted`` as a type change; this turns it into ``op.encrypt_column`` (and
the downgrade's into ``op.decrypt_column``), and the keyring table's
``create_table`` / ``drop_table`` into ``op.create_keyring_table()`` /
``op.drop_keyring_table()``; it leaves out the batch jobs' own table
(``<keyring table>_jobs``), which distributed jobs create on demand. Chain it
with other rewriters via ``.chain()``.
"""


@process_revision_directives.rewrites(ops.MigrationScript)
def _convert_binary_columns(
    context: MigrationContext, revision: Any, script: ops.MigrationScript
) -> ops.MigrationScript:
    """Conversions of binary columns whose type autogenerate sees no change in.

    ``LargeBinary`` and ``Encrypted(LargeBinary)`` are both stored as
    ``bytea`` / ``BLOB``: where the models declare one and the column's values
    say the other (values, none of them ours; or ours), the conversion is
    added, with its reverse in the downgrade. An empty column tells nothing.
    Ours beside values that are not (code declaring the column ``Encrypted``
    ran before the migration was written) is not encrypted yet: another
    database may hold plaintext only.
    """
    envelope = registered_envelope(context)
    if envelope is None or context.connection is None or script.upgrade_ops is None:
        return script
    changing = {(c.table_name, c.column_name) for c in _alter_types(script.upgrade_ops)}
    ours = {envelope.table.name, jobs_table_name(envelope)}  # wrapped keys are not values
    inspector = sa.inspect(context.connection)
    for column in _binary_model_columns(context):
        table = column.table
        if table.name in ours or (table.name, column.name) in changing:
            continue
        if not _stored_binary(inspector, column):
            continue
        encrypted = column.type if isinstance(column.type, Encrypted) else None
        stored = _sample_stored(context, table.name, column.name, table.schema)
        if not stored.values or (
            _all_ours(stored, f"{table.name}.{column.name}") if encrypted else not stored.ours
        ):
            continue
        upgrade: ColumnOp
        downgrade: ColumnOp
        if encrypted is not None:
            encrypt = EncryptColumnOp(table.name, column.name, encrypted, schema=table.schema)
            upgrade, downgrade = encrypt, encrypt.reverse()
        else:
            scope = stored.scope or table.name
            upgrade = DecryptColumnOp(
                table.name, column.name, column.type, schema=table.schema, scope=scope
            )
            downgrade = EncryptColumnOp(
                table.name, column.name,
                Encrypted(column.type, deterministic=stored.deterministic,
                          scope=None if scope == table.name else scope),
                schema=table.schema,
            )  # fmt: skip
        script.upgrade_ops.ops.append(
            ops.ModifyTableOps(table.name, [upgrade], schema=table.schema)
        )
        if script.downgrade_ops is not None:
            script.downgrade_ops.ops.insert(
                0, ops.ModifyTableOps(table.name, [downgrade], schema=table.schema)
            )
    return script


def _alter_types(container: ops.OpContainer) -> Iterator[ops.AlterColumnOp]:
    for op in container.ops:
        if isinstance(op, ops.OpContainer):
            yield from _alter_types(op)
        elif isinstance(op, ops.AlterColumnOp) and op.modify_type is not None:
            yield op


def _binary_model_columns(context: MigrationContext) -> Iterator[sa.Column[Any]]:
    """The models' columns stored as binary, plain or ``Encrypted`` over a binary type."""
    target = context.opts.get("target_metadata")
    include = context.opts.get("include_object")
    for metadata in target if isinstance(target, Sequence) else [target]:
        if not isinstance(metadata, sa.MetaData):
            continue
        for table in metadata.tables.values():
            for column in table.columns:
                inner = (
                    column.type.inner_type if isinstance(column.type, Encrypted) else column.type
                )
                if not _binary(inner) or column.primary_key:
                    continue
                if include is None or include(column, column.name, "column", False, None):
                    yield column


def _stored_binary(inspector: sa.Inspector, column: sa.Column[Any]) -> bool:
    table = column.table
    if not inspector.has_table(table.name, schema=table.schema):
        return False
    reflected = {c["name"]: c["type"] for c in inspector.get_columns(table.name, table.schema)}
    return column.name in reflected and _binary(reflected[column.name])


@process_revision_directives.rewrites(ops.AlterColumnOp)
def _convert_type_change(context: MigrationContext, revision: Any, op: ops.AlterColumnOp) -> Any:
    """A type change that encrypts or decrypts a column becomes encrypt/decrypt_column.

    One side of the change is what the models declare, the other what the
    database holds: its reflected type, binary for an encrypted column. A
    sample of the column's values settles what the types cannot, and where
    the sample is empty (a development database), the reading that cannot
    lose data on a database that has values is taken.
    """
    new, old = op.modify_type, op.existing_type
    if new is None or old is None or _other_changes(op):
        return op  # leave a combined change to the author
    if isinstance(new, Encrypted):
        if _binary(old) and _encrypted_already(context, op, new.inner_type):
            return op  # a change of the binary column's size (MySQL)
        return EncryptColumnOp(op.table_name, op.column_name, new, schema=op.schema)
    if isinstance(old, Encrypted):  # the downgrade of the above
        if _binary(new) and _encrypted_already(context, op, old.inner_type):
            return op
        # The inner type the values were encoded with, which is what the column held before.
        return EncryptColumnOp(op.table_name, op.column_name, old, schema=op.schema).reverse()
    # No Encrypted on either side: the models dropped it from a binary column that
    # holds our values (an ALTER would keep the ciphertext as the new values), or
    # this is that change's downgrade. Values that are not ours: the author's change.
    if not (_binary(old) or _binary(new)):
        return op
    stored_type = _stored_type(context, op)
    if not _binary(stored_type):
        return op  # text the models make binary, or its downgrade: no values of ours
    stored = _sample(context, op)
    if _binary(old) and _binary(new):
        # MySQL stores an Encrypted column as LONGBLOB, the models' LargeBinary as BLOB:
        # only our values make the change a conversion, and the side the database holds
        # now tells which way (an ALTER would keep the ciphertext, or truncate it).
        if not stored.ours:
            return op
        dialect = context.dialect
        decrypting = bool(stored_type.compile(dialect=dialect) == old.compile(dialect=dialect))
    elif stored.values and not stored.ours:
        return op
    else:
        decrypting = _binary(old)
    if not stored.values:
        log.warning(
            "%s.%s holds no values that tell how it was encrypted: the migration takes the "
            "table's scope (and randomized mode); correct it if the models said otherwise",
            op.table_name, op.column_name,
        )  # fmt: skip
    # The scope is written into the migration, where its author sees it, rather than
    # read from the values when it runs, which would let whoever wrote them choose.
    scope = stored.scope or op.table_name
    if decrypting:
        return DecryptColumnOp(op.table_name, op.column_name, new, schema=op.schema, scope=scope)
    encrypted = Encrypted(old, deterministic=stored.deterministic, scope=_custom(scope, op))
    return EncryptColumnOp(op.table_name, op.column_name, encrypted, schema=op.schema)


def _stored_type(context: MigrationContext, op: ops.AlterColumnOp) -> Any:
    """The column's type in the database (the side of the change it holds), if known."""
    if context.connection is None:
        return None
    reflected = sa.inspect(context.connection).get_columns(op.table_name, op.schema)
    return next((c["type"] for c in reflected if c["name"] == op.column_name), None)


def _custom(scope: str, op: ops.AlterColumnOp) -> str | None:
    return None if scope == op.table_name else scope


def _binary(type_: Any) -> bool:
    return isinstance(type_, sa.types._Binary) and not isinstance(type_, Encrypted)


def _encrypted_already(context: MigrationContext, op: ops.AlterColumnOp, inner: Any) -> bool:
    """Whether a binary column that the models declare Encrypted holds our values already.

    Text, numbers or dates are never stored in a binary column, so for them it
    does (a String's length changes the binary column's size on MySQL); a
    binary inner type is ours only where a sample says so: encrypt_column on
    a column encrypted already changes nothing.
    """
    if not _binary(inner):
        return True
    return _all_ours(_sample(context, op), f"{op.table_name}.{op.column_name}")


def _all_ours(stored: Stored, where: str) -> bool:
    if stored.ours and stored.others:
        log.warning(
            "%s holds its ciphertext beside values that are not: the migration encrypts it "
            "(run on such a column, encrypt_column stops; keep_ciphertext=True keeps the "
            "ciphertext as it is)", where,
        )  # fmt: skip
    return stored.values and stored.ours and not stored.others


def _sample(context: MigrationContext, op: ops.AlterColumnOp) -> Stored:
    return _sample_stored(context, op.table_name, op.column_name, op.schema)


def _sample_stored(
    context: MigrationContext, table_name: str, column: str, schema: str | None
) -> Stored:
    envelope = registered_envelope(context)
    if envelope is None or context.connection is None:
        return Stored(values=True, ours=False)  # nothing to tell by: the author's change
    table = sa.table(table_name, sa.column(column), schema=schema)
    return sample_column(context.connection, envelope, table, column)


def _other_changes(op: ops.AlterColumnOp) -> bool:
    kw = op.kw
    return any(
        value is not None
        for value in (
            op.modify_nullable,
            op.modify_server_default or None,
            op.modify_name,
            op.modify_comment or None,
            kw.get("modify_autoincrement"),
        )
    )


@process_revision_directives.rewrites(ops.CreateTableOp)
def _create_keyring(context: MigrationContext, revision: Any, op: ops.CreateTableOp) -> Any:
    envelope = registered_envelope(context)
    if envelope is not None and op.table_name == envelope.table.name:
        return CreateKeyringTableOp(_custom_name(op.table_name), schema=op.schema)
    return op


@process_revision_directives.rewrites(ops.CreateIndexOp)
@process_revision_directives.rewrites(ops.DropIndexOp)
def _keyring_index(
    context: MigrationContext, revision: Any, op: ops.CreateIndexOp | ops.DropIndexOp
) -> Any:
    # create_keyring_table creates the keyring's indexes too, and drop_keyring_table
    # drops them: a revision that creates the table leaves them out, both ways.
    envelope = registered_envelope(context)
    if envelope is None or op.table_name != envelope.table.name or context.connection is None:
        return op
    exists = sa.inspect(context.connection).has_table(op.table_name, schema=op.schema)
    return op if exists else []


@process_revision_directives.rewrites(ops.DropTableOp)
def _drop_keyring(context: MigrationContext, revision: Any, op: ops.DropTableOp) -> Any:
    envelope = registered_envelope(context)
    if envelope is not None and op.table_name == envelope.table.name:
        return DropKeyringTableOp(_custom_name(op.table_name), schema=op.schema)
    if envelope is not None and op.table_name == jobs_table_name(envelope):
        return []  # the batch jobs' own table, created on demand: not the models' business
    return op


def _custom_name(name: str) -> str | None:
    return None if name == DEFAULT_TABLE else name
