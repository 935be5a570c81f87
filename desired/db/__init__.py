"""The PostgreSQL side of ``desired/``: the only package that imports asyncpg.

``store.Store`` is the facade that composes the parts (records, transitions, submissions, outbox,
registry, marks, identity); ``pool``, ``migrate``, ``lease`` and ``notifications`` have
connections of their own. asyncpg's errors do not leave the package: an outage becomes
``StoreUnavailable`` (retry), a unique violation ``UniqueViolation`` (naming its constraint),
anything else ``StoreError``.
"""
