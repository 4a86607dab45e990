"""Many writers, one results store: a writer locked out past its timeout keeps its result beside the store, the next
writer (or `posttrain eval --flush-pending`) stores it exactly once, and a store on a network filesystem uses
SQLite's rollback journal instead of WAL."""

import json
import sqlite3
from pathlib import Path

import pytest

from posttrain.cli import main
from posttrain.evaluation import store as store_module
from posttrain.evaluation.store import ResultRecord, ResultsStore, StoreError, filesystem_type

REPO = Path(__file__).resolve().parent.parent


def record(model="m", bench="arith", acc=0.5) -> ResultRecord:
    return ResultRecord(model=model, model_label=model, benchmark=bench, settings={"t": 0},
                        metrics={"accuracy": acc, "accuracy_stderr": 0.01}, n=10, samples_path=f"samples/{model}.jsonl")  # fmt: skip


def hold_write_lock(path: Path) -> sqlite3.Connection:
    """Another writer in the middle of a write transaction (what a slow job on another node looks like)."""
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("BEGIN IMMEDIATE")
    return conn


@pytest.mark.parametrize("journal", ["wal", "delete"])
def test_a_writer_locked_out_keeps_its_result_and_the_next_writer_stores_it_once(tmp_path, journal):
    path = tmp_path / "r.db"
    locked_out = ResultsStore(path, timeout=0.2, journal=journal)
    foreign = hold_write_lock(path)
    assert locked_out.add(record("late", acc=0.7)) is None  # waited 0.2 s, then kept it
    (kept,) = locked_out.kept
    assert kept.parent == tmp_path / "r.db.pending" and locked_out.pending() == [kept]
    assert json.loads(kept.read_text())["metrics"]["accuracy"] == 0.7
    assert json.loads(kept.read_text())["samples_path"] == "samples/late.jsonl"  # where its samples are
    foreign.execute("ROLLBACK")
    foreign.close()
    content = kept.read_text()

    next_writer = ResultsStore(path, timeout=0.2, journal=journal)
    assert next_writer.add(record("next", acc=0.9)) is not None
    rows = next_writer.query()
    assert [(r.model, r.metrics["accuracy"]) for r in rows] == [("late", 0.7), ("next", 0.9)]  # by creation time
    assert next_writer.pending() == [] and not next_writer.kept

    # A loader killed after its commit but before removing the file: loading it again stores nothing twice.
    kept.write_text(content)
    assert next_writer.flush_pending() == 0
    assert len(next_writer.query()) == 2 and next_writer.pending() == []
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == journal


def test_flush_pending_stores_what_waits_and_refuses_while_still_locked(tmp_path, capsys):
    path = tmp_path / "r.db"
    store = ResultsStore(path, timeout=0.2)
    foreign = hold_write_lock(path)
    store.add(record("a"))
    store.add(record("b"))
    with pytest.raises(StoreError, match="still locked by another writer.*nothing lost"):
        store.flush_pending()
    assert len(store.pending()) == 2
    (store.pending_dir / "notes.json").write_text("not a record")  # left alone, never deleted
    foreign.execute("ROLLBACK")
    foreign.close()
    assert main(["eval", "--flush-pending", "--store", str(path)]) == 0
    assert "stored 2 new result(s) from the 3 file(s) that waited in" in capsys.readouterr().out
    assert sorted(r.model for r in store.query()) == ["a", "b"]
    assert [p.name for p in store.pending()] == ["notes.json"]


def test_eval_locked_out_of_the_store_loses_nothing(tmp_path, tiny_model_dir, capsys):
    """`posttrain eval` into a store another writer holds: exit 0 with one warning, the result and its samples kept;
    the next eval stores both results, and the leaderboard warns while any wait."""
    store, samples = tmp_path / "r.db", tmp_path / "samples"
    suite = str(REPO / "eval" / "suites" / "arithmetic.yaml")
    args = ["eval", "--model", str(tiny_model_dir), "--suite", suite, "--store", str(store), "--samples-dir",
            str(samples), "--limit", "8", "--store-timeout", "0.3"]  # fmt: skip
    ResultsStore(store)
    foreign = hold_write_lock(store)
    assert main([*args, "--label", "first"]) == 0
    err = capsys.readouterr().err
    assert "stayed locked by another writer for 0.3 s: 1 of 1 result(s) kept in" in err and "nothing was lost" in err
    (kept,) = ResultsStore(store).pending()
    assert Path(json.loads(kept.read_text())["samples_path"]).is_file()
    assert main(["leaderboard", "--store", str(store), "--out", str(tmp_path / "board"), "--runs", str(tmp_path)]) == 0
    assert "1 result(s) wait in" in capsys.readouterr().err
    foreign.execute("ROLLBACK")
    foreign.close()
    assert main([*args, "--label", "second"]) == 0
    assert [r.model_label for r in ResultsStore(store).query()] == ["first", "second"]
    assert ResultsStore(store).pending() == []


def test_a_store_on_a_network_filesystem_uses_the_rollback_journal(tmp_path, monkeypatch):
    mounts = tmp_path / "mounts"
    mounts.write_text(
        "/dev/sda1 / ext4 rw 0 0\n"
        "nas:/export /shared nfs4 rw,relatime 0 0\n"
        "mds@tcp:/lfs /shared/big\\040disk lustre rw 0 0\n"
    )
    assert filesystem_type("/home/me/eval", mounts) == "ext4"
    assert filesystem_type("/shared/eval/results.db", mounts) == "nfs4"
    assert filesystem_type("/shared/big disk/eval", mounts) == "lustre"
    assert filesystem_type("/sharedx", mounts) == "ext4"
    assert filesystem_type("/x", tmp_path / "no-mounts") is None

    monkeypatch.setattr(store_module, "filesystem_type", lambda path, mounts=None: "nfs4")
    on_nfs = ResultsStore(tmp_path / "r.db")
    on_nfs.add(record())
    assert on_nfs.journal == "delete"
    with sqlite3.connect(tmp_path / "r.db") as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "delete"
    assert not (tmp_path / "r.db-wal").exists()
    monkeypatch.setattr(store_module, "filesystem_type", lambda path, mounts=None: "ext4")
    assert ResultsStore(tmp_path / "r.db").journal == "wal"
