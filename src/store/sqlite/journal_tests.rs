//! The embedded store behind the cores' journals: group commit, the read
//! barrier, replay at start, and a journal answering resends.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use super::fixtures::{block, msg, session};
use super::SqliteStore;
use crate::crypto::KeyRing;
use crate::pool::{BlockingPool, PoolRuntime};
use crate::store::journal::{self, Journal, Logged};
use crate::store::{Store, WriteOp, WriteOutcome};

/// Long enough that nothing in a test commits on time alone.
const NEVER: Duration = Duration::from_secs(10);

fn ring() -> KeyRing {
    KeyRing::new(&"33".repeat(32), &[]).unwrap()
}

fn store(dir: &std::path::Path, pool: &BlockingPool) -> SqliteStore {
    SqliteStore::open_with(dir, pool.clone(), 1, 64, NEVER).unwrap()
}

fn append(ring: &KeyRing, sid: &str, seq: u64, id: &str, client: Option<&str>) -> WriteOp {
    WriteOp::AppendMessage {
        user_id: "u1".into(),
        message: msg(ring, sid, seq, id, client, "text"),
    }
}

fn logged(lsn: u64, committed: &Arc<AtomicU64>) -> Logged {
    Logged {
        journal: "j".into(),
        lsn,
        committed: committed.clone(),
    }
}

#[test]
fn journaled_writes_commit_late_and_reads_never_run_ahead_of_them() {
    let dir = tempfile::tempdir().unwrap();
    let (_rt, pool) = PoolRuntime::start(1, 64).unwrap();
    let (ring, committed) = (ring(), Arc::new(AtomicU64::new(0)));
    let store = store(dir.path(), &pool);
    let first = vec![
        WriteOp::CreateSession(session("s1")),
        append(&ring, "s1", 1, "m1", None),
    ];
    store.write_logged(logged(1, &committed), first).unwrap();
    store
        .write_logged(
            logged(2, &committed),
            vec![append(&ring, "s1", 2, "m2", None)],
        )
        .unwrap();
    assert_eq!(
        committed.load(Ordering::SeqCst),
        0,
        "not committed before its interval"
    );
    // A read asks for the commit first, and sees both.
    let (s, msgs) = block(store.load_session("s1", 10)).unwrap().unwrap();
    assert_eq!((s.message_count, msgs.len()), (2, 2));
    assert_eq!(
        committed.load(Ordering::SeqCst),
        2,
        "the commit says how far it got"
    );
}

#[test]
fn a_failing_journaled_job_leaves_the_rest_of_its_group() {
    let dir = tempfile::tempdir().unwrap();
    let (_rt, pool) = PoolRuntime::start(1, 64).unwrap();
    let (ring, committed) = (ring(), Arc::new(AtomicU64::new(0)));
    let store = store(dir.path(), &pool);
    let jobs = [
        vec![WriteOp::CreateSession(session("s1"))],
        // No such session: refused, after the first job and before the third.
        vec![append(&ring, "gone", 1, "m1", None)],
        vec![
            WriteOp::CreateSession(session("s2")),
            append(&ring, "s2", 1, "m2", None),
        ],
    ];
    for (i, ops) in jobs.into_iter().enumerate() {
        store
            .write_logged(logged(i as u64 + 1, &committed), ops)
            .unwrap();
    }
    block(store.commit()).unwrap();
    assert!(block(store.load_session("s1", 10)).unwrap().is_some());
    let (_, msgs) = block(store.load_session("s2", 10)).unwrap().unwrap();
    assert_eq!(msgs.len(), 1);
    assert_eq!(committed.load(Ordering::SeqCst), 3);
}

#[test]
fn a_restart_applies_only_what_the_database_lacks_then_drops_the_journals() {
    let dir = tempfile::tempdir().unwrap();
    let (_rt, pool) = PoolRuntime::start(1, 64).unwrap();
    let ring = ring();
    // Committed before the crash: the session and its first message (record 2).
    let committed = Arc::new(AtomicU64::new(0));
    {
        let store = store(dir.path(), &pool);
        let first = vec![
            WriteOp::CreateSession(session("s1")),
            append(&ring, "s1", 1, "m1", None),
        ];
        store.write_logged(logged(2, &committed), first).unwrap();
        block(store.commit()).unwrap();
    }
    // The journal as the crash left it: records 1 to 3 (1 was another job), and
    // a record cut short.
    let journals = dir.path().join(journal::DIR);
    std::fs::create_dir_all(&journals).unwrap();
    let mut bytes = Vec::new();
    journal::encode(1, &[WriteOp::CreateSession(session("s0"))], &mut bytes).unwrap();
    let first = [
        WriteOp::CreateSession(session("s1")),
        append(&ring, "s1", 1, "m1", None),
    ];
    journal::encode(2, &first, &mut bytes).unwrap();
    journal::encode(3, &[append(&ring, "s1", 2, "m2", Some("c2"))], &mut bytes).unwrap();
    let whole = bytes.len();
    journal::encode(4, &[append(&ring, "s1", 3, "m3", None)], &mut bytes).unwrap();
    bytes.truncate(whole + 10);
    std::fs::write(journals.join("j.000000.log"), &bytes).unwrap();

    let store = store(dir.path(), &pool);
    let (s, msgs) = block(store.load_session("s1", 10)).unwrap().unwrap();
    let ids: Vec<&str> = msgs.iter().map(|m| m.message_id.as_str()).collect();
    assert_eq!(
        ids,
        ["m1", "m2"],
        "m1 once, m2 replayed, the torn m3 never acked"
    );
    assert_eq!(s.message_count, 2);
    assert!(
        block(store.load_session("s0", 10)).unwrap().is_none(),
        "record 1 was behind the committed record 2: not applied again"
    );
    assert_eq!(
        std::fs::read_dir(&journals).unwrap().count(),
        0,
        "journals dropped"
    );
}

#[test]
fn a_journal_answers_resends_before_and_after_their_commit() {
    let dir = tempfile::tempdir().unwrap();
    let (_rt, pool) = PoolRuntime::start(1, 64).unwrap();
    let ring = ring();
    let store: Arc<dyn Store> = Arc::new(store(dir.path(), &pool));
    let backing = store
        .journal_backing()
        .unwrap()
        .expect("a commit interval keeps journals");
    let duplicate = WriteOutcome::Duplicate {
        message_id: "m1".into(),
        session_id: "s1".into(),
    };
    let outcomes = monoio::RuntimeBuilder::<monoio::FusionDriver>::new()
        .enable_timer()
        .build()
        .unwrap()
        .block_on(async {
            let journal = Journal::open(backing, 0, store.clone()).unwrap();
            let first = vec![
                WriteOp::CreateSession(session("s1")),
                append(&ring, "s1", 1, "m1", Some("c1")),
            ];
            let new = journal.write(first).await.unwrap();
            // Not committed yet: found among the journal's own.
            let before = journal
                .write(vec![append(&ring, "s1", 2, "m2", Some("c1"))])
                .await
                .unwrap();
            store.commit().await.unwrap();
            // Committed (and forgotten by the journal): found in the database.
            let after = journal
                .write(vec![append(&ring, "s1", 3, "m3", Some("c1"))])
                .await
                .unwrap();
            (new, before, after, journal.name().to_owned())
        });
    assert_eq!(outcomes.0, [WriteOutcome::Done, WriteOutcome::Done]);
    assert_eq!(outcomes.1, std::slice::from_ref(&duplicate));
    assert_eq!(outcomes.2, [duplicate]);
    let (_, msgs) = block(store.load_session("s1", 10)).unwrap().unwrap();
    assert_eq!(msgs.len(), 1, "stored once");
    let file = dir
        .path()
        .join(journal::DIR)
        .join(format!("{}.000000.log", outcomes.3));
    let (records, rest) = journal::decode(&std::fs::read(file).unwrap());
    assert_eq!(
        (records.len(), rest),
        (3, 0),
        "every write synced as a record"
    );
}

#[test]
fn a_second_process_on_the_store_leaves_the_journals_to_the_first() {
    let dir = tempfile::tempdir().unwrap();
    let (_rt, pool) = PoolRuntime::start(1, 64).unwrap();
    let server = store(dir.path(), &pool);
    assert!(server.journal_backing().unwrap().is_some());
    // A journal the server is writing: another process (`chatbox copy`) opening
    // the store must neither apply nor delete it, nor keep journals of its own.
    let segment = dir.path().join(journal::DIR).join("live.000000.log");
    std::fs::create_dir_all(segment.parent().unwrap()).unwrap();
    let mut bytes = Vec::new();
    journal::encode(1, &[WriteOp::CreateSession(session("s1"))], &mut bytes).unwrap();
    std::fs::write(&segment, &bytes).unwrap();
    let other = store(dir.path(), &pool);
    assert!(segment.exists(), "left to the process that writes it");
    assert!(block(other.load_session("s1", 10)).unwrap().is_none());
    assert!(other.journal_backing().is_err(), "no journals of its own");
    drop((server, other));
    let next = store(dir.path(), &pool);
    assert!(
        block(next.load_session("s1", 10)).unwrap().is_some(),
        "the next start applies it"
    );
}
