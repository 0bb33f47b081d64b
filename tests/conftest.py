"""Databases and KMSs for the tests: real ones only.

Postgres comes from ``SQLALCHEMY_ENVELOPE_TEST_DATABASE_URL``; without it, a
testcontainers Postgres starts where Docker runs. Only when neither is
possible do the Postgres tests skip, loudly; with ``CI`` set they fail
instead. MySQL/MariaDB comes from ``SQLALCHEMY_ENVELOPE_TEST_MYSQL_URL`` the
same way (no container). SQLite always runs, on a file.

Each test gets a database of its own: a fresh schema on Postgres, a fresh
database on MySQL, a fresh file on SQLite.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

from sqlalchemy_envelope import LocalKms

PG_ENV = "SQLALCHEMY_ENVELOPE_TEST_DATABASE_URL"
MYSQL_ENV = "SQLALCHEMY_ENVELOPE_TEST_MYSQL_URL"
IN_CI = bool(os.environ.get("CI"))


def _unavailable(what: str) -> None:
    message = f"{what}: the tests that need it cannot run here"
    if IN_CI:
        pytest.fail(f"{message}, and CI must not skip them", pytrace=False)
    pytest.skip(f"!!! SKIPPED: {message} !!!")


def _docker_running() -> bool:
    if shutil.which("docker") is None:
        return False
    try:
        import docker  # type: ignore[import-untyped]

        docker.from_env().ping()
    except Exception:
        return False
    return True


@pytest.fixture(scope="session")
def pg_server_url() -> Iterator[str]:
    url = os.environ.get(PG_ENV)
    if url:
        yield url
        return
    if not _docker_running():
        _unavailable(f"PostgreSQL: {PG_ENV} is not set and Docker is not running")
    from testcontainers.postgres import PostgresContainer

    with PostgresContainer("postgres:16-alpine", driver="psycopg") as pg:
        yield pg.get_connection_url()


@pytest.fixture(scope="session")
def mysql_server_url() -> str:
    url = os.environ.get(MYSQL_ENV)
    if not url:
        _unavailable(f"MySQL/MariaDB: {MYSQL_ENV} is not set")
    assert url
    return url


def _fresh_name() -> str:
    return f"t_{uuid.uuid4().hex[:16]}"


@pytest.fixture
def pg_url(pg_server_url: str) -> Iterator[str]:
    """A URL whose connections see a fresh, empty schema."""
    schema = _fresh_name()
    admin = sa.create_engine(pg_server_url, poolclass=sa.NullPool)
    with admin.begin() as conn:
        conn.execute(sa.text(f'CREATE SCHEMA "{schema}"'))
    url = sa.make_url(pg_server_url).update_query_dict({"options": f"-csearch_path={schema}"})
    yield url.render_as_string(hide_password=False)
    with admin.begin() as conn:
        conn.execute(sa.text(f'DROP SCHEMA "{schema}" CASCADE'))
    admin.dispose()


@pytest.fixture
def mysql_url(mysql_server_url: str) -> Iterator[str]:
    name = _fresh_name()
    admin = sa.create_engine(mysql_server_url, poolclass=sa.NullPool)
    with admin.begin() as conn:
        conn.execute(sa.text(f"CREATE DATABASE `{name}`"))
    yield sa.make_url(mysql_server_url).set(database=name).render_as_string(hide_password=False)
    with admin.begin() as conn:
        conn.execute(sa.text(f"DROP DATABASE `{name}`"))
    admin.dispose()


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'test.db'}"


@pytest.fixture(params=["sqlite", "postgres"])
def db_url(request: pytest.FixtureRequest) -> str:
    """Runs the test on SQLite and on Postgres."""
    return str(request.getfixturevalue(f"{'pg' if request.param == 'postgres' else 'sqlite'}_url"))


@pytest.fixture(params=["sqlite", "postgres", "mysql"])
def any_db_url(request: pytest.FixtureRequest) -> str:
    """Runs the test on SQLite, Postgres and MySQL/MariaDB."""
    name = {"sqlite": "sqlite_url", "postgres": "pg_url", "mysql": "mysql_url"}[request.param]
    return str(request.getfixturevalue(name))


@pytest.fixture
def make_engine() -> Iterator[Callable[..., sa.Engine]]:
    engines: list[sa.Engine] = []

    def make(url: str, **kwargs: object) -> sa.Engine:
        engine = sa.create_engine(url, **kwargs)  # type: ignore[arg-type]
        engines.append(engine)
        return engine

    yield make
    for engine in engines:
        engine.dispose()


@pytest.fixture
def local_kms() -> LocalKms:
    return LocalKms(os.urandom(32))
