"""Results store: every evaluation appends one row to a SQLite database (default `eval/results.db`).

Rows are keyed by model, benchmark, suite version and a hash of everything that determines the numbers
(generation settings, grader, data source, prompt template); a re-run with identical settings gets the same
`settings_hash`, so it is recognisable and the leaderboard can show the latest. Rows are only ever inserted:
results already stored are never rewritten or lost. SQLite in WAL mode with `BEGIN IMMEDIATE` transactions and a
busy timeout lets two evaluations write at once without corrupting the file.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from posttrain.errors import PosttrainError

DEFAULT_PATH = Path("eval/results.db")
SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS results (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    model TEXT NOT NULL,
    model_label TEXT NOT NULL,
    benchmark TEXT NOT NULL,
    suite TEXT,
    suite_version TEXT,
    settings_hash TEXT NOT NULL,
    settings TEXT NOT NULL,
    metrics TEXT NOT NULL,
    n INTEGER NOT NULL,
    samples_path TEXT,
    created REAL NOT NULL,
    run_dir TEXT,
    step INTEGER
);
CREATE INDEX IF NOT EXISTS results_key ON results (model, benchmark, settings_hash);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""


class StoreError(PosttrainError):
    """The results database can't be opened or isn't one of ours."""


@dataclass
class ResultRecord:
    model: str  # path or hub id as given
    model_label: str  # short display name for tables
    benchmark: str
    settings: dict[str, Any]
    metrics: dict[str, float]  # e.g. accuracy, accuracy_stderr, pass@4, maj@8
    n: int
    suite: str | None = None
    suite_version: str | None = None
    samples_path: str | None = None
    run_dir: str | None = None
    step: int | None = None
    created: float = field(default_factory=time.time)
    settings_hash: str = ""
    id: int | None = None

    def __post_init__(self) -> None:
        if not self.settings_hash:
            self.settings_hash = settings_hash(self.settings)


def settings_hash(settings: dict[str, Any]) -> str:
    """A stable 12-hex-digit hash of the settings (key order doesn't matter)."""
    blob = json.dumps(settings, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:12]


class ResultsStore:
    def __init__(self, path: str | Path = DEFAULT_PATH, create: bool = True):
        """Open (and with `create`, make) the store; readers pass create=False so that a wrong path never turns
        into a new, empty database."""
        self.path = Path(path)
        self._check_file()
        if not create and (not self.path.is_file() or self.path.stat().st_size == 0):
            state = "is an empty file" if self.path.is_file() else "does not exist"
            raise StoreError(f"{self.path}: {state}, not a results store; run `posttrain eval` first (nothing written)")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            with self._connect() as conn:
                if create:
                    conn.executescript(_SCHEMA)
                    conn.execute("INSERT OR IGNORE INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
                else:
                    conn.execute("SELECT count(*) FROM results").fetchone()
        except sqlite3.OperationalError as err:
            if "locked" in str(err) or "busy" in str(err):
                raise StoreError(
                    f"{self.path}: the results store is locked by another writer (waited 30 s); retry when it finishes"
                ) from err
            raise StoreError(f"{self.path}: not a posttrain results database ({err})") from err
        except sqlite3.DatabaseError as err:
            raise StoreError(f"{self.path}: not a posttrain results database ({err})") from err

    def _check_file(self) -> None:
        if self.path.exists() and self.path.stat().st_size > 0:
            with self.path.open("rb") as fh:
                if fh.read(16) != b"SQLite format 3\x00":
                    raise StoreError(
                        f"{self.path}: is not a SQLite database; pass another path with --store (nothing was written)"
                    )

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, timeout=30.0, isolation_level=None)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA busy_timeout=30000")
        return conn

    def add(self, record: ResultRecord) -> int:
        """Insert `record` and return its id."""
        row = asdict(record)
        row.pop("id")
        row["settings"] = json.dumps(row["settings"], sort_keys=True, default=str)
        row["metrics"] = json.dumps(row["metrics"], sort_keys=True)
        cols = ", ".join(row)
        marks = ", ".join("?" for _ in row)
        conn = self._connect()
        try:
            conn.execute("BEGIN IMMEDIATE")
            cur = conn.execute(f"INSERT INTO results ({cols}) VALUES ({marks})", tuple(row.values()))
            conn.execute("COMMIT")
            record.id = int(cur.lastrowid)
            return record.id
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        finally:
            conn.close()

    def query(self, model: str | None = None, benchmark: str | None = None, settings_hash: str | None = None):
        """Matching records, oldest first."""
        where, args = [], []
        for col, value in (("model", model), ("benchmark", benchmark), ("settings_hash", settings_hash)):
            if value is not None:
                where.append(f"{col} = ?")
                args.append(value)
        sql = "SELECT * FROM results" + (f" WHERE {' AND '.join(where)}" if where else "") + " ORDER BY id"
        conn = self._connect()
        conn.row_factory = sqlite3.Row
        try:
            rows = conn.execute(sql, args).fetchall()
        finally:
            conn.close()
        return [_to_record(r) for r in rows]

    def previous_identical(self, record: ResultRecord) -> list[ResultRecord]:
        """Earlier results for the same model, benchmark and settings (a re-run of the same evaluation)."""
        return [
            r for r in self.query(record.model, record.benchmark, record.settings_hash) if r.id != record.id
        ]  # fmt: skip

    def latest(self) -> list[ResultRecord]:
        """The newest record per (model, benchmark): what a leaderboard shows."""
        newest: dict[tuple[str, str], ResultRecord] = {}
        for rec in self.query():
            newest[(rec.model, rec.benchmark)] = rec
        return list(newest.values())


def _to_record(row: sqlite3.Row) -> ResultRecord:
    data = dict(row)
    data["settings"] = json.loads(data["settings"])
    data["metrics"] = json.loads(data["metrics"])
    return ResultRecord(**data)
