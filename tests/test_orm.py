"""The column type through the ORM, on SQLite and Postgres."""

from __future__ import annotations

import datetime as dt
import decimal
from collections.abc import Callable

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session

from sqlalchemy_envelope import EncryptedComparisonError, LocalKms

from .models import App, Color, build


@pytest.fixture
def app(
    db_url: str, make_engine: Callable[..., sa.Engine], local_kms: LocalKms
) -> tuple[App, sa.Engine]:
    app = build()
    engine = make_engine(db_url)
    app.Base.metadata.create_all(engine)
    app.envelope.configure(kms=local_kms, engine=engine)
    return app, engine


def test_round_trip_and_raw_storage(app: tuple[App, sa.Engine]) -> None:
    a, engine = app
    when = dt.datetime(2024, 5, 1, 9, 30, tzinfo=dt.timezone(dt.timedelta(hours=-4)))
    with Session(engine) as s:
        p = a.Patient(
            name="Alice Example",
            email="alice@example.org",
            ssn="123-45-6789",
            notes={"allergy": ["nuts"]},
        )
        p.visits.append(
            a.Visit(reason="checkup", at=when, fee=decimal.Decimal("120.50"), color=Color.BLUE)
        )
        s.add_all([p, a.Doctor(name="Dr. Who", plain="x")])
        s.commit()
    with Session(engine) as s:
        p = s.scalars(sa.select(a.Patient)).one()
        assert (p.name, p.email, p.ssn, p.notes) == (
            "Alice Example",
            "alice@example.org",
            "123-45-6789",
            {"allergy": ["nuts"]},
        )
        v = p.visits[0]
        assert v.at == when and v.at.utcoffset() == dt.timedelta(hours=-4)
        assert str(v.fee) == "120.50" and v.color is Color.BLUE
    with engine.connect() as conn:
        raw = conn.execute(sa.text("SELECT name, email, ssn, notes FROM patients")).one()
    for value in raw:
        assert isinstance(value, (bytes, memoryview))
        assert (
            b"Alice" not in bytes(value)
            and b"123-45" not in bytes(value)
            and b"nuts" not in bytes(value)
        )


def test_deterministic_lookup_survives_rotation(app: tuple[App, sa.Engine]) -> None:
    a, engine = app
    with Session(engine) as s:
        s.add(a.Patient(name="A", email="a@x.org"))
        s.commit()
    old = a.envelope.keys("patients")[0].id
    new = a.envelope.rotate("patients")
    assert new != old
    with Session(engine) as s:
        s.add(a.Patient(name="B", email="b@x.org"))
        s.commit()
        found = s.scalars(
            sa.select(a.Patient.name).where(a.Patient.email.in_(["a@x.org", "b@x.org"]))
        ).all()
        assert sorted(found) == ["A", "B"]
        assert s.scalars(sa.select(a.Patient.name).where(a.Patient.email == "a@x.org")).one() == "A"
        assert s.scalars(sa.select(a.Patient.name).where(a.Patient.email != "a@x.org")).all() == [
            "B"
        ]
    states = {k.id: k.state for k in a.envelope.keys("patients")}
    assert states == {old: "retired", new: "active"}


def test_randomized_comparison_refused_at_build_time(app: tuple[App, sa.Engine]) -> None:
    a, _ = app
    for build_expr in (
        lambda: a.Patient.name == "x",
        lambda: a.Patient.name != "x",
        lambda: a.Patient.name.in_(["x"]),
        lambda: a.Patient.name.like("x%"),
        lambda: a.Patient.name < "x",
    ):
        with pytest.raises(EncryptedComparisonError, match=r"patients\.name"):
            build_expr()
    with pytest.raises(EncryptedComparisonError, match=r"patients\.email"):
        _ = a.Patient.email.like("x%")
    for other in (a.Patient.name, a.Patient.__table__.c.name, a.Doctor.plain):
        # Another column, ORM attribute or not: refused when compiled, since SQLAlchemy
        # tests "column in columns" with == (its truth value is an identity test).
        for compared in (a.Patient.email == other, ~(a.Patient.email != other)):
            assert not compared
            with pytest.raises(EncryptedComparisonError, match=r"patients\.email.*another column"):
                sa.select(a.Patient.id).where(compared).compile()
    with pytest.raises(EncryptedComparisonError, match=r"patients\.name.*another column"):
        sa.select(a.Patient.id).where(a.Patient.name == a.Patient.email).compile()
    assert a.Patient.name == a.Patient.name  # itself: an identity test, as for any column
    # NULL tests work on both kinds.
    sa.select(a.Patient).where(a.Patient.ssn.is_(None), a.Patient.name.is_not(None))


def test_an_encrypted_column_on_the_right_of_an_operator_is_refused_too(
    app: tuple[App, sa.Engine],
) -> None:
    """``value <op> column`` (Python asks the column's reflected operator): ciphertext is no
    operand for arithmetic or concatenation either, whichever side it is on."""
    a, _ = app
    patients, visits = a.Patient.__table__, a.Visit.__table__
    for build_expr in (
        lambda: "Dr. " + patients.c.name,
        lambda: 1 - visits.c.fee,
        lambda: 2 * visits.c.fee,
        lambda: "x" + patients.c.email,  # deterministic: only == and != have a meaning
        lambda: "Dr. " + a.Patient.name,  # through the ORM, a literal of the column's type
    ):
        with pytest.raises(EncryptedComparisonError, match=r"(patients|visits)\.\w+ is encrypted"):
            build_expr()


def test_a_refusal_names_no_compared_value_for_an_unnamed_expression(
    app: tuple[App, sa.Engine],
) -> None:
    """An expression of an encrypted column's type with no name of its own (a CASE, a
    scalar subquery, a literal) is refused without naming the value it is compared with:
    an Enum member's name is its plaintext, and is no column."""
    a, _ = app
    visits = a.Visit.__table__
    for build_expr in (
        lambda: (
            sa.case((visits.c.fee.is_(None), visits.c.color), else_=visits.c.color) == Color.BLUE
        ),
        lambda: sa.select(visits.c.color).scalar_subquery() != Color.BLUE,
        lambda: sa.literal(Color.RED, visits.c.color.type) < Color.BLUE,
        lambda: sa.literal("Dr. ", a.Patient.name.type) + a.Doctor.plain,
    ):
        with pytest.raises(EncryptedComparisonError) as refused:
            build_expr()
        assert "BLUE" not in str(refused.value)
        assert "doctors" not in str(refused.value)  # a plaintext column is not the encrypted one
        # The column whose type the expression took, which the message's advice is about.
        assert str(refused.value).startswith(("visits.color ", "patients.name ")), refused.value


def test_orm_bulk_update_delete_and_returning(app: tuple[App, sa.Engine]) -> None:
    """The ORM compares a column with itself to find it (dict lookups): that is no comparison."""
    a, engine = app
    P = a.Patient
    with Session(engine) as s:
        s.add_all([P(id=1, name="one", email="one@x.org"), P(id=2, name="two", email="two@x.org")])
        s.commit()
    for sync in ("auto", "fetch"):
        with Session(engine) as s:
            one, two = s.get(P, 1), s.get(P, 2)
            assert one is not None and two is not None
            options = {"synchronize_session": sync}
            s.execute(
                sa.update(P).where(P.id == 1).values(name=f"a {sync}"), execution_options=options
            )
            s.execute(
                sa.update(P).where(P.email == "two@x.org").values(ssn=f"b {sync}"),
                execution_options=options,
            )
            # The session's objects follow, before any commit expires them.
            assert (one.name, two.ssn, one.ssn) == (f"a {sync}", f"b {sync}", None)
            s.commit()
    with Session(engine) as s, pytest.raises(sa.exc.InvalidRequestError, match="evaluate"):
        s.get(P, 2)  # the evaluator cannot compare plaintext with ciphertext: it says so
        s.execute(
            sa.delete(P).where(P.email == "two@x.org"),
            execution_options={"synchronize_session": "evaluate"},
        )
    with Session(engine) as s:
        two = s.get(P, 2)
        s.execute(sa.delete(P).where(P.email == "two@x.org"))
        assert two in s.deleted or sa.inspect(two).was_deleted
        s.commit()
    with Session(engine) as s:
        [returned] = s.scalars(sa.update(P).where(P.id == 1).values(name="r").returning(P)).all()
        assert returned.name == "r"
        inserted = s.scalars(
            sa.insert(P).returning(P.name), [{"id": 3, "name": "n3", "email": "e3"}]
        )
        assert inserted.all() == ["n3"]
        entities = s.scalars(  # the whole entity: SQLAlchemy looks its columns up with ==
            sa.insert(P).returning(P),
            [
                {"id": 4, "name": "n4", "email": "e4", "ssn": "s4"},
                {"id": 5, "name": "n5", "email": "e5"},
            ],
        ).all()
        assert [(p.id, p.name, p.email, p.ssn) for p in entities] == [
            (4, "n4", "e4", "s4"),
            (5, "n5", "e5", None),
        ]
        s.execute(sa.delete(P).where(P.id > 1))
        s.commit()
        assert s.scalars(sa.select(P.id).order_by(P.id)).all() == [1]
