//! OpenAI-compatible chat completions (also Ollama, vLLM, llama.cpp servers):
//! the streaming request and the meaning of each SSE event.

use serde_json::{json, Value};

use super::{Piece, Turn};

pub fn body(model: &str, system: &str, turns: &[Turn], max_tokens: u32) -> Value {
    let mut messages = vec![json!({"role": "system", "content": system})];
    messages.extend(
        turns
            .iter()
            .map(|t| json!({"role": t.role.wire(), "content": &*t.text})),
    );
    json!({
        "model": model,
        "stream": true,
        "stream_options": {"include_usage": true},
        "max_tokens": max_tokens,
        "messages": messages,
    })
}

/// What one `data:` payload means.
pub fn interpret(data: &str) -> Result<Vec<Piece>, String> {
    if data.trim() == "[DONE]" {
        return Ok(vec![Piece::Done]);
    }
    let v: Value = serde_json::from_str(data).map_err(|e| format!("malformed event: {e}"))?;
    if let Some(err) = v.get("error") {
        let msg = err
            .get("message")
            .and_then(Value::as_str)
            .unwrap_or("unknown error");
        return Err(format!("provider error: {msg}"));
    }
    let mut out = Vec::new();
    if let Some(choices) = v.get("choices").and_then(Value::as_array) {
        for c in choices {
            if let Some(t) = c.pointer("/delta/content").and_then(Value::as_str) {
                if !t.is_empty() {
                    out.push(Piece::Text(t.to_owned()));
                }
            }
        }
    } else {
        return Err("malformed event: no choices".into());
    }
    if let Some(u) = v.get("usage").filter(|u| u.is_object()) {
        out.push(Piece::Usage {
            input: u.get("prompt_tokens").and_then(Value::as_u64),
            output: u.get("completion_tokens").and_then(Value::as_u64),
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_deltas_usage_and_done() {
        let d =
            r#"{"id":"x","choices":[{"index":0,"delta":{"content":"Hel"},"finish_reason":null}]}"#;
        assert_eq!(interpret(d).unwrap(), [Piece::Text("Hel".into())]);
        let u = r#"{"id":"x","choices":[],"usage":{"prompt_tokens":9,"completion_tokens":3,"total_tokens":12}}"#;
        assert_eq!(
            interpret(u).unwrap(),
            [Piece::Usage {
                input: Some(9),
                output: Some(3)
            }]
        );
        assert_eq!(interpret("[DONE]").unwrap(), [Piece::Done]);
        assert!(interpret("{not json").is_err());
        assert!(interpret(r#"{"error":{"message":"overloaded"}}"#)
            .unwrap_err()
            .contains("overloaded"));
    }
}
