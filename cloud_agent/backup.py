"""`edgeloop cloud backup`: a copy of what a cloud cannot be rebuilt without, taken while it
serves.

- the embedded SQLite database, through SQLite's online backup API: a consistent copy even
  while the cloud writes (copying the file of a WAL database with `cp` may not be);
- `server.key`, the bundle-signing key every device pinned at enrollment: without it no bundle
  published afterwards is accepted, and the cloud refuses to start with another;
- `admin.token` and the published bundles' directory.

With PostgreSQL the database is left to `pg_dump`; the files are copied all the same. The copy
is a data directory: `edgeloop cloud serve --data-dir BACKUP` serves from it.
"""

from __future__ import annotations

import shutil
import sqlite3
from pathlib import Path

from sqlalchemy.engine import make_url

from cloud_agent.config import DATABASE_FILE, CloudConfig
from cloud_agent.errors import BackupError

__all__ = ["backup"]

SECRETS = ("server.key", "admin.token")
"""Files only the owner may read, in the copy as in the original."""


def backup(config: CloudConfig, destination: Path) -> list[Path]:
    """Copy `config`'s cloud into `destination` (new, or an empty directory); returns what was
    written. Raises `BackupError` if `destination` holds anything or nothing is there to copy."""
    if destination.exists() and (not destination.is_dir() or any(destination.iterdir())):
        raise BackupError(f"{destination} is not an empty directory: nothing was written")
    database = _sqlite_file(config)
    if database is not None and not database.exists():
        raise BackupError(f"no cloud database at {database}: give the cloud's --data-dir")
    if database is None and not (config.data_dir / "server.key").exists():
        raise BackupError(f"no server.key in {config.data_dir}: give the cloud's --data-dir")
    destination.mkdir(parents=True, exist_ok=True)
    written = []
    if database is not None:
        target = destination / DATABASE_FILE
        source = sqlite3.connect(database)  # only read: one snapshot, writers go on (WAL)
        try:
            copy = sqlite3.connect(target)
            try:
                source.backup(copy)
            finally:
                copy.close()
        finally:
            source.close()
        written.append(target)
    for name in SECRETS:
        if (config.data_dir / name).exists():
            target = destination / name
            shutil.copy2(config.data_dir / name, target)
            target.chmod(0o600)
            written.append(target)
    if (bundles := config.data_dir / "bundles").is_dir():
        shutil.copytree(bundles, destination / "bundles")
        written.append(destination / "bundles")
    return written


def _sqlite_file(config: CloudConfig) -> Path | None:
    """The embedded database's file; None for PostgreSQL."""
    url = make_url(config.resolved_database_url())
    if url.get_backend_name() != "sqlite":
        return None
    return Path(url.database or "")
