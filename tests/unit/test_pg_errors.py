"""Store errors carry the server's message, never its DETAIL (which may list a row's secrets)."""

from __future__ import annotations

import asyncpg

from desired.db.pool import translate
from desired.errors import StoreError, UniqueViolation


def _error(cls, message: str, detail: str):
    exc = cls(message)
    exc.message, exc.detail = message, detail
    return exc


def test_a_failing_rows_detail_never_reaches_the_store_error():
    exc = _error(asyncpg.exceptions.CheckViolationError, "new row violates check constraint \"t\"",
                 "Failing row contains (g1, SECRET-TOKEN).")
    assert "SECRET-TOKEN" in str(exc)  # the driver's text has it
    err = translate(exc)
    assert isinstance(err, StoreError) and "SECRET-TOKEN" not in str(err) and "check constraint" in str(err)


def test_a_unique_violation_keeps_its_constraint_but_not_the_key():
    exc = _error(asyncpg.exceptions.UniqueViolationError, "duplicate key value violates unique constraint",
                 "Key (image_ref)=(SECRET) already exists.")
    exc.constraint_name = "engine_versions_image_ref_key"
    err = translate(exc)
    assert isinstance(err, UniqueViolation) and err.constraint == "engine_versions_image_ref_key"
    assert "SECRET" not in str(err)


def test_a_value_the_driver_refuses_before_sending_is_no_outage():
    """Red-team, stop 43: asyncpg's client-side refusals (a connection setting such as ``sslmode=bogus``, a
    value it cannot encode) are both InterfaceError and ValueError; taken for an outage, start-up waited
    for Postgres and the intake would have retried the same entry for ever."""
    from desired.errors import StoreUnavailable
    for exc in (asyncpg.exceptions.ClientConfigurationError("sslmode is not a valid value"),
                asyncpg.exceptions._base.DataError("value out of int64 range")):
        err = translate(exc)
        assert isinstance(err, StoreError) and not isinstance(err, StoreUnavailable), exc
    # a connection that went away is still an outage
    assert isinstance(translate(asyncpg.exceptions.ConnectionDoesNotExistError("gone")), StoreUnavailable)
