//! Anthropic messages API: the streaming request and the meaning of its SSE events
//! (message_start, content_block_delta, message_delta, message_stop, error).

use serde_json::{json, Value};

use super::{Piece, Turn, TurnRole};

pub const API_VERSION: &str = "2023-06-01";

pub fn body(model: &str, system: &str, turns: &[Turn], max_tokens: u32) -> Value {
    // The API wants user and assistant turns alternating, starting with the user:
    // merge neighbours of one role, drop a leading assistant turn.
    let mut messages: Vec<(TurnRole, String)> = Vec::new();
    for t in turns {
        match messages.last_mut() {
            Some((role, text)) if *role == t.role => {
                text.push_str("\n\n");
                text.push_str(&t.text);
            }
            None if t.role == TurnRole::Assistant => {}
            _ => messages.push((t.role, t.text.to_string())),
        }
    }
    let messages: Vec<Value> = messages
        .iter()
        .map(|(r, t)| json!({"role": r.wire(), "content": t}))
        .collect();
    json!({"model": model, "max_tokens": max_tokens, "system": system, "stream": true, "messages": messages})
}

pub fn interpret(name: &str, data: &str) -> Result<Vec<Piece>, String> {
    let parse =
        || serde_json::from_str::<Value>(data).map_err(|e| format!("malformed {name} event: {e}"));
    Ok(match name {
        "message_start" => {
            let v = parse()?;
            let input = v
                .pointer("/message/usage/input_tokens")
                .and_then(Value::as_u64);
            vec![Piece::Usage {
                input,
                output: None,
            }]
        }
        "content_block_delta" => {
            let v = parse()?;
            match v.pointer("/delta/text").and_then(Value::as_str) {
                Some(t) if !t.is_empty() => vec![Piece::Text(t.to_owned())],
                _ => vec![],
            }
        }
        "message_delta" => {
            let v = parse()?;
            let output = v.pointer("/usage/output_tokens").and_then(Value::as_u64);
            vec![Piece::Usage {
                input: None,
                output,
            }]
        }
        "message_stop" => vec![Piece::Done],
        "error" => {
            let v = parse()?;
            let msg = v
                .pointer("/error/message")
                .and_then(Value::as_str)
                .unwrap_or("unknown error");
            return Err(format!("provider error: {msg}"));
        }
        // ping, content_block_start/stop and events added later carry no text.
        _ => vec![],
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_event_sequence() {
        let start = r#"{"type":"message_start","message":{"id":"m","usage":{"input_tokens":25,"output_tokens":1}}}"#;
        assert_eq!(
            interpret("message_start", start).unwrap(),
            [Piece::Usage {
                input: Some(25),
                output: None
            }]
        );
        let delta =
            r#"{"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"Hi"}}"#;
        assert_eq!(
            interpret("content_block_delta", delta).unwrap(),
            [Piece::Text("Hi".into())]
        );
        let md = r#"{"type":"message_delta","delta":{"stop_reason":"end_turn"},"usage":{"output_tokens":15}}"#;
        assert_eq!(
            interpret("message_delta", md).unwrap(),
            [Piece::Usage {
                input: None,
                output: Some(15)
            }]
        );
        assert_eq!(interpret("message_stop", "{}").unwrap(), [Piece::Done]);
        assert_eq!(interpret("ping", "{}").unwrap(), []);
        assert!(interpret("content_block_delta", "{oops").is_err());
    }

    #[test]
    fn turns_alternate_starting_with_the_user() {
        let t = |role, text: &str| Turn {
            role,
            text: text.into(),
        };
        let b = body(
            "m",
            "sys",
            &[
                t(TurnRole::Assistant, "hello"),
                t(TurnRole::User, "a"),
                t(TurnRole::User, "b"),
                t(TurnRole::Assistant, "c"),
            ],
            100,
        );
        let roles: Vec<&str> = b["messages"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["role"].as_str().unwrap())
            .collect();
        assert_eq!(roles, ["user", "assistant"]);
        assert_eq!(b["messages"][0]["content"], "a\n\nb");
    }
}
