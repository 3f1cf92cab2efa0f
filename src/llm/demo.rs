//! The offline `demo` provider: a deterministic, clearly labelled answer streamed
//! word by word, so the whole round trip works with no model and no key.

/// The answer to `prompt`, split into the chunks it is streamed as.
pub fn answer(prompt: &str) -> Vec<String> {
    let shown: String = prompt
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
        .chars()
        .take(200)
        .collect();
    let text = format!(
        "[demo] This answer comes from chatbox's offline demo provider, not a language model. \
         You wrote: \"{shown}\". Set CHATBOX_LLM_PROVIDER to openai or anthropic to get real answers."
    );
    let mut chunks = Vec::new();
    let mut current = String::new();
    for word in text.split_inclusive(' ') {
        current.push_str(word);
        if current.len() >= 12 {
            chunks.push(std::mem::take(&mut current));
        }
    }
    if !current.is_empty() {
        chunks.push(current);
    }
    chunks
}

/// A rough token count (words), for usage reporting until real providers report theirs.
pub fn count_tokens(text: &str) -> u64 {
    text.split_whitespace().count() as u64
}

/// The demo's pause before each chunk. At zero it only yields once to the other
/// tasks of the core: a timer of 0 ms still waits for the timer wheel's next tick
/// (a millisecond per chunk), which a benchmark would measure instead of the server.
pub async fn pace(delay: std::time::Duration) {
    if !delay.is_zero() {
        return monoio::time::sleep(delay).await;
    }
    let mut yielded = false;
    std::future::poll_fn(|cx| {
        if std::mem::replace(&mut yielded, true) {
            return std::task::Poll::Ready(());
        }
        cx.waker().wake_by_ref();
        std::task::Poll::Pending
    })
    .await
}

#[cfg(test)]
mod tests {
    #[test]
    fn deterministic_labelled_and_lossless() {
        let a = super::answer("hello   there");
        assert_eq!(a, super::answer("hello   there"));
        let joined: String = a.concat();
        assert!(joined.starts_with("[demo] "));
        assert!(joined.contains("\"hello there\""));
        assert!(a.len() > 5);
    }
}
