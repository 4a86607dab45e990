"""Results store: every evaluation appends one row to a SQLite database (default `eval/results.db`).

Rows are keyed by model, benchmark, suite version and a hash of everything that determines the numbers
(generation settings, grader, data source, prompt template); a re-run with identical settings gets the same
`settings_hash`, so it is recognisable and the leaderboard can show the latest. Rows are only ever inserted:
results already stored are never rewritten or lost. `BEGIN IMMEDIATE` transactions and a busy timeout let several
evaluations write at once without corrupting the file.

Journal: WAL on a local disk (readers never wait for a writer); SQLite's rollback journal (`DELETE`) where the store
lies on a network filesystem (NFS, Lustre, GPFS, ... from /proc/self/mounts): WAL keeps its index in shared
memory, which processes on different hosts do not share, so two nodes writing one WAL database over NFS can corrupt
it (sqlite.org/wal.html); the rollback journal relies on the filesystem's POSIX locks only (docs/evaluation.md).

Many writers: a writer that cannot get the lock within `timeout` seconds (another node's long transaction, a slow
lock server) does not lose its result. It writes the record to `<store>.pending/<time>-<id>.json` (atomically: a
temporary file renamed into place) and goes on; the next writer loads every pending record in its own transaction,
as does `flush_pending` (`posttrain eval --flush-pending`). A record is stored once however often it is loaded: one
already there (same model, benchmark, settings hash and creation time) only has its pending file removed.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from posttrain.errors import PosttrainError

DEFAULT_PATH = Path("eval/results.db")
SCHEMA_VERSION = 1
DEFAULT_TIMEOUT_S = 30.0  # how long a writer waits for another writer's lock before keeping its result pending
PENDING_SUFFIX = ".pending"  # <store>.pending/: records a writer could not store, loaded by the next one
# Filesystem types (/proc/self/mounts) whose locks and memory are not one host's: the store uses the rollback journal.
NETWORK_FILESYSTEMS = frozenset({"nfs", "nfs4", "cifs", "smb3", "smbfs", "lustre", "gpfs", "beegfs", "ceph",
                                 "glusterfs", "fuse.glusterfs", "fuse.sshfs", "fuse.ceph", "9p", "afs", "panfs",
                                 "wekafs", "fuse.juicefs"})  # fmt: skip

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


def filesystem_type(path: str | Path, mounts: str | Path = "/proc/self/mounts") -> str | None:
    """The type of the filesystem holding `path` (the longest mount point above it in `mounts`), or None where that
    can't be told (no /proc: not Linux)."""
    target = str(Path(path).resolve())
    try:
        lines = Path(mounts).read_text().splitlines()
    except OSError:
        return None
    best, kind = "", None
    for line in lines:
        fields = line.split()
        if len(fields) < 3:
            continue
        mount = fields[1].replace("\\040", " ")  # the kernel writes a space in a mount point as \040
        inside = target == mount or target.startswith(mount.rstrip("/") + "/")
        if inside and len(mount) > len(best):
            best, kind = mount, fields[2]
    return kind


def journal_mode_for(path: str | Path) -> str:
    """'delete' (the rollback journal) for a store on a network filesystem, else 'wal' (module docstring)."""
    return "delete" if filesystem_type(Path(path).parent) in NETWORK_FILESYSTEMS else "wal"


class ResultsStore:
    def __init__(
        self, path: str | Path = DEFAULT_PATH, create: bool = True, timeout: float | None = None,
        journal: str | None = None,
    ):  # fmt: skip
        """Open (and with `create`, make) the store; readers pass create=False so that a wrong path never turns
        into a new, empty database. `timeout`: seconds a writer waits for another's lock (default
        DEFAULT_TIMEOUT_S); `journal`: SQLite's journal mode, 'wal' or 'delete' (default: chosen by the filesystem,
        `journal_mode_for`)."""
        self.path = Path(path)
        self.timeout = DEFAULT_TIMEOUT_S if timeout is None else timeout
        self.journal = journal or journal_mode_for(self.path)
        self.kept: list[Path] = []  # this writer's records kept in pending_dir (the store was locked)
        self._check_file()
        if not create and (not self.path.is_file() or self.path.stat().st_size == 0):
            state = "is an empty file" if self.path.is_file() else "does not exist"
            raise StoreError(f"{self.path}: {state}, not a results store; run `posttrain eval` first (nothing written)")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        conn = None
        try:
            conn = self._connect()
            tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            if create and not {"results", "meta"} <= tables:  # a store that has its tables needs no write to open
                conn.executescript(_SCHEMA)
                conn.execute("INSERT OR IGNORE INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
            else:
                conn.execute("SELECT count(*) FROM results").fetchone()
        except sqlite3.OperationalError as err:
            if _locked(err):
                raise StoreError(
                    f"{self.path}: the results store is locked by another writer (waited {self.timeout:g} s); "
                    "retry when it finishes"
                ) from err
            raise StoreError(f"{self.path}: not a posttrain results database ({err})") from err
        except sqlite3.DatabaseError as err:
            raise StoreError(f"{self.path}: not a posttrain results database ({err})") from err
        finally:
            if conn is not None:
                conn.close()

    @property
    def pending_dir(self) -> Path:
        return self.path.with_name(self.path.name + PENDING_SUFFIX)

    def pending(self) -> list[Path]:
        """The records waiting beside the store, oldest first (their names start with their creation time)."""
        return sorted(self.pending_dir.glob("*.json")) if self.pending_dir.is_dir() else []

    def _check_file(self) -> None:
        if self.path.exists() and self.path.stat().st_size > 0:
            with self.path.open("rb") as fh:
                if fh.read(16) != b"SQLite format 3\x00":
                    raise StoreError(
                        f"{self.path}: is not a SQLite database; pass another path with --store (nothing was written)"
                    )

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, timeout=self.timeout, isolation_level=None)
        conn.execute(f"PRAGMA busy_timeout={int(self.timeout * 1000)}")
        conn.execute(f"PRAGMA journal_mode={self.journal}")
        return conn

    def add(self, record: ResultRecord) -> int | None:
        """Insert `record`, with the records waiting in `pending_dir`, and return its id. When another writer holds
        the lock past `timeout`, the record is kept in `pending_dir` instead (listed in `self.kept`) and None is
        returned: the next writer, or `flush_pending`, stores it."""
        try:
            return self._write(record)[0]
        except sqlite3.OperationalError as err:
            if not _locked(err):
                raise
            self.kept.append(self._keep_pending(record))
            return None

    def flush_pending(self) -> int:
        """Store the records other writers left in `pending_dir`; returns how many were new to the store. A store
        still locked past `timeout` raises StoreError (the records stay where they are)."""
        try:
            return self._write(None)[1]
        except sqlite3.OperationalError as err:
            if not _locked(err):
                raise
            raise StoreError(f"{self.path}: still locked by another writer after {self.timeout:g} s; the pending "
                             f"results stay in {self.pending_dir} (nothing lost): retry later") from err  # fmt: skip

    def _write(self, record: ResultRecord | None) -> tuple[int | None, int]:
        """One transaction: the pending records not stored yet, then `record`; returns its id and how many pending
        records were new. The pending files are removed after the commit (a crash in between leaves files whose
        records are stored already: skipped next time)."""
        conn = self._connect()
        try:
            conn.execute("BEGIN IMMEDIATE")
            outcomes = {path: self._load_one(conn, path) for path in self.pending()}
            if record is not None:
                record.id = self._insert(conn, record)
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        finally:
            conn.close()
        for path, outcome in outcomes.items():
            if outcome is not None:
                path.unlink(missing_ok=True)
        return (None if record is None else record.id), sum(1 for o in outcomes.values() if o == "new")

    def _load_one(self, conn: sqlite3.Connection, path: Path) -> str | None:
        """Insert the pending record at `path` unless it is stored already: 'new' or 'stored'; None for a file that
        is not a record (left for a person to look at)."""
        try:
            record = ResultRecord(**json.loads(path.read_text()))
        except (OSError, ValueError, TypeError):
            return None  # pending files are renamed into place whole, so this one is not ours
        key = (record.model, record.benchmark, record.settings_hash, record.created)
        sql = "SELECT 1 FROM results WHERE model = ? AND benchmark = ? AND settings_hash = ? AND created = ?"
        if conn.execute(sql, key).fetchone() is not None:
            return "stored"
        self._insert(conn, record)
        return "new"

    @staticmethod
    def _insert(conn: sqlite3.Connection, record: ResultRecord) -> int:
        row = _row(record)
        cols, marks = ", ".join(row), ", ".join("?" for _ in row)
        return int(conn.execute(f"INSERT INTO results ({cols}) VALUES ({marks})", tuple(row.values())).lastrowid)

    def _keep_pending(self, record: ResultRecord) -> Path:
        """Write `record` to `pending_dir` whole: a temporary file renamed into place."""
        data = asdict(record)
        data.pop("id")
        self.pending_dir.mkdir(parents=True, exist_ok=True)
        path = self.pending_dir / f"{int(record.created * 1000):015d}-{uuid.uuid4().hex[:12]}.json"
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps(data, default=str))
        os.replace(tmp, path)
        return path

    def query(self, model: str | None = None, benchmark: str | None = None, settings_hash: str | None = None):
        """Matching records, oldest first."""
        where, args = [], []
        for col, value in (("model", model), ("benchmark", benchmark), ("settings_hash", settings_hash)):
            if value is not None:
                where.append(f"{col} = ?")
                args.append(value)
        # By creation time: a pending record stored late still sorts where it was made (the leaderboard's latest).
        sql = "SELECT * FROM results" + (f" WHERE {' AND '.join(where)}" if where else "") + " ORDER BY created, id"
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


def _locked(err: sqlite3.OperationalError) -> bool:
    return "locked" in str(err) or "busy" in str(err)


def _row(record: ResultRecord) -> dict[str, Any]:
    row = asdict(record)
    row.pop("id")
    row["settings"] = json.dumps(row["settings"], sort_keys=True, default=str)
    row["metrics"] = json.dumps(row["metrics"], sort_keys=True)
    return row


def _to_record(row: sqlite3.Row) -> ResultRecord:
    data = dict(row)
    data["settings"] = json.loads(data["settings"])
    data["metrics"] = json.loads(data["metrics"])
    return ResultRecord(**data)
