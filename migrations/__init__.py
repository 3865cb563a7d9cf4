"""Alembic migrations (one dialect-neutral tree; batch mode on SQLite)."""
