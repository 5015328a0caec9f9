"""The SQLite project store (the default): one database file per pod, opened safely, at the current schema."""

from executor.data.sqlite.schema import MIGRATIONS, SCHEMA_VERSION
from executor.data.sqlite.store import ProjectDatabase

__all__ = ["MIGRATIONS", "SCHEMA_VERSION", "ProjectDatabase"]
