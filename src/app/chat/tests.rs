//! Unit tests of the per-core session bookkeeping and of the session state
//! machine's transitions, without a running core.

use std::rc::Rc;
use std::sync::Arc;

use super::session::{CancelFlag, Effect, Refusal, Session, Target};
use super::takeover::{AdminRef, State};
use super::ChatCore;
use crate::limiter::Limiter;

fn core_state() -> ChatCore {
    ChatCore {
        sessions: Default::default(),
        conn_sessions: Default::default(),
        limiter: std::cell::RefCell::new(Limiter::new(60, 10)),
        admin_limiter: std::cell::RefCell::new(Limiter::new(60, 10)),
        upload_limiter: std::cell::RefCell::new(Limiter::new(60, 10)),
        scratch: Default::default(),
        served: Default::default(),
        proxies: Default::default(),
        leases: Default::default(),
        journal: Default::default(),
        core_id: 0,
        cores: 1,
    }
}

fn session(user: &str, last: i64, attached: Vec<u64>) -> Session {
    let mut s = Session::new(user.into(), 0);
    s.last_activity = last;
    s.attached = attached;
    s
}

fn admin(id: &str, core: usize, conn: u64) -> AdminRef {
    AdminRef {
        id: id.into(),
        name: format!("{id} name").into(),
        core,
        conn,
    }
}

#[test]
fn expiry_keeps_attached_and_recent_sessions() {
    let chat = core_state();
    {
        let mut s = chat.sessions.borrow_mut();
        s.insert("old".into(), session("u", 0, vec![]));
        s.insert("recent".into(), session("u", 9_000, vec![]));
        s.insert("attached".into(), session("u", 0, vec![7]));
    }
    assert_eq!(chat.expire(10_000, 5_000), 1);
    let s = chat.sessions.borrow();
    assert!(!s.contains_key("old") && s.contains_key("recent") && s.contains_key("attached"));
}

#[test]
fn detach_forgets_a_connection_everywhere() {
    let chat = core_state();
    chat.sessions
        .borrow_mut()
        .insert("a".into(), session("u", 0, vec![]));
    chat.sessions
        .borrow_mut()
        .insert("b".into(), session("u", 0, vec![]));
    chat.attach(&"a".into(), 1);
    chat.attach(&"b".into(), 1);
    chat.attach(&"b".into(), 2);
    chat.detach_conn(1);
    let s = chat.sessions.borrow();
    assert!(s["a"].attached.is_empty());
    assert_eq!(s["b"].attached, [2]);
    assert!(chat.conn_sessions.borrow().get(&1).is_none());
}

#[test]
fn the_per_user_bound_makes_room_among_idle_sessions_only() {
    let chat = core_state();
    let u: Arc<str> = "u".into();
    assert!(chat.create(&u, "a".into(), 0, 2).is_ok());
    assert!(chat.create(&u, "b".into(), 0, 2).is_ok());
    chat.attach(&"a".into(), 1);
    chat.attach(&"b".into(), 1);
    assert!(
        chat.create(&u, "c".into(), 0, 2).is_err(),
        "both are in use"
    );
    chat.detach_conn(1);
    assert_eq!(
        chat.create(&u, "c".into(), 0, 2),
        Ok(1),
        "idle ones made room"
    );
}

#[test]
fn an_admin_joining_stops_the_answer_and_records_the_takeover() {
    let mut s = session("u", 0, vec![1]);
    let flag = Rc::new(CancelFlag::default());
    let _ = s.begin_answer("m1".into(), flag.clone());
    let (newly_human, effects) = s.join(&admin("a", 1, 9)).expect("open session");
    assert!(newly_human);
    assert_eq!(s.state, State::Human);
    assert!(matches!(&effects[0], Effect::Cancel(f) if Rc::ptr_eq(f, &flag)));
    assert!(matches!(
        effects[1],
        Effect::Record {
            state: State::Human,
            action: crate::store::AuditAction::AdminJoin
        }
    ));
    // Joining again from the same connection changes nothing more.
    let (again, _) = s.join(&admin("a", 1, 9)).expect("still open");
    assert!(!again);
    assert_eq!(s.admins.len(), 1);
}

#[test]
fn a_seat_gets_live_frames_only_once_announced() {
    let mut s = session("u", 0, vec![1]);
    s.join(&admin("a", 1, 9)).expect("open");
    assert_eq!(s.everyone(), [Target::Local(1)]);
    assert!(s.announce("a").is_empty());
    s.join(&admin("b", 0, 5)).expect("open");
    assert_eq!(
        s.announce("b"),
        [Arc::<str>::from("a name")],
        "b is told about a"
    );
    assert_eq!(
        s.everyone(),
        [Target::Local(1), Target::Remote(1, 9), Target::Remote(0, 5)]
    );
}

#[test]
fn the_last_admin_out_hands_back_to_the_ai() {
    let mut s = session("u", 0, vec![1]);
    for (id, conn) in [("a", 9), ("b", 8)] {
        s.join(&admin(id, 0, conn)).expect("open");
        s.announce(id);
    }
    let first = s.leave("s1", &admin("a", 0, 9), true, 0);
    assert_eq!(s.state, State::Human, "b is still there");
    assert!(!first.iter().any(|e| matches!(e, Effect::Record { .. })));
    // One connection of b going is b leaving when it was its only one.
    let last = s.leave("s1", &admin("b", 0, 8), false, 0);
    assert_eq!(s.state, State::Ai);
    assert!(last.iter().any(|e| matches!(
        e,
        Effect::Record {
            state: State::Ai,
            ..
        }
    )));
    assert!(
        s.leave("s1", &admin("b", 0, 8), true, 0).is_empty(),
        "not seated: nothing"
    );
}

#[test]
fn help_waits_once_and_an_ended_session_refuses_everything() {
    let mut s = session("u", 0, vec![1]);
    assert_eq!(s.help(0).map(|e| e.map(|e| e.len())), Ok(Some(1)));
    assert_eq!(s.state, State::Waiting);
    assert!(
        matches!(s.help(0), Ok(None)),
        "already waiting: nothing at all"
    );
    s.join(&admin("a", 0, 3)).expect("open");
    assert!(
        matches!(s.help(0), Ok(None)),
        "a human has it: nothing at all"
    );
    let effects = s.end("s1");
    assert!(matches!(&effects[..], [Effect::Send(to, _)] if to == &[Target::Local(1)]));
    assert_eq!(s.help(0).err(), Some(Refusal::Ended));
    assert_eq!(s.join(&admin("a", 0, 1)).err(), Some(Refusal::Ended));
    assert_eq!(s.seated("a"), Err(Refusal::NotJoined));
}

#[test]
fn records_take_consecutive_places() {
    let keys = crate::crypto::KeyRing::new(&"11".repeat(32), &[]).expect("valid key");
    let mut s = session("u", 0, vec![]);
    let msg = |id: &'static str| super::session::NewMessage {
        message_id: id,
        role: crate::store::Role::User,
        author: "u",
        client_id: None,
        text: "hello",
        usage: Default::default(),
        cancelled: false,
        file: None,
        extra: None,
    };
    let a = s.record("s1", msg("m1"), &keys, 5);
    let b = s.record("s1", msg("m2"), &keys, 7);
    assert_eq!((a.seq, b.seq), (1, 2));
    assert_eq!(s.last_activity, 7);
    assert_eq!(
        keys.open(&b.place(), &b.sealed).ok().as_deref(),
        Some("hello")
    );
}

#[test]
fn after_a_hand_back_help_is_refused_until_the_cooldown_ends() {
    let mut s = session("u", 0, vec![1]);
    s.help(100).expect("open").expect("waits");
    s.join(&admin("a", 0, 3)).expect("open");
    s.announce("a");
    s.leave("s1", &admin("a", 0, 3), true, 5_000);
    assert_eq!(s.state, State::Ai);
    assert_eq!(
        s.help(1_000).err(),
        Some(Refusal::Cooldown {
            retry_after_ms: 4_000
        })
    );
    assert_eq!(s.state, State::Ai, "a refused request changes nothing");
    let frame = super::session::refusal_frame(
        Refusal::Cooldown {
            retry_after_ms: 4_000,
        },
        "s1",
        None,
    );
    let v: serde_json::Value = serde_json::from_str(&frame).expect("JSON");
    assert_eq!(
        (v["code"].as_str(), v["retry_after_ms"].as_u64()),
        (Some("rate_limited"), Some(4_000))
    );
    assert!(
        matches!(s.help(5_000), Ok(Some(_))),
        "open again at the cooldown's end"
    );
    // A hand-back from a session that was never the AI's stays as it was: the
    // cooldown is set only when the last admin returns it to the AI.
    let mut fresh = session("u", 0, vec![]);
    fresh.leave("s2", &admin("a", 0, 3), true, 9_999);
    assert_eq!(fresh.help_open_at, 0);
}

#[test]
fn a_session_idle_long_enough_ends_and_tells_everyone_in_it() {
    let mut s = session("u", 1_000, vec![1]);
    s.join(&admin("a", 1, 9)).expect("open");
    s.announce("a");
    // Ended only when idle for longer than the setting (as the store's write).
    assert!(
        s.end_idle("s1", 5_000, 4_000).is_none(),
        "idle exactly 4,000 ms: not yet"
    );
    let effects = s
        .end_idle("s1", 5_000, 3_999)
        .expect("idle longer than 3,999 ms: ends");
    assert_eq!(s.state, State::Ended);
    assert!(s.admins.is_empty(), "the admins leave it");
    match &effects[..] {
        [Effect::Send(to, frame), Effect::EndIdle { idle_before: 1_001 }] => {
            assert_eq!(to, &[Target::Local(1), Target::Remote(1, 9)]);
            assert!(frame.contains("\"session_ended\""), "{frame}");
        }
        _ => panic!("a frame to everyone, then the conditional store write"),
    }
    assert!(s.end_idle("s1", 99_000, 4_000).is_none(), "ended once");
    assert_eq!(s.help(99_000).err(), Some(Refusal::Ended));
    // A running answer is activity: the session stays open while it streams.
    let mut busy = session("u", 0, vec![]);
    busy.begin_answer("m1".into(), Rc::new(CancelFlag::default()));
    assert!(busy.end_idle("s2", 99_000, 1).is_none());
}

#[test]
fn the_core_ends_only_its_idle_sessions() {
    let chat = core_state();
    {
        let mut s = chat.sessions.borrow_mut();
        s.insert("old".into(), session("u", 0, vec![]));
        s.insert("recent".into(), session("u", 9_000, vec![7]));
        let mut ended = session("u", 0, vec![]);
        ended.end("ended");
        s.insert("ended".into(), ended);
    }
    let ended = chat.end_idle(10_000, 5_000);
    assert_eq!(ended.len(), 1);
    assert_eq!(&*ended[0].0, "old");
    assert_eq!(chat.sessions.borrow()["recent"].state, State::Ai);
}

#[test]
fn loading_a_session_back_counts_against_the_per_user_bound() {
    let chat = core_state();
    {
        let mut s = chat.sessions.borrow_mut();
        s.insert("busy".into(), session("u", 0, vec![1]));
        s.insert("idle".into(), session("u", 0, vec![]));
    }
    // At the bound, the idle one makes room, as for a new session.
    assert!(super::make_room(&mut chat.sessions.borrow_mut(), &"u".into(), 2).is_ok());
    assert!(!chat.sessions.borrow().contains_key("idle"));
    // With none idle, it is refused with the creation's error.
    assert_eq!(
        super::make_room(&mut chat.sessions.borrow_mut(), &"u".into(), 1),
        Err(super::TOO_MANY_SESSIONS)
    );
    assert!(super::make_room(&mut chat.sessions.borrow_mut(), &"v".into(), 1).is_ok());
}

#[test]
fn a_transcript_is_shown_stored_at_its_place_told_and_answered_unless_a_human_has_it() {
    use super::session::{ContextLimits, VoicePlace};
    use crate::store::Role;
    let keys = crate::crypto::KeyRing::new(&"11".repeat(32), &[]).unwrap();
    let limits = ContextLimits {
        messages_max: 10,
        chars_max: 1000,
    };
    let mut s = session("u", 0, vec![3]);
    let mid: Arc<str> = "m1".into();
    let at = || VoicePlace {
        sid: "s",
        message_id: &mid,
        seq: 4,
    };
    let (effects, answer) = s.transcribed(at(), "where is my parcel", &keys, limits);
    assert!(answer);
    match &effects[..] {
        [Effect::Send(to, frame), Effect::SetContent { message_id, sealed }] => {
            assert_eq!(to, &[Target::Local(3)]);
            let f: serde_json::Value = serde_json::from_str(frame).unwrap();
            assert_eq!(
                f,
                serde_json::json!({"type": "transcript", "session_id": "s", "message_id": "m1", "content": "where is my parcel"})
            );
            assert_eq!(&**message_id, "m1");
            let place = crate::crypto::Place {
                session_id: "s",
                message_id: "m1",
                role: Role::User.as_str(),
                author: "u",
                seq: 4,
            };
            assert_eq!(keys.open(&place, sealed).unwrap(), "where is my parcel");
        }
        _ => panic!("unexpected effects"),
    }
    let (turns, _) = s.begin_answer("a1".into(), Rc::new(CancelFlag::default()));
    assert_eq!(&*turns.last().unwrap().text, "where is my parcel");
    s.state = State::Human;
    assert!(
        !s.transcribed(at(), "hello", &keys, limits).1,
        "a human has it"
    );

    let failed = s.transcription_failed("s", "too long");
    match &failed[..] {
        [Effect::Send(to, frame)] => {
            assert_eq!(to, &[Target::Local(3)], "the user's connections only");
            let f: serde_json::Value = serde_json::from_str(frame).unwrap();
            assert_eq!(f["code"], "transcription_failed");
            assert_eq!(f["session_id"], "s");
            assert_eq!(f["message"], "too long");
        }
        _ => panic!("one error"),
    }
}

#[test]
fn a_watcher_follows_the_session_without_holding_it() {
    let mut s = session("u", 0, vec![]);
    s.watch(&admin("w", 1, 7));
    assert_eq!(s.state, State::Ai, "watching takes nothing over");
    assert_eq!(
        s.seated("w"),
        Err(Refusal::NotJoined),
        "a watcher cannot write"
    );
    assert!(!s.idle(), "a followed session stays in memory");
    assert!(
        s.evictable(),
        "but it makes room for its user's next session"
    );
    assert!(s.everyone().is_empty(), "nothing before its transcript");
    s.announce_watcher((1, 7));
    assert_eq!(s.everyone(), [Target::Remote(1, 7)]);
    assert!(s.agents().is_empty(), "nobody is told of a watcher");

    // An agent joining is not told of the watcher; the watcher hears the join.
    s.join(&admin("a", 0, 5)).expect("open");
    assert!(s.announce("a").is_empty(), "a is not told about w");
    assert_eq!(s.agents(), [Arc::<str>::from("a name")]);

    // The watcher leaving says nothing to anyone and changes nothing.
    assert!(s.leave("s1", &admin("w", 1, 7), true, 0).is_empty());
    assert_eq!(
        (s.state, s.admins.len(), s.watchers.len()),
        (State::Human, 1, 0)
    );
}

#[test]
fn a_watcher_who_takes_over_holds_the_session_and_its_leaving_hands_it_back() {
    let mut s = session("u", 0, vec![1]);
    s.watch(&admin("w", 1, 7));
    s.announce_watcher((1, 7));
    let (newly_human, _) = s.join(&admin("w", 1, 7)).expect("open");
    assert!(newly_human);
    assert_eq!(s.seated("w"), Ok(()));
    assert_eq!(
        s.everyone(),
        [Target::Local(1)],
        "its transcript goes out again before any live frame"
    );
    s.announce("w");
    s.watch(&admin("w", 1, 7));
    assert!(
        s.watchers.is_empty(),
        "a seated connection does not watch too"
    );
    // A second admin only watching does not keep the session a human's.
    s.watch(&admin("x", 0, 2));
    let effects = s.leave("s1", &admin("w", 1, 7), true, 0);
    assert_eq!(s.state, State::Ai, "handed back though x still watches");
    assert!(effects.iter().any(|e| matches!(
        e,
        Effect::Record {
            state: State::Ai,
            ..
        }
    )));
    match &effects[0] {
        Effect::Send(to, frame) => {
            assert_eq!(to, &[Target::Remote(1, 7)]);
            assert!(frame.contains("\"you\":true"), "its own leave: {frame}");
        }
        _ => panic!("the leaving admin hears it first"),
    }
}

#[test]
fn one_tab_watching_never_touches_another_tabs_seat() {
    // Tab 9 took the session over; tab 8 of the same admin only watches it.
    let mut s = session("u", 0, vec![1]);
    s.join(&admin("a", 1, 9)).expect("open");
    s.announce("a");
    s.watch(&admin("a", 1, 8));
    assert_eq!(s.watchers.len(), 1);
    // The watching tab closing its view leaves the seat as it is.
    assert!(s.leave("s1", &admin("a", 1, 8), true, 0).is_empty());
    assert_eq!((s.state, s.admins.len()), (State::Human, 1));
    // Watching again, then the seated tab closes: the session goes back to the
    // AI and the watching tab keeps watching.
    s.watch(&admin("a", 1, 8));
    s.leave("s1", &admin("a", 1, 9), false, 0);
    assert_eq!(
        (s.state, s.admins.len(), s.watchers.len()),
        (State::Ai, 0, 1)
    );
}
