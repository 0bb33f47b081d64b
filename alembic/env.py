"""Alembic environment of the sample: configures the envelope, then runs the migrations.

What sqlalchemy-envelope needs from an env.py, in three steps (marked below):
1. import ``sqlalchemy_envelope.alembic`` (registers ``op.encrypt_column`` & co.);
2. configure the envelope's KMS, with the migration's engine for the keyring;
3. pass the models' metadata (on which the Envelope registered itself) as
   ``target_metadata``, plus the autogenerate hooks.
"""

from __future__ import annotations

import os
from logging.config import fileConfig

from alembic import context
from models import Base, envelope  # your application's models instead
from sqlalchemy import engine_from_config, pool

import sqlalchemy_envelope.alembic  # 1. registers the operations
from sqlalchemy_envelope import AwsKms, KeyProvider, LocalKms

config = context.config
if config.config_file_name is not None:
    fileConfig(config.config_file_name, disable_existing_loggers=False)

if os.environ.get("DATABASE_URL"):
    config.set_main_option("sqlalchemy.url", os.environ["DATABASE_URL"].replace("%", "%%"))


def kms_from_settings() -> KeyProvider:
    """``aws:ALIAS_OR_ARN`` or ``local:PATH`` (the CLI's --kms syntax), or a key in the env."""
    spec = os.environ.get("SQLALCHEMY_ENVELOPE_KMS")
    if not spec and os.environ.get("SQLALCHEMY_ENVELOPE_MASTER_KEY"):
        return LocalKms.from_env()
    spec = spec or config.get_main_option("sqlalchemy_envelope.kms") or ""
    kind, _, value = spec.partition(":")
    if kind == "aws" and value:
        return AwsKms(value)
    if kind == "local" and value:
        return LocalKms.from_file(value)
    raise SystemExit(f"no usable KMS setting {spec!r}: expected aws:ALIAS_OR_ARN or local:PATH")


common = {
    "target_metadata": Base.metadata,  # 3. where the operations find the envelope
    "render_item": sqlalchemy_envelope.alembic.render_item,
    "process_revision_directives": sqlalchemy_envelope.alembic.process_revision_directives,
    "compare_type": True,
}


def run_migrations_offline() -> None:
    """--sql: DDL only. The envelope is not needed; op.encrypt_column & co. refuse to run."""
    context.configure(
        url=config.get_main_option("sqlalchemy.url"),
        literal_binds=True,
        dialect_opts={"paramstyle": "named"},
        **common,
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    connectable = engine_from_config(
        config.get_section(config.config_ini_section, {}),
        prefix="sqlalchemy.",
        poolclass=pool.NullPool,
    )
    with connectable.connect() as connection:
        # 2. the KMS, and the migration's engine for the keyring table
        envelope.configure(kms=kms_from_settings(), engine=connection.engine)
        # One transaction per migration file: the batch operations commit as they go.
        context.configure(connection=connection, transaction_per_migration=True, **common)
        with context.begin_transaction():
            context.run_migrations()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
