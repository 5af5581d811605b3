"""Alembic migrations for the coordinator's database (async env; see ``coordinator.db.migrate``)."""
