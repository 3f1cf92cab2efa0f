//! A voice message after its ack: its audio is read back (opened chunk by
//! chunk) and transcribed on the blocking pool, then the session decides
//! ([`Session::transcribed`], [`Session::transcription_failed`]) and the
//! effects are performed here: the `transcript` frame, the message's content
//! stored, the answer; or one `transcription_failed` error, the audio staying
//! attached. The core only awaits: reading, sealing's opposite and HTTP all run
//! on the pool.

use std::rc::Rc;
use std::sync::Arc;

use bytes::Bytes;

use super::effects::perform;
use super::session::{seal_user_text, Effect, VoicePlace};
use crate::app::Core;
use crate::crypto::KeyRing;
use crate::llm::stt::{Audio, Stt, SttError};
use crate::llm::ModelSpec;
use crate::store::files::sealed::{chunks_of, read_chunk};
use crate::store::files::FileStore;
use crate::store::{FileRecord, WriteOp};

/// A stored voice message waiting for its transcript.
pub struct Voice {
    pub sid: Arc<str>,
    pub user: Arc<str>,
    pub message_id: Arc<str>,
    /// The message's place in the session: the transcript is sealed at it.
    pub seq: u64,
    pub audio: FileRecord,
    /// The model that answers the transcript.
    pub model: Arc<ModelSpec>,
}

/// What the user is told when a transcription fails (the details go to the log).
fn failure_text(e: &SttError) -> String {
    match e {
        SttError::TooLong { .. } | SttError::Empty => e.to_string(),
        SttError::Failed { kind, .. } => format!(
            "the voice message could not be transcribed ({}); its audio stays attached",
            kind.label()
        ),
    }
}

/// Starts the transcription of `v`; its outcome reaches the session later.
pub fn transcribe(core: &Rc<Core>, v: Voice) {
    let shared = &core.shared.app;
    // Where the record says the audio is (a node that changed stores still
    // reads what it stored before).
    let store = shared.files.stores.get(&v.audio.location);
    let (keys, stt, record) = (shared.keys.clone(), shared.stt.clone(), v.audio.clone());
    let work = crate::trace::Traced::inherit(async move {
        let Some(store) = store else {
            return Err("the voice message's audio is not in this node's file storage".into());
        };
        let audio = read_audio(store, keys, record).await?;
        run(&stt, &audio).await
    });
    let call = shared.pool.call(work);
    let (c, sid) = (core.clone(), v.sid.clone());
    let task = async move {
        let outcome = match call.await {
            Ok(outcome) => outcome,
            Err(e) => {
                tracing::warn!(session = %v.sid, error = %e, "no room on the pool to transcribe");
                Err("the server is too busy to transcribe the voice message; its audio stays attached".into())
            }
        };
        finish(&c, v, outcome);
    };
    super::spawn(core, &sid, "transcribe", task, |_| {});
}

/// Transcribes on the pool; a failure becomes the user's message.
async fn run(stt: &Stt, audio: &Audio) -> Result<String, String> {
    stt.transcribe(audio).await.map_err(|e| {
        tracing::warn!(error = %e, "transcription failed");
        failure_text(&e)
    })
}

/// Reads and opens the whole audio (at most `upload_bytes_max`) on blocking
/// threads of the pool.
async fn read_audio(
    store: Arc<dyn FileStore>,
    keys: Arc<KeyRing>,
    rec: FileRecord,
) -> Result<Audio, String> {
    let (mime, name) = (rec.mime.clone(), rec.name.clone());
    let read = tokio::task::spawn_blocking(move || {
        let mut out = Vec::with_capacity(usize::try_from(rec.size).unwrap_or(0));
        for index in 0..chunks_of(rec.size) {
            out.extend(read_chunk(
                &*store,
                &keys,
                &rec.file_id,
                rec.key_id,
                rec.size,
                index,
            )?);
        }
        Ok::<_, crate::store::files::sealed::FileError>(out)
    })
    .await;
    match read {
        Ok(Ok(bytes)) => Ok(Audio {
            bytes: Bytes::from(bytes),
            mime,
            name,
        }),
        Ok(Err(e)) => {
            tracing::error!(error = %e, "a voice message's audio failed to open");
            Err("the voice message's audio could not be read; it stays attached".into())
        }
        Err(e) => {
            tracing::error!(error = %e, "reading a voice message's audio stopped");
            Err("the voice message's audio could not be read; it stays attached".into())
        }
    }
}

/// The session decides what the outcome means; the effects follow, the
/// transcript stored before anyone is told of it (so a history read after the
/// `transcript` frame shows it), and the answer starts when the session says so.
fn finish(core: &Rc<Core>, v: Voice, outcome: Result<String, String>) {
    let shared = &core.shared.app;
    let decided = {
        let mut sessions = core.app.sessions.borrow_mut();
        sessions.get_mut(&v.sid).map(|s| match &outcome {
            Ok(text) => {
                let at = VoicePlace {
                    sid: &v.sid,
                    message_id: &v.message_id,
                    seq: v.seq,
                };
                s.transcribed(at, text, &shared.keys, shared.context)
            }
            Err(why) => (s.transcription_failed(&v.sid, why), false),
        })
    };
    let (effects, answer) = match decided {
        Some(decided) => decided,
        // The session left memory meanwhile (nobody is connected to it): the
        // transcript is still stored; there is no one to tell or answer.
        None => match outcome {
            Ok(text) => {
                let sealed =
                    seal_user_text(&shared.keys, &v.sid, &v.message_id, &v.user, v.seq, &text);
                let message_id = v.message_id.clone();
                (vec![Effect::SetContent { message_id, sealed }], false)
            }
            Err(_) => return,
        },
    };
    let sid = v.sid.clone();
    let task = stored_then_told(core.clone(), v, effects, answer);
    super::spawn(core, &sid, "store_transcript", task, |_| {});
}

/// Stores the transcript (awaiting the commit), then performs the rest.
async fn stored_then_told(core: Rc<Core>, v: Voice, effects: Vec<Effect>, answer: bool) {
    let mut rest = Vec::with_capacity(effects.len());
    for effect in effects {
        let Effect::SetContent { message_id, sealed } = effect else {
            rest.push(effect);
            continue;
        };
        let op = WriteOp::SetContent {
            session_id: v.sid.to_string(),
            message_id: message_id.to_string(),
            sealed,
        };
        // A failed write is logged; the user still sees the transcript and gets
        // the answer (the message keeps its audio either way).
        if let Err(e) = super::lease::write(&core, &v.user, vec![op]).await {
            core.metrics().store_errors.inc();
            tracing::error!(session = %v.sid, error = %e, "storing a transcript failed");
        }
    }
    perform(&core, &v.sid, &v.user, rest);
    if answer {
        super::answer::start(&core, &v.sid, v.model);
    }
}
