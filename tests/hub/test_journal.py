"""The document journal: order, uids, group commit, durability, queries, SIGKILL consistency."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from bluesky import plans as bp
from bluesky.run_engine import RunEngine
from event_model import compose_resource, compose_run, pack_datum_page, pack_event_page
from ophyd_async.core import soft_signal_rw

from labd.journal import Journal, JournalClosed
from tests.hub.conftest import in_re_loop, synthetic_run

ROOT = Path(__file__).resolve().parents[2]


def test_documents_are_journaled_in_order_with_uid_run_and_stream(journal: Journal) -> None:
    docs = synthetic_run(5) + synthetic_run(3, stream="sample")
    for name, doc in docs:
        journal.append(name, doc)
    assert journal.flush(timeout=10)
    recs = journal.read_after(0, limit=100)
    assert [r.seq for r in recs] == list(range(1, len(docs) + 1))
    assert [(r.name, r.doc) for r in recs] == [(n, d) for n, d in docs]
    first_run = docs[0][1]["uid"]
    assert {r.run_uid for r in recs[:8]} == {first_run}
    assert [r.uid for r in recs[:8]] == [d["uid"] for _, d in docs[:8]]
    assert [r.stream for r in recs[8:]] == [None, "sample", "sample", "sample", "sample", None]
    assert [r.seq for r in journal.read_after(5, limit=3)] == [6, 7, 8]
    assert [r.seq for r in journal.run_documents(first_run)] == list(range(1, 9))


def test_event_and_datum_pages_are_unpacked_into_rows_with_their_own_uids(
    journal: Journal,
) -> None:
    bundle = compose_run()
    desc = bundle.compose_descriptor(
        name="primary", data_keys={"x": {"dtype": "number", "shape": [], "source": "s"}})
    events = [desc.compose_event(data={"x": i}, timestamps={"x": 0.0}, seq_num=i + 1)
              for i in range(3)]
    res = compose_resource(spec="NPY", root="/", resource_path="a.npy", resource_kwargs={},
                           start=bundle.start_doc)
    datums = [res.compose_datum(datum_kwargs={"i": i}) for i in range(2)]
    journal.append("start", bundle.start_doc)
    journal.append("descriptor", desc.descriptor_doc)
    last = journal.append("event_page", pack_event_page(*events))
    journal.append("resource", res.resource_doc)
    journal.append("datum_page", pack_datum_page(*datums))
    assert last == 5  # a page of three events takes three sequence numbers
    journal.flush(timeout=10)
    recs = journal.read_after(0)
    assert [r.name for r in recs] == ["start", "descriptor", "event", "event", "event",
                                      "resource", "datum", "datum"]
    assert [r.uid for r in recs[2:5]] == [e["uid"] for e in events]
    assert [r.uid for r in recs[6:]] == [d["datum_id"] for d in datums]
    assert {r.run_uid for r in recs} == {bundle.start_doc["uid"]}


def test_group_commit_takes_many_documents_per_transaction(journal: Journal) -> None:
    docs = synthetic_run(20_000)
    for name, doc in docs:
        journal.append(name, doc)
    assert journal.flush(timeout=60)
    assert journal.count() == len(docs)
    # One fsync per batch: a burst is committed in a few large transactions, not one per doc.
    assert journal.batches <= len(docs) // 20, journal.batches
    run = journal.runs()[0]
    assert run.num_events == 20_000 and run.exit_status == "success"


def test_wait_durable_and_reopen_continue_the_sequence(tmp_path: Path) -> None:
    path = tmp_path / "j.sqlite"
    j = Journal(path)
    seqs = [j.append(n, d) for n, d in synthetic_run(2)]
    assert j.wait_durable(seqs[-1], timeout=10)
    assert j.durable_seq == seqs[-1] == 5
    j.set_cursor("hub", 3)
    j.close()
    with pytest.raises(JournalClosed, match="is closed"):
        j.append("start", {"uid": "x", "time": 0.0})
    j2 = Journal(path)
    assert j2.get_cursor("hub") == 3 and j2.get_cursor("other") == 0
    assert j2.append(*synthetic_run(0)[0]) == 6
    j2.close()  # close() drains: the document appended just before is on disk
    assert sqlite3.connect(path).execute("SELECT MAX(seq) FROM documents").fetchone()[0] == 6


def test_numpy_values_and_nan_are_stored_as_strict_json(journal: Journal) -> None:
    bundle = compose_run(metadata={"scan": np.arange(3), "gain": np.float32(2.5),
                                   "bad": [float("nan"), float("inf"), 1.0]})
    journal.append("start", bundle.start_doc)
    journal.flush(timeout=10)
    text = journal.read_after(0)[0].doc_json
    doc = json.loads(text, parse_constant=lambda c: pytest.fail(f"{c} is not JSON"))
    assert doc["scan"] == [0, 1, 2] and doc["gain"] == 2.5 and doc["bad"] == [None, None, 1.0]


def test_runs_are_filtered_by_time_plan_protocol_and_campaign(journal: Journal) -> None:
    specs = [("alloy", "synth", "A"), ("alloy", "anneal", "B"), ("other", "synth", "A")]
    for plan, protocol, campaign in specs:
        for n, d in synthetic_run(1, metadata={"plan_name": plan, "protocol": protocol,
                                               "campaign": campaign}):
            journal.append(n, d)
    journal.flush(timeout=10)
    runs = journal.runs()
    assert [r.plan_name for r in runs] == ["alloy", "alloy", "other"]
    assert [r.protocol for r in journal.runs(campaign="A")] == ["synth", "synth"]
    assert [r.campaign for r in journal.runs(protocol="synth", plan_name="other")] == ["A"]
    assert journal.runs(since=runs[1].start_time) == runs[1:]
    assert journal.runs(until=runs[1].start_time) == runs[:1]
    assert journal.runs(limit=1) == runs[2:]
    assert journal.run(runs[0].uid) == runs[0] and journal.run("nope") is None


def test_real_runengine_documents_reach_the_journal_in_emission_order(
    RE: RunEngine, journal: Journal
) -> None:
    seen: list[tuple[str, dict]] = []
    RE.subscribe(journal.subscriber)
    RE.subscribe(lambda name, doc: seen.append((name, doc)))
    sig = soft_signal_rw(float, name="x")
    in_re_loop(sig.connect())
    (uid,) = RE(bp.count([sig], num=200), campaign="c7", protocol="count").run_start_uids
    assert journal.flush(timeout=10)
    recs = journal.run_documents(uid)
    assert [(r.name, r.uid) for r in recs] == [
        (n, d["uid"]) for n, d in seen]
    run = journal.run(uid)
    assert run is not None
    assert (run.plan_name, run.campaign, run.protocol) == ("count", "c7", "count")
    assert (run.exit_status, run.num_events) == ("success", 200)


CHILD = textwrap.dedent("""
    import sys
    from labd.journal import Journal
    from tests.hub.conftest import synthetic_run
    j = Journal(sys.argv[1])
    while True:  # runs of 500 events, forever; report what is durable
        for name, doc in synthetic_run(500):
            j.append(name, doc)
        j.wait_durable(j.last_seq - 100)
        print(j.durable_seq, flush=True)
""")


def test_sigkill_loses_at_most_the_last_batch_and_leaves_a_consistent_journal(
    tmp_path: Path,
) -> None:
    path = tmp_path / "j.sqlite"
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(path)], cwd=ROOT,
                             stdout=subprocess.PIPE, text=True)
    assert child.stdout is not None
    reported = 0
    try:
        for line in child.stdout:  # wait on the child's own report of durable documents
            reported = int(line)
            if reported >= 8000:
                break
        os.kill(child.pid, signal.SIGKILL)
    finally:
        child.kill()
        child.wait()
    assert child.returncode == -signal.SIGKILL
    db = sqlite3.connect(path)
    assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    seqs = [r[0] for r in db.execute("SELECT seq FROM documents ORDER BY seq")]
    assert seqs[0] == 1 and seqs == list(range(1, len(seqs) + 1))  # no gap, no partial batch
    assert len(seqs) >= reported  # what was reported durable survived
    db.close()
    j = Journal(path)
    try:
        for run in j.runs():
            recs = j.run_documents(run.uid)
            assert recs[0].name == "start"
            events = [r.doc for r in recs if r.name == "event"]
            assert [e["seq_num"] for e in events] == list(range(1, len(events) + 1))
            assert run.num_events == len(events)
            assert (run.exit_status is not None) == (recs[-1].name == "stop")
            json.loads(recs[-1].doc_json)
        assert j.append("start", synthetic_run(0)[0][1]) == len(seqs) + 1
    finally:
        j.close()
