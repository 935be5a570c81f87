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
