"""Alembic migrations for the coordinator's database (async env; see ``coordinator.core.db.migrate``)."""
