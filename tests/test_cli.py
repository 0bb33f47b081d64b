"""The command line through real subprocesses, on SQLite, Postgres and moto's KMS server.

Each subprocess costs about half a second, so each test walks a whole task
(rotate, re-encrypt, shred...) through one database rather than one command
per test.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session

from sqlalchemy_envelope import AwsKms, KeyDestroyedError, LocalKms
from sqlalchemy_envelope.kms.base import KeyProvider

from .kms_fixtures import *  # noqa: F403
from .kms_fixtures import KmsBackend
from .models import build

ROOT = Path(__file__).resolve().parent.parent
PATIENTS = 12


@dataclass
class Run:
    code: int
    out: str
    err: str

    @property
    def text(self) -> str:
        return self.out + self.err


def cli(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None) -> Run:
    """``python -m sqlalchemy_envelope ARGS``, isolated from the caller's settings."""
    base = {
        k: v
        for k, v in os.environ.items()
        if k not in ("DATABASE_URL", "SQLALCHEMY_ENVELOPE_KMS", "AWS_ENDPOINT_URL")
    }
    proc = subprocess.run(
        [sys.executable, "-m", "sqlalchemy_envelope", *args],
        capture_output=True,
        text=True,
        env={**base, **(env or {})},
        cwd=cwd,
        timeout=120,
    )
    return Run(proc.returncode, proc.stdout, proc.stderr)


def expect(run: Run, code: int, *fragments: str) -> Run:
    assert run.code == code, f"exit {run.code}, expected {code}\n{run.text}"
    assert "Traceback" not in run.text, run.text
    for fragment in fragments:
        assert fragment in run.text, f"{fragment!r} missing from:\n{run.text}"
    return run


@dataclass
class Db:
    """A database populated through the library, with its master key file."""

    url: str
    key: Path
    secrets: list[str]

    def cli(
        self, *args: str, kms: str | None = "default", env: dict[str, str] | None = None
    ) -> Run:
        options = ["--url", self.url]
        if kms == "default":
            kms = f"local:{self.key}"
        if kms is not None:
            options += ["--kms", kms]
        run = cli(*options, *args, env=env)
        leaked = [s for s in self.secrets if s in run.text]
        assert not leaked, f"plaintext in the output of {args}: {leaked}\n{run.text}"
        return run

    def read(self, kms: KeyProvider) -> list[tuple[Any, ...]]:
        """Every patient as the application reads it, with only ``kms``."""
        app = build()
        engine = sa.create_engine(self.url)
        try:
            app.envelope.configure(kms=kms, engine=engine)
            with Session(engine) as s:
                rows = s.scalars(sa.select(app.Patient).order_by(app.Patient.id)).all()
                return [(p.name, p.email, p.ssn, p.notes) for p in rows]
        finally:
            engine.dispose()


def expected_patients() -> list[tuple[Any, ...]]:
    return [
        (
            f"Secret Name {i:02d}",
            f"secret.{i:02d}@example.org",
            f"987-65-{4300 + i}" if i % 3 else None,
            {"diagnosis": f"secret-diagnosis-{i:02d}"},
        )
        for i in range(PATIENTS)
    ]


def populate(url: str, key: Path) -> Db:
    app = build()
    engine = sa.create_engine(url)
    try:
        app.Base.metadata.create_all(engine)
        app.envelope.configure(kms=LocalKms.from_file(key, create=True), engine=engine)
        with Session(engine) as s:
            s.add_all(
                app.Patient(name=n, email=e, ssn=ssn, notes=notes)
                for n, e, ssn, notes in expected_patients()
            )
            s.add_all([app.Doctor(name="Secret Doctor A"), app.Doctor(name="Secret Doctor B")])
            s.commit()
    finally:
        engine.dispose()
    secrets = [str(v) for row in expected_patients() for v in row[:3] if v is not None]
    secrets += [f"secret-diagnosis-{i:02d}" for i in range(PATIENTS)]
    secrets += ["Secret Doctor A", "Secret Doctor B", "Secret", "secret"]
    return Db(url, key, secrets)


@pytest.fixture
def db(db_url: str, tmp_path: Path) -> Db:
    return populate(db_url, tmp_path / "master.key")


@pytest.fixture
def sqlite_db(sqlite_url: str, tmp_path: Path) -> Db:
    return populate(sqlite_url, tmp_path / "master.key")


def keys_list_json(db: Db, *args: str) -> list[dict[str, Any]]:
    run = expect(db.cli("keys", "list", "--json", *args, kms=None), 0)
    return [json.loads(line) for line in run.out.splitlines()]


def keyring(db: Db, scope: str | None = None) -> dict[int, str]:
    """``id -> state``, read directly (cheaper than a subprocess)."""
    engine = sa.create_engine(db.url)
    try:
        with engine.connect() as conn:
            rows = conn.execute(sa.text("SELECT id, scope, state FROM envelope_data_keys")).all()
    finally:
        engine.dispose()
    return {r.id: r.state for r in rows if scope is None or r.scope == scope}


def active_key(db: Db, scope: str) -> int:
    return next(k for k, state in keyring(db, scope).items() if state == "active")


# -- the whole lifecycle ----------------------------------------------------------------


def test_rotate_reencrypt_verify_destroy(db: Db) -> None:
    listed = expect(db.cli("keys", "list", kms=None), 0, "ID", "SCOPE", "STATE", "patients")
    assert "staff" in listed.out
    old = active_key(db, "patients")

    rotated = expect(db.cli("keys", "rotate", "patients"), 0)
    new = int(re.search(r"data key (\d+) is active", rotated.out).group(1))  # type: ignore[union-attr]
    assert new != old

    before = expect(db.cli("verify", "patients"), 0, "table patients", "plaintext: 0", "ok")
    assert f"key {old} (retired): " in before.out and f"key {new}" not in before.out

    expect(db.cli("keys", "destroy", str(old)), 1, "KeyInUseError", "patients.name", "--force")

    moved = expect(db.cli("--progress", "reencrypt", "patients", "--batch-size", "5"), 0, "rows/s")
    assert f"{PATIENTS} rows" in moved.out
    report = json.loads(expect(db.cli("verify", "patients", "--json"), 0).out)
    # name, email, notes in every row; ssn in two rows of three.
    values = 3 * PATIENTS + sum(1 for i in range(PATIENTS) if i % 3)
    assert report["table"] == "patients" and report["by_key"] == {str(new): values}
    assert (report["plaintext"], report["unreadable"], report["ok"]) == (0, 0, True)

    expect(db.cli("keys", "destroy", str(old), kms=None), 0, f"destroyed data key {old}")
    assert keyring(db, "patients") == {old: "destroyed", new: "active"}
    assert db.read(LocalKms.from_file(db.key)) == expected_patients()

    # Shredding a scope whose values are still there: refused, then forced.
    staff = active_key(db, "staff")
    expect(
        db.cli("keys", "destroy", str(staff), "--force", kms=None),
        0,
        "2 value(s) in doctors.name are now unreadable",
    )
    expect(
        db.cli("verify", "doctors"),
        1,
        "table doctors",
        "unreadable: 2 (key destroyed: 2)",
        "PROBLEMS FOUND",
    )
    app = build()
    engine = sa.create_engine(db.url)
    app.envelope.configure(kms=LocalKms.from_file(db.key), engine=engine)
    with Session(engine) as s, pytest.raises(KeyDestroyedError):
        s.scalars(sa.select(app.Doctor.name)).all()
    engine.dispose()


def test_verify_finds_plaintext_and_tampered_values(db: Db) -> None:
    with sa.create_engine(db.url).begin() as conn:
        table = sa.table("patients", sa.column("id"), sa.column("name"), sa.column("ssn"))
        name = bytes(conn.execute(sa.select(table.c.name).where(table.c.id == 2)).scalar_one())
        tampered = name[:-1] + bytes([name[-1] ^ 1])
        conn.execute(table.update().where(table.c.id == 2).values(name=tampered))
        conn.execute(table.update().where(table.c.id == 1).values(ssn=b"123-45-6789"))
    db.secrets.append("123-45-6789")

    expect(
        db.cli("verify", "patients"),
        1,
        "plaintext: 1",
        "unreadable: 1",
        "in patients.ssn: 1 plaintext, 0 unreadable",
        "in patients.name: 0 plaintext, 1 unreadable",
        "PROBLEMS FOUND",
    )
    report = json.loads(expect(db.cli("verify", "patients", "--column", "ssn", "--json"), 1).out)
    assert (report["plaintext"], report["unreadable"], report["ok"]) == (1, 0, False)


def test_a_column_mostly_plaintext_is_still_found_verified_and_fails_the_jobs(db: Db) -> None:
    """Old code writing plaintext after the swap: one value of ours marks the column as
    encrypted, wherever it is, so verify and reencrypt count the rest as plaintext."""
    engine = sa.create_engine(db.url)
    table = sa.table("patients", sa.column("id"), sa.column("ssn"))
    with engine.begin() as conn:
        ids = conn.execute(sa.select(table.c.id).order_by(table.c.id)).scalars().all()
        kept = ids[-1]  # its ssn stays encrypted
        conn.execute(table.update().where(table.c.id != kept).values(ssn=b"999-00-0001"))
    engine.dispose()
    db.secrets.append("999-00-0001")
    plain = len(ids) - 1
    run = expect(
        db.cli("verify", "patients"),
        1,
        f"plaintext: {plain}",
        f"in patients.ssn: {plain} plaintext",
        "PROBLEMS FOUND",
    )
    assert "ssn" in run.out.split("encrypted columns:")[1].splitlines()[0]
    expect(db.cli("reencrypt", "patients"), 1, f"warning: {plain} plaintext")


# -- re-wrapping under another KMS ------------------------------------------------------


def test_rewrap_local_to_local(sqlite_db: Db, tmp_path: Path) -> None:
    db = sqlite_db
    new_key = tmp_path / "new.key"
    made = expect(cli("keys", "generate-master-key", str(new_key)), 0, "mode 0600")
    fingerprint = LocalKms.from_file(new_key).kms_key_id
    assert fingerprint in made.out and oct(new_key.stat().st_mode & 0o777) == "0o600"

    keys = len(keyring(db))
    expect(
        db.cli("keys", "rewrap", "--to", f"local:{new_key}"), 0, f"re-wrapped {keys} data key(s)"
    )
    assert {k["kms_key_id"] for k in keys_list_json(db, "--scope", "patients")} == {fingerprint}
    expect(db.cli("verify", "patients", kms=f"local:{new_key}"), 0, "ok")
    assert db.read(LocalKms.from_file(new_key)) == expected_patients()
    # The old master key opens nothing any more.
    expect(db.cli("verify", "patients"), 1, "KmsError")


def test_rewrap_local_to_aws(
    pg_url: str, tmp_path: Path, moto_server: str, aws_credentials: None
) -> None:
    db = populate(pg_url, tmp_path / "master.key")
    cmk = KmsBackend("server", moto_server).create_cmk()

    keys = len(keyring(db))
    expect(
        db.cli("--aws-endpoint-url", moto_server, "keys", "rewrap", "--to", f"aws:{cmk.alias}"),
        0,
        f"re-wrapped {keys} data key(s)",
    )
    assert {k["kms_key_id"] for k in keys_list_json(db)} == {cmk.arn}
    # From here on, only AWS: the endpoint from the environment, the key by alias or ARN.
    aws_env = {"AWS_ENDPOINT_URL": moto_server}
    expect(db.cli("verify", "patients", kms=f"aws:{cmk.alias}", env=aws_env), 0, "ok")
    rotate = ("keys", "rotate", "visits")  # no keys yet: its first, under the new CMK
    expect(db.cli(*rotate, kms=f"aws:{cmk.arn}", env=aws_env), 0, "had no keys")
    kms = AwsKms(cmk.alias, endpoint_url=moto_server)
    assert db.read(kms) == expected_patients()


def test_rewrap_moves_no_key_while_one_does_not_unwrap_and_names_it(
    pg_url: str, tmp_path: Path, moto_server: str, aws_credentials: None
) -> None:
    """A keyring split between the local master key and the CMK would leave an application
    holding one of them unable to read the other's keys: a damaged row stops the re-wrap
    before any key moves, named with the way out."""
    db = populate(pg_url, tmp_path / "master.key")
    cmk = KmsBackend("server", moto_server).create_cmk()
    damaged = active_key(db, "staff")
    with sa.create_engine(db.url).begin() as conn:
        t = sa.table("envelope_data_keys", sa.column("id"), sa.column("wrapped_key"))
        wrapped = bytes(conn.execute(sa.select(t.c.wrapped_key).where(t.c.id == damaged)).scalar())
        flipped = wrapped[:-1] + bytes([wrapped[-1] ^ 1])
        conn.execute(t.update().where(t.c.id == damaged).values(wrapped_key=flipped))
    rewrap = ("--aws-endpoint-url", moto_server, "keys", "rewrap", "--to", f"aws:{cmk.alias}")
    before = {k["id"]: k["kms_key_id"] for k in keys_list_json(db)}

    for _ in range(2):  # a rerun fails the same way
        failed = expect(
            db.cli(*rewrap),
            1,
            "0 data key(s) moved",
            f"key {damaged} of scope 'staff'",
            "keys destroy ID",
            "RewrapError",
        )
        assert "from now on use" not in failed.text
        assert {k["id"]: k["kms_key_id"] for k in keys_list_json(db)} == before
    expect(db.cli("keys", "destroy", str(damaged), "--force", kms=None), 0)
    expect(db.cli(*rewrap), 0, f"re-wrapped {len(before) - 1} data key(s)", "from now on use")


def test_rotate_refuses_another_master_key_and_warns_of_an_unknown_scope(
    db: Db, tmp_path: Path
) -> None:
    """Another master key would wrap a key the application cannot unwrap: refused. A
    mistyped scope gets a key while the real one keeps its old key: said, with the way out."""
    old = active_key(db, "patients")
    other = tmp_path / "other.key"
    expect(cli("keys", "generate-master-key", str(other)), 0)
    expect(db.cli("keys", "rotate", "patients", kms=f"local:{other}"), 1, "cannot unwrap", "rewrap")
    assert active_key(db, "patients") == old
    typo = expect(db.cli("keys", "rotate", "patient"), 0, "had no keys", "'patients'")
    (key,) = keyring(db, "patient")
    assert f"destroy key {key}" in typo.err and active_key(db, "patients") == old
    expect(db.cli("keys", "destroy", str(key), kms=None), 0, f"destroyed data key {key}")
    listed = expect(db.cli("keys", "list", "--scope", "patiens", kms=None), 0)
    assert "no keys in scope 'patiens'" in listed.err and "'patients'" in listed.err


# -- errors --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["keys", "list"], "pass --url URL or set DATABASE_URL"),
        (["--kms", "vault:x", "keys", "list"], "expected aws:ALIAS_OR_ARN"),
        (["--url", "{url}", "keys", "rotate", "patients"], "needs a KMS"),
        (["--url", "{url}", "--kms", "local:missing.key", "verify", "t"], "generate-master-key"),
        (["--url", "{url}", "keys", "destroy", "one"], "'one' is not a data key id"),
        (["--url", "{url}", "keys", "destroy", "--", "-3"], "'-3' is not a data key id"),
        (["--url", "{aurl}", "keys", "list"], "sqlite+aiosqlite is an asyncio driver"),
    ],
)
def test_usage_errors_exit_2(args: list[str], message: str, sqlite_url: str) -> None:
    Path(sa.make_url(sqlite_url).database or "").touch()
    aurl = sqlite_url.replace("sqlite://", "sqlite+aiosqlite://")
    run = cli(*(a.format(url=sqlite_url, aurl=aurl) for a in args), cwd=ROOT)
    expect(run, 2, message, "Usage:")


def test_failures_exit_1_with_one_line(sqlite_db: Db, tmp_path: Path) -> None:
    db = sqlite_db
    run = expect(
        db.cli("keys", "destroy", "999", kms=None), 1, "data key 999 is not in the keyring"
    )
    assert run.err.strip().count("\n") == 0
    expect(db.cli("verify", "no_such_table"), 1, "no_such_table")
    engine = sa.create_engine(db.url)
    with engine.begin() as conn:  # a table with nothing encrypted is no "ok"
        conn.exec_driver_sql("CREATE TABLE notes (id INTEGER PRIMARY KEY, body TEXT)")
        conn.exec_driver_sql("INSERT INTO notes VALUES (1, 'plain')")
    engine.dispose()
    expect(db.cli("verify", "notes"), 1, "table 'notes' has no binary column")
    empty = tmp_path / "empty.db"
    sa.create_engine(f"sqlite:///{empty}").connect().close()
    expect(cli("--url", f"sqlite:///{empty}", "keys", "list"), 1, "no keyring table")


# -- the demo, the example, the entry points --------------------------------------------


def test_demo_keeps_files_the_cli_can_verify(tmp_path: Path) -> None:
    workdir = tmp_path / "demo"
    run = expect(cli("demo", "--dir", str(workdir)), 0, "Ada Lovelace", "ada@example.org")
    for shown in (
        "What the application reads",
        "What the database holds",
        "AES-256-GCM",
        "AES-SIV",
    ):
        assert shown in run.out
    assert "state=retired" in run.out and "state=active" in run.out
    raw = run.out.split("What the database holds")[1].split("The keyring")[0]
    assert "Ada" not in raw and "078-05-1120" not in raw and "010100000001" in raw

    # The database and the KMS from the environment, as in the runbook.
    env = {
        "DATABASE_URL": f"sqlite:///{workdir / 'demo.db'}",
        "SQLALCHEMY_ENVELOPE_KMS": f"local:{workdir / 'master.key'}",
    }
    expect(cli("verify", "patients", env=env), 0, "key 1 (retired)", "key 2 (active)", "ok")
    expect(cli("demo", "--dir", str(workdir)), 2, "exists already")


def test_quickstart_example_runs_from_a_clone() -> None:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "quickstart.py")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    reads, holds = proc.stdout.split("What the database holds")
    assert "Ada Lovelace" in reads and "078-05-1120" in reads
    assert "Ada" not in holds and "078-05-1120" not in holds and "key 1, AES-SIV" in holds


@pytest.fixture
def console_script() -> Iterator[Path]:
    script = Path(sys.executable).parent / "sqlalchemy-envelope"
    if not script.exists():
        pytest.skip("the package is not installed with its console script")
    yield script


def test_console_script_and_light_import(console_script: Path) -> None:
    proc = subprocess.run([str(console_script), "--help"], capture_output=True, text=True)
    assert proc.returncode == 0
    for command in ("keys", "reencrypt", "verify", "demo"):
        assert command in proc.stdout

    # click and tqdm stay out of `import sqlalchemy_envelope`; without them the CLI says
    # what to install, in one line.
    code = (
        "import sys, sqlalchemy_envelope\n"
        "assert 'click' not in sys.modules and 'tqdm' not in sys.modules\n"
        "sys.modules['click'] = None\n"
        "import sqlalchemy_envelope.cli\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 1
    assert proc.stderr.strip() == (
        "sqlalchemy-envelope: the command line needs click: pip install 'sqlalchemy-envelope[cli]'"
    )


def test_a_table_in_another_schema(pg_url: str, tmp_path: Path) -> None:
    """--schema reaches a table outside the default schema, from the database alone."""
    db = populate(pg_url, tmp_path / "master.key")
    engine = sa.create_engine(pg_url)
    schema = f"s_{os.urandom(6).hex()}"
    try:
        with engine.begin() as conn:
            conn.execute(sa.text(f"CREATE SCHEMA {schema}"))
            conn.execute(sa.text(f"CREATE TABLE {schema}.patients AS SELECT * FROM patients"))
            conn.execute(sa.text(f"ALTER TABLE {schema}.patients ADD PRIMARY KEY (id)"))
        expect(db.cli("verify", "patients", "--schema", schema), 0, "table patients", "ok")
        old = active_key(db, "patients")
        expect(db.cli("keys", "rotate", "patients"), 0)
        moved = expect(db.cli("reencrypt", "patients", "--schema", schema), 0)
        assert f"{PATIENTS} rows scanned" in moved.out
        report = json.loads(
            expect(db.cli("verify", "patients", "--schema", schema, "--json"), 0).out
        )
        assert str(old) not in report["by_key"]
        expect(db.cli("verify", "patients", "--schema", "nope"), 1)
    finally:
        with engine.begin() as conn:
            conn.execute(sa.text(f"DROP SCHEMA {schema} CASCADE"))
        engine.dispose()
