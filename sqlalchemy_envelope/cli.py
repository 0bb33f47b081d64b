"""The ``sqlalchemy-envelope`` command line: key lifecycle, batch jobs and the demo.

It works from the database alone: it builds an ``Envelope()`` without the
application's metadata, points it at ``--url`` and ``--kms``, and lets the
self-describing stored format tell it the rest. Exit codes: 0 success, 1
failure or (``verify``) problems found, 2 usage error. Output never contains
a stored value, a plaintext or key material.

click and tqdm (the ``cli`` extra) are imported here only.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, NoReturn

try:
    import click
    from tqdm import tqdm
    from tqdm.contrib.logging import logging_redirect_tqdm
except ImportError as exc:  # pragma: no cover - exercised through a subprocess
    if exc.name not in ("click", "tqdm"):
        raise
    sys.stderr.write(
        f"sqlalchemy-envelope: the command line needs {exc.name}: "
        "pip install 'sqlalchemy-envelope[cli]'\n"
    )
    raise SystemExit(1) from None

import sqlalchemy as sa

from . import __version__
from .envelope import Envelope
from .errors import ConfigurationError, EnvelopeError, KeyInUseError, RewrapError
from .kms.base import KeyProvider

ProgressFn = Callable[[int, int | None], None]

# -- --kms specs ----------------------------------------------------------------------


@dataclass(frozen=True)
class KmsSpec:
    """A parsed ``--kms`` value: ``aws:ALIAS_OR_ARN`` or ``local:PATH``."""

    kind: str
    target: str

    def __str__(self) -> str:
        return f"{self.kind}:{self.target}"

    def build(self, *, aws_endpoint_url: str | None) -> KeyProvider:
        """The provider; ConfigurationError when it cannot be built (file missing, no region)."""
        if self.kind == "local":
            from .kms.local import LocalKms

            if not os.path.exists(self.target):
                raise ConfigurationError(
                    f"key file {self.target} does not exist; create a new master key with: "
                    f"sqlalchemy-envelope keys generate-master-key {self.target}"
                )
            return LocalKms.from_file(self.target)
        from .kms.aws import AwsKms

        return AwsKms(self.target, endpoint_url=aws_endpoint_url)  # an ARN names its region


def _parse_kms(ctx: click.Context, param: click.Parameter, value: str | None) -> KmsSpec | None:
    if value is None:
        return None
    kind, sep, target = value.partition(":")
    if not sep or kind not in ("aws", "local"):
        raise click.BadParameter(
            f"{value!r}: expected aws:ALIAS_OR_ARN (e.g. aws:alias/app-pii) or local:PATH "
            "(a file holding a base64 master key)"
        )
    if not target.strip():
        what = "a key id, key ARN or alias/NAME" if kind == "aws" else "the path of a key file"
        raise click.BadParameter(f"{value!r}: {kind}: needs {what}")
    return KmsSpec(kind, target.strip())


# -- settings shared by the commands -------------------------------------------------


@dataclass
class Settings:
    url: str | None
    kms: KmsSpec | None
    aws_endpoint_url: str | None
    keyring_table: str
    progress: bool | None
    verbose: bool = False

    def provider(self, spec: KmsSpec, option: str) -> KeyProvider:
        try:
            return spec.build(aws_endpoint_url=self.aws_endpoint_url)
        except EnvelopeError as exc:
            raise click.BadParameter(str(exc), param_hint=option) from None

    def engine(self) -> sa.Engine:
        if not self.url:
            raise click.UsageError("no database: pass --url URL or set DATABASE_URL")
        try:
            url = sa.make_url(self.url)
        except sa.exc.ArgumentError:
            # Not echoed: a malformed URL may still hold a password.
            raise click.BadParameter("not a SQLAlchemy database URL", param_hint="--url") from None
        path = url.database if url.get_backend_name() == "sqlite" else None
        if (
            path
            and path != ":memory:"
            and not path.startswith("file:")
            and not os.path.exists(path)
        ):
            # SQLite would silently create an empty database here.
            raise click.BadParameter(f"no SQLite database at {path}", param_hint="--url")
        try:
            # hide_parameters: values (plaintext while encrypting) never reach logs or errors.
            engine = sa.create_engine(url, hide_parameters=True)
        except ImportError as exc:
            raise click.ClickException(
                f"cannot load the database driver for {url.drivername}: {exc}"
            ) from None
        if engine.dialect.is_async:
            raise click.BadParameter(
                f"{url.drivername} is an asyncio driver; the command line needs a synchronous "
                "one for the same database, such as postgresql+psycopg://, mysql+pymysql:// "
                "or sqlite://",
                param_hint="--url",
            )
        return engine

    def envelope(self, *, need_kms: bool = True) -> Envelope:
        """An Envelope on ``--url``'s database (and ``--kms``, unless not needed)."""
        ctx = click.get_current_context()
        kms = None
        if self.kms is not None:
            kms = self.provider(self.kms, "--kms")
        elif need_kms:
            raise click.UsageError(
                f"'{ctx.command_path}' needs a KMS: pass --kms aws:ALIAS_OR_ARN or --kms local:PATH"
            )
        engine = self.engine()
        ctx.call_on_close(engine.dispose)
        if not _has_table(engine, self.keyring_table):
            raise click.ClickException(
                f"the database has no keyring table {self.keyring_table!r} "
                "(check --url and --keyring-table; create_all or the Alembic migration creates it)"
            )
        envelope = Envelope(table_name=self.keyring_table)
        envelope.configure(kms=kms, engine=engine)
        return envelope

    @contextmanager
    def progress_bar(self, what: str, unit: str) -> Iterator[ProgressFn]:
        """``progress(done, total)`` driving a tqdm bar on stderr (rate in ``unit``/s)."""
        with (
            tqdm(
                desc=what,
                unit=f" {unit}",
                disable=None if self.progress is None else not self.progress,
                file=sys.stderr,
                dynamic_ncols=True,
            ) as bar,
            logging_redirect_tqdm(),  # -v log lines print above the bar, not through it
        ):

            def progress(done: int, total: int | None) -> None:
                if total is not None and bar.total != total:
                    bar.total = total
                bar.update(done - bar.n)

            yield progress


def _has_table(engine: sa.Engine, name: str) -> bool:
    with engine.connect() as conn:
        return bool(sa.inspect(conn).has_table(name))


def _settings(ctx: click.Context) -> Settings:
    settings = ctx.find_object(Settings)
    assert settings is not None
    return settings


# -- errors: exit 1 with one line, never a traceback ------------------------------------


def _db_error(exc: sa.exc.SQLAlchemyError) -> str:
    # The driver's own message; SQLAlchemy's text adds the statement, and the
    # engine hides parameters anyway.
    orig = getattr(exc, "orig", None)
    text = str(orig) if orig is not None else str(exc)
    first = text.strip().splitlines()[0] if text.strip() else ""
    return f"database error ({type(orig or exc).__name__}): {first}"


class _Group(click.Group):
    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except EnvelopeError as exc:
            raise click.ClickException(f"{exc} ({type(exc).__name__})") from None
        except sa.exc.NoSuchTableError as exc:
            raise click.ClickException(f"no table named {exc.args[0]!r} in the database") from None
        except sa.exc.SQLAlchemyError as exc:
            raise click.ClickException(_db_error(exc)) from None
        except (click.exceptions.ClickException, click.exceptions.Exit, click.exceptions.Abort):
            raise
        except Exception as exc:
            # A bug. Its message could carry anything, so the traceback only with -v.
            settings = ctx.find_object(Settings)
            if settings is not None and settings.verbose:
                logging.getLogger("sqlalchemy_envelope").exception("unexpected error")
            raise click.ClickException(
                f"unexpected {type(exc).__name__}: this is a bug; rerun with -v for the "
                "traceback and report it"
            ) from None


def _columns(values: Sequence[str]) -> list[str] | None:
    return list(values) or None


# -- the commands ------------------------------------------------------------------------


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--url",
    envvar="DATABASE_URL",
    metavar="URL",
    help="SQLAlchemy database URL (default: $DATABASE_URL).",
)
@click.option(
    "--kms",
    envvar="SQLALCHEMY_ENVELOPE_KMS",
    metavar="aws:ALIAS_OR_ARN|local:PATH",
    callback=_parse_kms,
    help="The KMS that wraps the data keys: an AWS KMS key (id, ARN or alias/NAME) "
    "or a local master key file (default: $SQLALCHEMY_ENVELOPE_KMS).",
)
@click.option(
    "--aws-endpoint-url",
    envvar="AWS_ENDPOINT_URL",
    metavar="URL",
    help="AWS KMS endpoint (default: $AWS_ENDPOINT_URL); the region comes from the key ARN "
    "or AWS_DEFAULT_REGION.",
)
@click.option(
    "--keyring-table",
    default="envelope_data_keys",
    show_default=True,
    metavar="NAME",
    help="Name of the keyring table.",
)
@click.option(
    "--progress/--no-progress",
    default=None,
    help="Show progress bars (default: when stderr is a terminal).",
)
@click.option("-v", "--verbose", is_flag=True, help="Log lifecycle events (INFO) to stderr.")
@click.version_option(__version__, prog_name="sqlalchemy-envelope")
@click.pass_context
def cli(
    ctx: click.Context,
    url: str | None,
    kms: KmsSpec | None,
    aws_endpoint_url: str | None,
    keyring_table: str,
    progress: bool | None,
    verbose: bool,
) -> None:
    """Manage the data keys and encrypted tables of sqlalchemy-envelope.

    Exit codes: 0 success, 1 failure or (verify) problems found, 2 usage error.
    The runbook for each task is docs/KEY_MANAGEMENT.md.
    """
    logging.basicConfig(stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
    if verbose:  # ours only: botocore and the database drivers stay at WARNING
        logging.getLogger("sqlalchemy_envelope").setLevel(logging.INFO)
    if not keyring_table.strip():
        raise click.BadParameter("must not be empty", param_hint="--keyring-table")
    ctx.obj = Settings(url, kms, aws_endpoint_url or None, keyring_table, progress, verbose)


@cli.group()
def keys() -> None:
    """List, rotate, re-wrap and destroy data keys."""


@keys.command("list")
@click.option("--scope", metavar="SCOPE", help="Only this scope's keys.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
@click.pass_context
def keys_list(ctx: click.Context, scope: str | None, as_json: bool) -> None:
    """List the keyring (never key material). Needs no KMS."""
    envelope = _settings(ctx).envelope(need_kms=False)
    entries = envelope.keys(scope)
    if scope is not None and not entries:  # on stderr: the listing itself stays parseable
        known = sorted({k.scope for k in envelope.keys()})
        click.echo(
            f"no keys in scope {scope!r} (scopes in the keyring: "
            f"{', '.join(map(repr, known)) or 'none'})",
            err=True,
        )
    if as_json:
        for k in entries:
            click.echo(
                json.dumps(
                    {
                        "id": k.id,
                        "scope": k.scope,
                        "state": k.state,
                        "created_at": k.created_at.isoformat(),
                        "kms_key_id": k.kms_key_id,
                    }
                )
            )
        return
    rows = [("ID", "SCOPE", "STATE", "CREATED", "KMS KEY")]
    rows += [
        (str(k.id), k.scope, k.state, k.created_at.isoformat(timespec="seconds"), k.kms_key_id)
        for k in entries
    ]
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    for r in rows:
        click.echo(
            "  ".join([*(cell.ljust(w) for cell, w in zip(r, widths, strict=False)), r[4]]).rstrip()
        )


@keys.command("generate-master-key", short_help="Write a new local master key file.")
@click.argument("path", type=click.Path(dir_okay=False))
def keys_generate_master_key(path: str) -> None:
    """Write a new local master key to PATH (mode 0600); never overwrites a file.

    For development and small deployments: use it as --kms local:PATH, and keep
    a backup where the database's backups are not.
    """
    from .kms.local import LocalKms

    if os.path.lexists(path):
        raise click.ClickException(f"{path} exists already; a key file is never overwritten")
    kms = LocalKms.from_file(path, create=True)
    click.echo(f"wrote a new master key to {path} (mode 0600); its key id is {kms.kms_key_id}")
    click.echo("back it up: values under data keys it wraps cannot be read without it")


@keys.command("rotate", short_help="New active data key for SCOPE.")
@click.argument("scope")
@click.pass_context
def keys_rotate(ctx: click.Context, scope: str) -> None:
    """Create a new active data key for SCOPE; older keys stay readable."""
    if not scope.strip():
        raise click.BadParameter("must not be empty", param_hint="SCOPE")
    envelope = _settings(ctx).envelope()
    key_id = envelope.rotate(scope)
    click.echo(f"scope {scope!r}: data key {key_id} is active")
    click.echo("older values stay readable under their keys; `reencrypt TABLE` moves them to it")


@keys.command("rewrap", short_help="Re-wrap every data key under another KMS key.")
@click.option(
    "--to",
    "to",
    required=True,
    metavar="aws:ALIAS_OR_ARN|local:PATH",
    callback=_parse_kms,
    help="The KMS to wrap every data key under.",
)
@click.pass_context
def keys_rewrap(ctx: click.Context, to: KmsSpec) -> None:
    """Re-wrap every data key under another KMS key; no encrypted row is touched.

    --kms must be able to unwrap the keys not yet under --to. Resumable: keys
    already under --to are skipped. A key that cannot be moved is named at the
    end, with exit status 1; between providers or regions no key moves then,
    within one AWS region the others do.
    """
    settings = _settings(ctx)
    envelope = settings.envelope()
    target = settings.provider(to, "--to")
    try:
        with settings.progress_bar("re-wrapping", "keys") as progress:
            moved = envelope.rewrap(target, progress=progress)
    except RewrapError as exc:
        click.echo(
            f"re-wrapped {exc.moved} data key(s) under {to}; {len(exc.failed)} failed, "
            f"{exc.remaining} left behind (created meanwhile); until none is, keep this --kms"
        )
        raise
    click.echo(f"re-wrapped {moved} data key(s) under {to}; from now on use --kms {to}")


def _key_id(ctx: click.Context, param: click.Parameter, value: str) -> int:
    """A data key's id: a positive integer, as ``keys list`` prints it."""
    try:
        key_id = int(value)
    except ValueError:
        key_id = 0
    if key_id < 1:
        raise click.BadParameter(
            f"{value!r} is not a data key id: ids are positive integers, "
            "and 'sqlalchemy-envelope keys list' shows them"
        )
    return key_id


@keys.command("destroy")
@click.argument("key_id", metavar="ID", callback=_key_id)
@click.option(
    "--force",
    is_flag=True,
    help="Destroy even while values use the key: they become unreadable for good.",
)
@click.pass_context
def keys_destroy(ctx: click.Context, key_id: int, force: bool) -> None:
    """Crypto-shred data key ID. Refuses while values use it, unless --force."""
    from .lifecycle import declared_schemas, usage

    envelope = _settings(ctx).envelope(need_kms=False)
    entry = next((k for k in envelope.keys(scope=None) if k.id == key_id), None)
    if entry is not None and entry.state == "destroyed":
        click.echo(f"data key {key_id} of scope {entry.scope!r} was already destroyed")
        return
    lost = {}
    if force and entry is not None:
        lost = usage(envelope.engine, key_id, declared_schemas(envelope)).counts
    try:
        envelope.destroy(key_id, force=force)
    except KeyInUseError as exc:
        message = str(exc).replace("pass force=True", "pass --force")
        raise click.ClickException(f"{message} (KeyInUseError)") from None
    scope = entry.scope if entry is not None else "?"
    click.echo(f"destroyed data key {key_id} of scope {scope!r}")
    for (table, column), n in sorted(lost.items()):
        click.echo(f"  {n} value(s) in {table}.{column} are now unreadable", err=True)


@cli.command(short_help="Move TABLE's values to their scope's active key.")
@click.argument("table")
@click.option(
    "--batch-size",
    type=click.IntRange(min=1),
    default=1000,
    show_default=True,
    help="Rows per transaction.",
)
@click.option(
    "--schema", default=None, metavar="NAME", help="TABLE's schema (default: the default one)."
)
@click.option(
    "--column",
    "columns",
    multiple=True,
    metavar="NAME",
    help="Only this encrypted column (repeatable; default: found from the values).",
)
@click.pass_context
def reencrypt(
    ctx: click.Context, table: str, batch_size: int, schema: str | None, columns: tuple[str, ...]
) -> None:
    """Move every value of TABLE's encrypted columns to its scope's active key.

    Batched and resumable: after an interruption, run the same command again.
    """
    settings = _settings(ctx)
    envelope = settings.envelope()
    from . import jobs

    try:
        with settings.progress_bar(f"re-encrypting {table}", "rows") as progress:
            report = jobs.reencrypt(
                envelope, table, batch_size=batch_size, progress=progress,
                columns=_columns(columns), schema=schema,
            )  # fmt: skip
    except KeyboardInterrupt:
        click.echo("interrupted: run the same command again to finish the job", err=True)
        raise click.Abort() from None
    click.echo(
        f"{table}: {report.rows} rows scanned, {report.values_rewritten} values re-encrypted"
    )
    left = {
        "already under the active key": getattr(report, "values_current", 0),
        "changed by the application meanwhile (left as written)": getattr(
            report, "values_changed", 0
        ),
        "left under their old key: each equals another row's value under a unique "
        "constraint (resolve the duplicates, then run again)": getattr(report, "duplicates", 0),
    }
    for what, n in left.items():
        if n:
            click.echo(f"  {n} values {what}")
    plaintext, unreadable = getattr(report, "plaintext", 0), getattr(report, "unreadable", 0)
    if plaintext or unreadable:
        click.echo(
            f"warning: {plaintext} plaintext and {unreadable} unreadable values were left "
            f"alone; see: verify {table}",
            err=True,
        )
    if not report.ok:
        ctx.exit(1)


@cli.command(short_help="Count TABLE's values per key; find plaintext, unreadable ones.")
@click.argument("table")
@click.option(
    "--schema", default=None, metavar="NAME", help="TABLE's schema (default: the default one)."
)
@click.option(
    "--column",
    "columns",
    multiple=True,
    metavar="NAME",
    help="Only this encrypted column (repeatable; default: found from the values).",
)
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.pass_context
def verify(
    ctx: click.Context, table: str, schema: str | None, columns: tuple[str, ...], as_json: bool
) -> None:
    """Count TABLE's values per data key; find plaintext and unreadable values.

    Prints counts, never a value. Exits 1 when a value is plaintext or unreadable.
    """
    envelope = _settings(ctx).envelope()
    from . import jobs

    report = jobs.verify(envelope, table, columns=_columns(columns), schema=schema)
    by_key: dict[int, int] = dict(sorted(report.by_key.items()))
    causes: dict[str, int] = dict(getattr(report, "unreadable_by_cause", {}))
    per_column = _column_counts(report)
    if as_json:
        summary: dict[str, Any] = {
            "table": report.table,
            "by_key": {str(k): n for k, n in by_key.items()},
            "plaintext": report.plaintext,
            "unreadable": report.unreadable,
            "ok": report.ok,
        }
        if causes:
            summary["unreadable_by_cause"] = causes
        if per_column:
            summary["columns"] = per_column
        click.echo(json.dumps(summary))
    else:
        states = {k.id: k.state for k in envelope.keys(scope=None)}
        rows = getattr(report, "rows", None)
        counted = "" if rows is None else f" ({rows} row{'' if rows == 1 else 's'})"
        click.echo(f"table {report.table}{counted}")
        click.echo(f"  encrypted columns: {', '.join(report.columns) or 'none'}")
        for key_id, n in by_key.items():
            state = states.get(key_id, "not in keyring")
            click.echo(f"  key {key_id} ({state}): {n} values")
        click.echo(f"  plaintext: {report.plaintext}")
        why = ", ".join(f"{cause}: {n}" for cause, n in sorted(causes.items()) if n)
        click.echo(f"  unreadable: {report.unreadable}" + (f" ({why})" if why else ""))
        for name, counts in per_column.items():
            if counts["plaintext"] or counts["unreadable"]:
                click.echo(
                    f"  in {report.table}.{name}: {counts['plaintext']} plaintext, "
                    f"{counts['unreadable']} unreadable"
                )
        click.echo("ok" if report.ok else "PROBLEMS FOUND")
    if not report.ok:
        ctx.exit(1)


def _column_counts(report: Any) -> dict[str, dict[str, int]]:
    """Plaintext and unreadable counts per column, when the report has them."""
    columns = getattr(report, "columns", None)
    if not isinstance(columns, dict):
        return {}
    return {
        str(name): {
            "plaintext": int(getattr(c, "plaintext", 0)),
            "unreadable": int(getattr(c, "unreadable", 0)),
        }
        for name, c in columns.items()
    }


@cli.command(short_help="Run the quickstart on a throw-away SQLite file.")
@click.option(
    "--dir",
    "directory",
    type=click.Path(file_okay=False),
    help="Keep the demo's database and master key in this directory (default: a temporary one).",
)
def demo(directory: str | None) -> None:
    """Run the quickstart on a SQLite file with a local master key, and show what is stored."""
    from . import demo as demo_module

    try:
        demo_module.run(directory, out=click.echo)
    except FileExistsError as exc:
        raise click.BadParameter(str(exc), param_hint="--dir") from None


def main(argv: Sequence[str] | None = None) -> NoReturn:
    """Console-script entry point."""
    cli.main(args=list(argv) if argv is not None else None, prog_name="sqlalchemy-envelope")
    raise SystemExit(0)  # pragma: no cover - click's standalone mode always exits


__all__ = ["cli", "main"]
