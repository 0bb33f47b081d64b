"""An attacker holding a dump or a backup: pg_dump output and a SQLite file hold only ciphertext.

Distinctive values are planted in every kind of encrypted column (randomized,
deterministic, JSON, text, datetime, enum); the dump is searched for them as
text, as hex (how bytea is dumped) and for every key the process held.
"""

from __future__ import annotations

import base64
import datetime as dt
import decimal
import os
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session

from sqlalchemy_envelope import LocalKms

from .models import App, Color, build

PLANTED = {
    "name": "Zebulon Quartzfeather",
    "email": "zebulon.quartzfeather@planted.example",
    "ssn": "987-65-4320",
    "notes": {"diagnosis": "xylophonitis-planted", "codes": ["PLT-4242"]},
    "reason": "planted visit reason: chronic quokka syndrome",
}
MARKERS = [
    "Zebulon",
    "Quartzfeather",
    "quartzfeather@planted",
    "987-65-4320",
    "xylophonitis",
    "PLT-4242",
    "quokka",
]


def populate(app: App, engine: sa.Engine) -> None:
    when = dt.datetime(1999, 12, 31, 23, 59, tzinfo=dt.timezone(dt.timedelta(hours=5)))
    with Session(engine) as s:
        p = app.Patient(
            name=PLANTED["name"], email=PLANTED["email"], ssn=PLANTED["ssn"], notes=PLANTED["notes"]
        )
        p.visits.append(
            app.Visit(
                reason=PLANTED["reason"], at=when, fee=decimal.Decimal("4242.42"), color=Color.BLUE
            )
        )
        s.add(p)
        s.add(app.Doctor(name="Dr. Quartzfeather", plain="visible on purpose"))
        s.add_all(
            app.Patient(name=f"{PLANTED['name']} {i}", email=f"{i}.{PLANTED['email']}")
            for i in range(20)
        )
        s.commit()


def data_keys(app: App) -> list[bytes]:
    cache = app.envelope._keys().cache
    return [key.material for _, key in list(cache._entries.values())]


def check(text: bytes, secrets: list[bytes]) -> None:
    lowered = text.lower()
    for marker in MARKERS:
        for form in (marker.encode(), marker.encode().hex().encode()):
            assert form.lower() not in lowered, f"the dump holds {marker!r} ({form[:20]!r})"
    for secret in secrets:
        for form in (secret, secret.hex().encode(), base64.b64encode(secret)):
            assert form not in text, "the dump holds key material"


def test_pg_dump_holds_no_plaintext(pg_url: str, make_engine: Callable[..., sa.Engine]) -> None:
    pg_dump = shutil.which("pg_dump") or "/usr/bin/pg_dump"
    if not os.path.exists(pg_dump):
        pytest.skip("!!! SKIPPED: pg_dump is not installed !!!")
    master = os.urandom(32)
    app = build()
    engine = make_engine(pg_url)
    app.Base.metadata.create_all(engine)
    app.envelope.configure(kms=LocalKms(master), engine=engine)
    populate(app, engine)
    url = sa.make_url(pg_url)
    schema = url.query["options"].split("search_path=")[1]
    env = {**os.environ, "PGPASSWORD": url.password or ""}
    command = [pg_dump, "-h", url.host or "127.0.0.1", "-p", str(url.port or 5432)]
    command += ["-U", url.username or "postgres", "-n", schema, "--no-owner", url.database or ""]
    dump = subprocess.run(command, env=env, capture_output=True, check=True, timeout=60).stdout
    # The dump does hold the data: every table, the keyring's wrapped keys, the plain column.
    for table in ("patients", "visits", "doctors", "envelope_data_keys"):
        assert f"COPY {schema}.{table}".encode() in dump
    assert b"visible on purpose" in dump
    t = app.envelope.table
    with engine.connect() as conn:
        wrapped = [bytes(w) for w in conn.execute(sa.select(t.c.wrapped_key)).scalars()]
    assert wrapped and all(w.hex().encode() in dump for w in wrapped)
    check(dump, [master, *data_keys(app)])


def test_sqlite_file_holds_no_plaintext(
    tmp_path: Path, make_engine: Callable[..., sa.Engine]
) -> None:
    master = os.urandom(32)
    path = tmp_path / "backup.db"
    app = build()
    engine = make_engine(f"sqlite:///{path}")
    app.Base.metadata.create_all(engine)
    app.envelope.configure(kms=LocalKms(master), engine=engine)
    populate(app, engine)
    keys = data_keys(app)
    app.envelope.dispose()
    engine.dispose()
    raw = path.read_bytes()
    assert b"visible on purpose" in raw
    check(raw, [master, *keys])
    for side in tmp_path.glob("backup.db-*"):  # journal or WAL, if any is left
        check(side.read_bytes(), [master, *keys])


@pytest.mark.parametrize("rewrite", [False, True], ids=["as-swapped", "after-vacuum-full"])
def test_a_converted_column_leaves_its_plaintext_in_the_table_file_until_rewritten(
    pg_url: str, make_engine: Callable[..., sa.Engine], rewrite: bool
) -> None:
    """NOT protected: PostgreSQL's DROP COLUMN hides the old plaintext, the file keeps it."""
    from sqlalchemy_envelope import Encrypted, Envelope
    from sqlalchemy_envelope.jobs import encrypt_column

    engine = make_engine(pg_url)
    envelope = Envelope(sa.MetaData())
    envelope.metadata.create_all(engine)  # type: ignore[union-attr]
    envelope.configure(kms=LocalKms(os.urandom(32)), engine=engine)
    secret = "PLANTED-CONVERTED-qz91"
    with engine.begin() as conn:
        conn.exec_driver_sql("CREATE TABLE people (id int PRIMARY KEY, ssn varchar(40))")
        conn.exec_driver_sql(f"INSERT INTO people VALUES (1, '{secret}')")
    encrypt_column(envelope, engine, "people", "ssn", Encrypted(sa.String(40)))
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        if rewrite:
            conn.exec_driver_sql("VACUUM FULL people")
        conn.exec_driver_sql("CHECKPOINT")
        heap = conn.exec_driver_sql(
            "SELECT pg_read_binary_file(pg_relation_filepath('people'))"
        ).scalar_one()
    assert (secret.encode() in bytes(heap)) is not rewrite
