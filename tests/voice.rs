//! Voice messages end to end against the real server: speech synthesised with
//! `espeak-ng` and converted with `sox` (Debian packages; `.ci/voice-setup.sh`
//! installs them), uploaded through `POST /upload`, sent as `voice_message`, and
//! transcribed by a local fake of the OpenAI-compatible transcription API that
//! checks the multipart request it receives. Without the tools the speech test
//! says so and passes, unless `CHATBOX_TEST_ESPEAK=1` demands them (CI sets it);
//! every other test here makes its audio itself.
//!
//! Also: failures (5xx after retries, garbage), audio longer than
//! `voice_seconds_max` refused before the provider is asked, the offline demo
//! provider, someone else's file, a file that is not audio, and the store's
//! `SetContent` on both backends.

mod common;

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use chatbox::config::{LlmProvider, SttProvider};
use common::*;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

// ---- audio ----

/// A PCM WAV of `ms` milliseconds at 16 kHz, 16-bit mono: a quiet tone.
fn wav(ms: u32) -> Vec<u8> {
    let samples = 16 * ms;
    let mut b = b"RIFF".to_vec();
    b.extend_from_slice(&(36 + samples * 2).to_le_bytes());
    b.extend_from_slice(b"WAVEfmt ");
    for v in [16u32, 0x0001_0001, 16_000, 32_000, 0x0010_0002] {
        b.extend_from_slice(&v.to_le_bytes());
    }
    b.extend_from_slice(b"data");
    b.extend_from_slice(&(samples * 2).to_le_bytes());
    for i in 0..samples {
        let s = ((i as f32 / 16_000.0 * 440.0 * std::f32::consts::TAU).sin() * 3000.0) as i16;
        b.extend_from_slice(&s.to_le_bytes());
    }
    b
}

/// Whether `espeak-ng` and `sox` run here. Missing, the speech test is skipped
/// with a message, unless `CHATBOX_TEST_ESPEAK=1` demands them.
fn speech_tools() -> bool {
    let runs = |tool: &str| {
        std::process::Command::new(tool)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
    };
    let present = runs("espeak-ng") && runs("sox");
    let demanded = std::env::var("CHATBOX_TEST_ESPEAK").is_ok_and(|v| v == "1");
    assert!(
        present || !demanded,
        "CHATBOX_TEST_ESPEAK=1 but espeak-ng or sox is missing: run .ci/voice-setup.sh"
    );
    if !present {
        eprintln!("SKIPPED: espeak-ng and sox are not installed (apt-get install espeak-ng sox)");
    }
    present
}

/// `text` spoken by espeak-ng, converted by sox to 16 kHz mono 16-bit WAV (what
/// a voice-note recorder would upload).
fn speak(text: &str) -> Vec<u8> {
    speak_as(text, "wav")
}

/// `text` spoken, converted by sox to the format of extension `ext`.
fn speak_as(text: &str, ext: &str) -> Vec<u8> {
    let dir = tempfile::tempdir().unwrap();
    let (raw, out) = (
        dir.path().join("raw.wav"),
        dir.path().join(format!("voice.{ext}")),
    );
    let status = std::process::Command::new("espeak-ng")
        .arg("-w")
        .arg(&raw)
        .arg(text)
        .status()
        .unwrap();
    assert!(status.success(), "espeak-ng failed");
    let status = std::process::Command::new("sox")
        .arg(&raw)
        .args(["-r", "16000", "-c", "1", "-b", "16"])
        .arg(&out)
        .status()
        .unwrap();
    assert!(status.success(), "sox failed");
    std::fs::read(out).unwrap()
}

// ---- uploads ----

/// `POST /chatbox/upload?name=...` with a raw body; the JSON answer.
async fn upload(addr: SocketAddr, user: &str, name: &str, body: &[u8]) -> Value {
    let head = format!(
        "POST /chatbox/upload?name={name} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\n\
         Content-Type: application/octet-stream\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        token(user),
        body.len()
    );
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(head.as_bytes()).await.unwrap();
    s.write_all(body).await.unwrap();
    let mut raw = Vec::new();
    tokio::time::timeout(WAIT, s.read_to_end(&mut raw))
        .await
        .expect("upload answered in time")
        .unwrap();
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text.split_once("\r\n\r\n").expect("a response");
    assert!(head.starts_with("HTTP/1.1 201"), "{head}\n{body}");
    serde_json::from_str(body).unwrap()
}

// ---- a fake transcription API ----

/// One request the fake received: lower-cased head, raw body.
#[derive(Clone)]
struct SttSeen {
    head: String,
    body: Vec<u8>,
}

/// An OpenAI-compatible transcription endpoint answering from a script of
/// (status, body); the last entry repeats.
struct FakeStt {
    addr: SocketAddr,
    seen: Arc<Mutex<Vec<SttSeen>>>,
}

impl FakeStt {
    async fn start(script: Vec<(u16, &'static str)>) -> FakeStt {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let script = Arc::new(Mutex::new(VecDeque::from(script)));
        let s = seen.clone();
        tokio::spawn(async move {
            while let Ok((mut sock, _)) = listener.accept().await {
                let (seen, script) = (s.clone(), script.clone());
                tokio::spawn(async move {
                    while let Some((head, body)) = read_request(&mut sock).await {
                        seen.lock().unwrap().push(SttSeen { head, body });
                        let (status, reply) = {
                            let mut script = script.lock().unwrap();
                            match script.len() {
                                0 => (500, "{}"),
                                1 => script[0],
                                _ => script.pop_front().unwrap(),
                            }
                        };
                        let out = format!(
                            "HTTP/1.1 {status} X\r\nContent-Type: application/json\r\n\
                             Content-Length: {}\r\n\r\n{reply}",
                            reply.len()
                        );
                        if sock.write_all(out.as_bytes()).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        FakeStt { addr, seen }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn requests(&self) -> Vec<SttSeen> {
        self.seen.lock().unwrap().clone()
    }
}

/// The parts of a multipart body: (name, part headers, content).
fn parts(body: &[u8]) -> Vec<(String, String, Vec<u8>)> {
    let first = body.windows(2).position(|w| w == b"\r\n").unwrap();
    let delimiter = [b"\r\n", &body[..first]].concat();
    let mut rest = &body[first..];
    let mut out = Vec::new();
    while let Some(start) = rest.windows(2).position(|w| w == b"\r\n") {
        rest = &rest[start + 2..];
        let Some(end) = rest.windows(delimiter.len()).position(|w| w == delimiter) else {
            break;
        };
        let part = &rest[..end];
        let split = part.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
        let headers = String::from_utf8_lossy(&part[..split]).into_owned();
        let name = headers
            .split("name=\"")
            .nth(1)
            .and_then(|n| n.split('"').next())
            .unwrap_or_default()
            .to_owned();
        out.push((name, headers, part[split + 4..].to_vec()));
        rest = &rest[end + delimiter.len()..];
        if rest.starts_with(b"--") {
            break;
        }
    }
    out
}

/// Checks what the server sent: the path, the key, the model field and the
/// audio exactly as uploaded, under its name and type.
fn check_request(seen: &SttSeen, audio: &[u8], name: &str) {
    let first_line = seen.head.lines().next().unwrap_or_default();
    assert_eq!(first_line, "post /v1/audio/transcriptions http/1.1");
    assert!(
        seen.head.contains("authorization: bearer stt-key-1\r\n"),
        "{}",
        seen.head
    );
    assert!(
        seen.head
            .contains("content-type: multipart/form-data; boundary="),
        "{}",
        seen.head
    );
    let parts = parts(&seen.body);
    let names: Vec<&str> = parts.iter().map(|p| p.0.as_str()).collect();
    assert_eq!(names, ["model", "file"]);
    assert_eq!(parts[0].2, b"whisper-test");
    let (_, headers, content) = &parts[1];
    assert!(
        headers.contains(&format!("filename=\"{name}\"")),
        "{headers}"
    );
    assert!(headers.contains("Content-Type: audio/x-wav"), "{headers}");
    assert!(content == audio, "the audio arrives exactly as uploaded");
}

/// A configuration whose transcriptions go to `stt`.
fn with_stt(cfg: chatbox::Config, stt: &FakeStt) -> chatbox::Config {
    chatbox::Config {
        stt_provider: SttProvider::Openai,
        stt_base_url: Some(stt.url()),
        stt_api_key: Some("stt-key-1".into()),
        stt_model: "whisper-test".into(),
        ..cfg
    }
}

/// Frames up to and including the first of type `kind`.
async fn frames_until(ws: &mut Ws, kind: &str) -> Vec<Value> {
    let (last, mut before) = until(ws, kind).await;
    before.push(last);
    before
}

fn kinds(frames: &[Value]) -> Vec<&str> {
    frames.iter().filter_map(|f| f["type"].as_str()).collect()
}

/// The session's history as a resume on a new connection shows it.
async fn history(addr: SocketAddr, user: &str, sid: &str) -> Vec<Value> {
    let mut ws = connect_user(addr, user).await;
    send(&mut ws, json!({"type": "resume", "session_id": sid})).await;
    let session = until(&mut ws, "session").await.0;
    session["messages"].as_array().unwrap().clone()
}

fn admin() -> String {
    token_with("agent-1", &["admin"], chatbox::auth::now_secs() + 3600)
}

// ---- item 2 and 3: the voice path ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spoken_voice_messages_are_transcribed_stored_and_answered() {
    if !speech_tools() {
        return;
    }
    let audio = tokio::task::spawn_blocking(|| speak("Where is my parcel?"))
        .await
        .unwrap();
    let second = tokio::task::spawn_blocking(|| speak("Thank you."))
        .await
        .unwrap();
    let stt = FakeStt::start(vec![
        (200, r#"{"text":" Where is my parcel? "}"#),
        (200, r#"{"text":"Thank you."}"#),
    ])
    .await;
    let answer = fake_llm::stream(
        fake_llm::openai_events(&["It", " ships", " today"], None),
        0,
    );
    let llm = fake_llm::Fake::start(vec![answer]).await;
    let cfg = fake_llm::with_models(vec![fake_llm::model("m", LlmProvider::Openai, &llm)]);
    let server = start(with_stt(cfg, &stt));
    let addr = server.local_addr();
    let up = upload(addr, "vera", "question.wav", &audio).await;
    assert_eq!(up["mime"], "audio/x-wav");
    let fid = up["file_id"].as_str().unwrap().to_owned();

    let mut ws = connect_user(addr, "vera").await;
    send(
        &mut ws,
        json!({"type": "voice_message", "file_id": fid, "id": "v1"}),
    )
    .await;
    let seen = frames_until(&mut ws, "ai_done").await;
    let at = |k: &str| kinds(&seen).iter().position(|x| *x == k).unwrap();
    assert!(
        at("session") < at("ack") && at("ack") < at("transcript"),
        "{seen:?}"
    );
    assert!(
        at("transcript") < at("ai_chunk"),
        "answered after the transcript: {seen:?}"
    );
    let ack = &seen[at("ack")];
    let transcript = &seen[at("transcript")];
    let sid = ack["session_id"].as_str().unwrap().to_owned();
    assert_eq!(ack["id"], "v1");
    assert_eq!(
        *transcript,
        json!({"type": "transcript", "session_id": sid, "message_id": ack["message_id"], "content": "Where is my parcel?"})
    );
    // The fake saw one well-formed request; the model was told the transcript.
    let requests = stt.requests();
    assert_eq!(requests.len(), 1);
    check_request(&requests[0], &audio, "question.wav");
    let told = &llm.requests()[0].body["messages"];
    let last = told.as_array().unwrap().last().unwrap();
    assert_eq!(last["content"], "Where is my parcel?", "{told}");

    // An admin who joined sees the next voice message and its transcript; with
    // a human in the session the AI stays silent.
    let mut a = connect(addr, "/ws", Some(&admin()), None).await.unwrap();
    send(&mut a, json!({"type": "admin_join", "session_id": sid})).await;
    until(&mut ws, "admin_joined").await;
    let m = json!({"type": "voice_message", "session_id": sid, "file_id": upload(addr, "vera", "thanks.wav", &second).await["file_id"], "id": "v2"});
    send(&mut ws, m).await;
    let relay = until(&mut a, "user_message").await.0;
    assert_eq!(relay["file"]["mime"], "audio/x-wav");
    let relayed = until(&mut a, "transcript").await.0;
    assert_eq!(relayed["content"], "Thank you.");
    assert_eq!(relayed["message_id"], relay["message_id"]);
    let mine = until(&mut ws, "transcript").await.0;
    assert_eq!(mine, relayed);
    check_request(&stt.requests()[1], &second, "thanks.wav");

    // History: the transcripts are the messages' content, the audio attached.
    let h = history(addr, "vera", &sid).await;
    let users: Vec<(&str, &str)> = h
        .iter()
        .filter(|m| m["role"] == "user")
        .map(|m| {
            (
                m["content"].as_str().unwrap(),
                m["file"]["mime"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        users,
        [
            ("Where is my parcel?", "audio/x-wav"),
            ("Thank you.", "audio/x-wav")
        ]
    );
    assert_eq!(h[0]["file"]["file_id"], fid.as_str());
    assert_eq!(llm.requests().len(), 1, "no answer while a human has it");
    server.shutdown();
    stop(server).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_transcription_is_one_error_and_the_audio_stays() {
    // Two 500s (the first try and its one retry), then garbage.
    let stt = FakeStt::start(vec![
        (500, r#"{"error":"overloaded"}"#),
        (500, r#"{"error":"overloaded"}"#),
        (200, "<html>not json</html>"),
    ])
    .await;
    let cfg = chatbox::Config {
        stt_max_retries: 1,
        ..with_stt(config(), &stt)
    };
    let server = start(cfg);
    let addr = server.local_addr();
    let audio = wav(800);
    let fid = upload(addr, "walt", "note.wav", &audio).await["file_id"].clone();
    let mut ws = connect_user(addr, "walt").await;
    send(
        &mut ws,
        json!({"type": "voice_message", "file_id": fid, "id": "w1"}),
    )
    .await;
    let seen = frames_until(&mut ws, "error").await;
    let sid = seen[0]["session_id"].as_str().unwrap().to_owned();
    assert!(kinds(&seen).contains(&"ack"), "{seen:?}");
    let e = seen.last().unwrap();
    assert_eq!(e["code"], "transcription_failed", "{e}");
    assert_eq!(e["session_id"], sid.as_str());
    assert!(
        e["message"].as_str().unwrap().contains("server_error"),
        "{e}"
    );
    assert_eq!(stt.requests().len(), 2, "tried, then retried once");

    // Garbage is not retried; the session carries on.
    let m = json!({"type": "voice_message", "session_id": sid, "file_id": fid, "id": "w2"});
    send(&mut ws, m).await;
    let e = until(&mut ws, "error").await.0;
    assert_eq!(e["code"], "transcription_failed", "{e}");
    assert_eq!(stt.requests().len(), 3);
    let m = json!({"type": "user_message", "session_id": sid, "content": "hello?", "id": "w3"});
    send(&mut ws, m).await;
    let seen = frames_until(&mut ws, "ai_done").await;
    assert!(
        !kinds(&seen).contains(&"error"),
        "one error per failure: {seen:?}"
    );
    let h = history(addr, "walt", &sid).await;
    let users: Vec<(&str, Option<&str>)> = h
        .iter()
        .filter(|m| m["role"] == "user")
        .map(|m| {
            (
                m["content"].as_str().unwrap(),
                m["file"]["file_id"].as_str(),
            )
        })
        .collect();
    let f = fid.as_str();
    assert_eq!(users, [("", f), ("", f), ("hello?", None)]);
    server.shutdown();
    stop(server).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audio_longer_than_allowed_is_refused_before_the_provider_is_asked() {
    let stt = FakeStt::start(vec![(200, r#"{"text":"never"}"#)]).await;
    let cfg = chatbox::Config {
        voice_seconds_max: 2,
        ..with_stt(config(), &stt)
    };
    let server = start(cfg);
    let addr = server.local_addr();
    let fid = upload(addr, "xena", "long.wav", &wav(3500)).await["file_id"].clone();
    let mut ws = connect_user(addr, "xena").await;
    send(&mut ws, json!({"type": "voice_message", "file_id": fid})).await;
    let seen = frames_until(&mut ws, "error").await;
    assert!(kinds(&seen).contains(&"ack"), "{seen:?}");
    let e = seen.last().unwrap();
    assert_eq!(e["code"], "transcription_failed");
    assert_eq!(
        e["message"],
        "the voice message is 4 s long; at most 2 s are transcribed"
    );
    // A short one on the same connection goes through: the long one never did.
    let fid = upload(addr, "xena", "short.wav", &wav(1000)).await["file_id"].clone();
    let sid = seen[0]["session_id"].clone();
    let m = json!({"type": "voice_message", "session_id": sid, "file_id": fid});
    send(&mut ws, m).await;
    assert_eq!(until(&mut ws, "transcript").await.0["content"], "never");
    assert_eq!(stt.requests().len(), 1, "the long audio was never sent");
    server.shutdown();
    stop(server).await;
}

/// Real Ogg Vorbis from sox: its length is read from the container, so a note
/// over the limit never reaches the provider; one within it is sent as `.ogg`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spoken_ogg_notes_are_measured_before_they_are_sent() {
    if !speech_tools() {
        return;
    }
    let long = tokio::task::spawn_blocking(|| {
        speak_as(
            "I ordered a parcel last week and it has still not arrived, can you help me find it",
            "ogg",
        )
    })
    .await
    .unwrap();
    let short = tokio::task::spawn_blocking(|| speak_as("Hello", "ogg"))
        .await
        .unwrap();
    let stt = FakeStt::start(vec![(200, r#"{"text":"Hello"}"#)]).await;
    let cfg = chatbox::Config {
        voice_seconds_max: 2,
        ..with_stt(config(), &stt)
    };
    let server = start(cfg);
    let addr = server.local_addr();
    let up = upload(addr, "olga", "long.ogg", &long).await;
    assert_eq!(up["mime"], "audio/ogg");
    let mut ws = connect_user(addr, "olga").await;
    send(
        &mut ws,
        json!({"type": "voice_message", "file_id": up["file_id"]}),
    )
    .await;
    let seen = frames_until(&mut ws, "error").await;
    let e = seen.last().unwrap();
    assert_eq!(e["code"], "transcription_failed");
    assert!(
        e["message"].as_str().unwrap().contains("at most 2 s"),
        "{e}"
    );
    let sid = seen[0]["session_id"].clone();
    let fid = upload(addr, "olga", "hello.ogg", &short).await["file_id"].clone();
    let m = json!({"type": "voice_message", "session_id": sid, "file_id": fid});
    send(&mut ws, m).await;
    assert_eq!(until(&mut ws, "transcript").await.0["content"], "Hello");
    let requests = stt.requests();
    assert_eq!(requests.len(), 1, "only the short note was sent");
    let file = &parts(&requests[0].body)[1];
    assert!(file.1.contains("filename=\"hello.ogg\""), "{}", file.1);
    assert!(file.1.contains("Content-Type: audio/ogg"), "{}", file.1);
    assert!(file.2 == short);
    server.shutdown();
    stop(server).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_provider_transcribes_offline() {
    let server = start(config());
    let addr = server.local_addr();
    let fid = upload(addr, "yuri", "v.wav", &wav(1500)).await["file_id"].clone();
    let mut ws = connect_user(addr, "yuri").await;
    send(
        &mut ws,
        json!({"type": "voice_message", "file_id": fid, "id": "y1"}),
    )
    .await;
    let seen = frames_until(&mut ws, "ai_done").await;
    let t = seen.iter().find(|f| f["type"] == "transcript").unwrap();
    let text = t["content"].as_str().unwrap();
    assert!(
        text.contains("demo transcript") && text.contains("1.5 seconds"),
        "{text}"
    );
    let sid = t["session_id"].as_str().unwrap();
    let h = history(addr, "yuri", sid).await;
    assert_eq!(h[0]["content"], text);
    assert_eq!(h[0]["file"]["file_id"], fid);
    assert_eq!(h[1]["role"], "assistant");
    server.shutdown();
    stop(server).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn voice_messages_need_the_users_own_audio() {
    let server = start(config());
    let addr = server.local_addr();
    let theirs = upload(addr, "zoe", "z.wav", &wav(500)).await["file_id"].clone();
    let pdf = b"%PDF-1.4\n1 0 obj << >>\nendobj\ntrailer << /Root 1 0 R >>\n%%EOF\n";
    let mine = upload(addr, "ann", "doc.pdf", pdf).await;
    assert_eq!(mine["mime"], "application/pdf");
    let mut ws = connect_user(addr, "ann").await;
    for (file, id, code) in [
        (theirs.clone(), "a1", "not_found"),
        (json!("f_missing"), "a2", "not_found"),
        (mine["file_id"].clone(), "a3", "invalid_message"),
    ] {
        send(
            &mut ws,
            json!({"type": "voice_message", "file_id": file, "id": id}),
        )
        .await;
        let e = until(&mut ws, "error").await.0;
        assert_eq!(
            (e["code"].as_str(), e["id"].as_str()),
            (Some(code), Some(id)),
            "{e}"
        );
    }
    server.shutdown();
    stop(server).await;
}

// ---- the store: a message's content replaced, on both backends ----

mod store {
    use std::sync::Arc;
    use std::time::Duration;

    use chatbox::crypto::{KeyRing, Place};
    use chatbox::pool::PoolRuntime;
    use chatbox::store::mongo::{MongoSettings, MongoStore};
    use chatbox::store::sqlite::SqliteStore;
    use chatbox::store::{
        FileRef, MessageRecord, Role, SessionRecord, SessionState, Store, WriteOp,
    };

    fn block<T>(f: chatbox::store::StoreFuture<T>) -> T {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
            .block_on(f)
            .unwrap()
    }

    fn place(seq: u64) -> Place<'static> {
        Place {
            session_id: "s1",
            message_id: "m1",
            role: "user",
            author: "u1",
            seq,
        }
    }

    /// A voice message stored empty, then given its transcript: it opens to the
    /// transcript at its place, keeps its file, and nothing else changes.
    fn content_is_replaced(store: Arc<dyn Store>) {
        let ring = KeyRing::new(&"55".repeat(32), &[]).unwrap();
        let file = FileRef {
            file_id: "f_1".into(),
            mime: "audio/x-wav".into(),
            size: 10,
            name: Some("v.wav".into()),
        };
        let session = SessionRecord {
            id: "s1".into(),
            user_id: "u1".into(),
            created_at: 1,
            last_activity: 1,
            state: SessionState::Ai,
            message_count: 0,
            tokens_in: 0,
            tokens_out: 0,
            ended_at: None,
        };
        let message = MessageRecord {
            session_id: "s1".into(),
            message_id: "m1".into(),
            seq: 1,
            role: Role::User,
            author: "u1".into(),
            client_id: Some("c1".into()),
            sealed: ring.seal(&place(1), ""),
            created_at: 2,
            tokens_in: 0,
            tokens_out: 0,
            cancelled: false,
            file: Some(file.clone()),
            extra: None,
        };
        let append = WriteOp::AppendMessage {
            user_id: "u1".into(),
            message,
        };
        block(store.write(vec![WriteOp::CreateSession(session), append]));
        let set = WriteOp::SetContent {
            session_id: "s1".into(),
            message_id: "m1".into(),
            sealed: ring.seal(&place(1), "the transcript"),
        };
        block(store.write(vec![set]));
        let (rec, msgs) = block(store.load_session("s1", 10)).unwrap();
        assert_eq!((rec.message_count, msgs.len()), (1, 1));
        assert_eq!(
            ring.open(&msgs[0].place(), &msgs[0].sealed).unwrap(),
            "the transcript"
        );
        assert_eq!(msgs[0].file.as_ref(), Some(&file));
        assert_eq!(msgs[0].client_id.as_deref(), Some("c1"));
        // A message that is not there: nothing changes, nothing fails.
        let gone = WriteOp::SetContent {
            session_id: "s1".into(),
            message_id: "m-gone".into(),
            sealed: ring.seal(&place(1), "x"),
        };
        block(store.write(vec![gone]));
        assert_eq!(block(store.load_session("s1", 10)).unwrap().1.len(), 1);
    }

    #[test]
    fn sqlite_replaces_a_messages_content() {
        let (rt, pool) = PoolRuntime::start(1, 64).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(dir.path(), pool, 1, 64).unwrap();
        content_is_replaced(Arc::new(store));
        rt.shutdown_background();
    }

    #[test]
    #[ignore = "needs MongoDB (SecantusDB): set CHATBOX_TEST_MONGO_URI (see .ci/run)"]
    fn mongodb_replaces_a_messages_content() {
        let uri = std::env::var("CHATBOX_TEST_MONGO_URI")
            .expect("CHATBOX_TEST_MONGO_URI names a MongoDB-compatible server");
        let settings = MongoSettings {
            uri,
            database: format!("chatbox_voice_{:016x}", rand::random::<u64>()),
            write_concern: "majority".into(),
            write_retry: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(5),
        };
        let (rt, pool) = PoolRuntime::start(1, 64).unwrap();
        let store = MongoStore::open(&settings, pool, 64).unwrap();
        content_is_replaced(Arc::new(store));
        rt.shutdown_background();
    }
}

// ---- cluster mode: the owner node transcribes ----

/// Two nodes on one bus and one store; the user is owned by node-0 and
/// connects to node-1, whose frames go to node-0: the voice message is stored,
/// transcribed and answered there, and every frame comes back through node-1.
/// The audio is uploaded to node-0, which keeps it (shared file storage is
/// another part of the work; until then a file lives on the node that took it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs nats-server and MongoDB: CHATBOX_TEST_NATS_SERVER, CHATBOX_TEST_MONGO_URI (see .ci/run)"]
async fn in_a_cluster_the_owner_node_transcribes() {
    use common::cluster::{user_owned_by, Cluster};
    let stt = FakeStt::start(vec![(200, r#"{"text":"Is anyone there?"}"#)]).await;
    let cluster = Cluster::start_with(2, with_stt(config(), &stt)).await;
    let (owner, edge) = (cluster.addr(0), cluster.addr(1));
    let user = user_owned_by("node-0", &["node-1"]);
    let audio = wav(700);
    let fid = upload(owner, &user, "ping.wav", &audio).await["file_id"].clone();
    let mut ws = connect_user(edge, &user).await;
    send(
        &mut ws,
        json!({"type": "voice_message", "file_id": fid, "id": "c1"}),
    )
    .await;
    let seen = frames_until(&mut ws, "ai_done").await;
    let ks = kinds(&seen);
    let at = |k: &str| ks.iter().position(|x| *x == k).unwrap_or(usize::MAX);
    assert!(
        at("ack") < at("transcript") && at("transcript") < at("ai_chunk"),
        "{seen:?}"
    );
    let t = &seen[at("transcript")];
    assert_eq!(t["content"], "Is anyone there?");
    check_request(&stt.requests()[0], &audio, "ping.wav");
    let sid = t["session_id"].as_str().unwrap().to_owned();
    let h = history(edge, &user, &sid).await;
    assert_eq!(h[0]["content"], "Is anyone there?");
    assert_eq!(h[0]["file"]["file_id"], fid);
    cluster.stop().await;
}
