//! A Server-Sent Events parser: bytes in, complete events out. It keeps only a
//! partial line between calls, so a slow or chunked upstream costs nothing extra.

/// One event: its `event:` name (empty when absent) and its `data:` lines joined.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    pub name: String,
    pub data: String,
}

/// An upstream that never ends a line or an event would grow the parser without
/// end; past the bound the stream is refused instead.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TooLarge {
    #[error("an SSE line is longer than {0} bytes")]
    Line(usize),
    #[error("an SSE event's data is larger than {0} bytes")]
    Event(usize),
}

pub struct Parser {
    line: Vec<u8>,
    name: String,
    data: String,
    has_data: bool,
    /// Bounds one line and, separately, the joined `data` of one event.
    bytes_max: usize,
}

impl Parser {
    pub fn new(bytes_max: usize) -> Parser {
        Parser {
            line: Vec::new(),
            name: String::new(),
            data: String::new(),
            has_data: false,
            bytes_max,
        }
    }

    /// Feeds bytes; returns the events they complete.
    pub fn feed(&mut self, bytes: &[u8]) -> Result<Vec<Event>, TooLarge> {
        let mut out = Vec::new();
        let mut rest = bytes;
        while let Some(i) = memchr::memchr(b'\n', rest) {
            self.line.extend_from_slice(&rest[..i]);
            rest = &rest[i + 1..];
            let mut line = std::mem::take(&mut self.line);
            if line.last() == Some(&b'\r') {
                line.pop();
            }
            if line.len() > self.bytes_max {
                return Err(TooLarge::Line(self.bytes_max));
            }
            self.line_done(&String::from_utf8_lossy(&line), &mut out)?;
        }
        self.line.extend_from_slice(rest);
        if self.line.len() > self.bytes_max {
            return Err(TooLarge::Line(self.bytes_max));
        }
        Ok(out)
    }

    fn line_done(&mut self, line: &str, out: &mut Vec<Event>) -> Result<(), TooLarge> {
        if line.is_empty() {
            if self.has_data || !self.name.is_empty() {
                out.push(Event {
                    name: std::mem::take(&mut self.name),
                    data: std::mem::take(&mut self.data),
                });
            }
            self.has_data = false;
            return Ok(());
        }
        if line.starts_with(':') {
            return Ok(()); // comment / keep-alive
        }
        let (field, value) = match line.split_once(':') {
            Some((f, v)) => (f, v.strip_prefix(' ').unwrap_or(v)),
            None => (line, ""),
        };
        match field {
            "event" => self.name = value.to_owned(),
            "data" => {
                if self.data.len() + value.len() + 1 > self.bytes_max {
                    return Err(TooLarge::Event(self.bytes_max));
                }
                if self.has_data {
                    self.data.push('\n');
                }
                self.data.push_str(value);
                self.has_data = true;
            }
            _ => {} // id, retry: not needed here
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_split_anywhere_are_reassembled() {
        let stream = b"event: message_start\r\ndata: {\"a\":1}\r\n\r\n: keep-alive\n\ndata: x\ndata: y\n\ndata: [DONE]\n\n";
        for split in 0..stream.len() {
            let mut p = Parser::new(1024);
            let mut events = p.feed(&stream[..split]).unwrap();
            events.extend(p.feed(&stream[split..]).unwrap());
            assert_eq!(
                events,
                [
                    Event {
                        name: "message_start".into(),
                        data: "{\"a\":1}".into()
                    },
                    Event {
                        name: String::new(),
                        data: "x\ny".into()
                    },
                    Event {
                        name: String::new(),
                        data: "[DONE]".into()
                    },
                ],
                "split at {split}"
            );
        }
    }

    #[test]
    fn an_endless_line_is_an_error_not_unbounded_memory() {
        let mut p = Parser::new(16);
        assert_eq!(p.feed(&[b'a'; 17]), Err(TooLarge::Line(16)));
    }

    #[test]
    fn endless_data_lines_of_one_event_are_an_error() {
        let mut p = Parser::new(16);
        assert_eq!(p.feed(b"data: 12345\ndata: 6789\n"), Ok(vec![]));
        assert_eq!(p.feed(b"data: abcdef\n"), Err(TooLarge::Event(16)));
        // Events under the bound each start from zero.
        let mut p = Parser::new(16);
        for _ in 0..10 {
            assert_eq!(p.feed(b"data: 0123456789\n\n").unwrap().len(), 1);
        }
    }
}
