//! WebSocket frames written and walked independently of the codec under test:
//! client frames for the round trip, a walker for structural mutations, and a
//! reader of what the server queued.

/// How a payload length is written: RFC 6455 asks for the shortest form, but
/// longer forms parse too and are worth feeding.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LenForm {
    Shortest,
    U16,
    U64,
}

/// Appends one frame: `first` is the FIN/RSV/opcode byte; masked when `mask` is set.
pub fn encode(out: &mut Vec<u8>, first: u8, payload: &[u8], mask: Option<[u8; 4]>, form: LenForm) {
    out.extend_from_slice(&header(first, payload.len() as u64, mask, form));
    match mask {
        Some(k) => out.extend(payload.iter().enumerate().map(|(i, b)| b ^ k[i % 4])),
        None => out.extend_from_slice(payload),
    }
}

/// A frame header announcing `len` payload bytes (which need not follow).
pub fn header(first: u8, len: u64, mask: Option<[u8; 4]>, form: LenForm) -> Vec<u8> {
    let mut out = vec![first];
    let m = if mask.is_some() { 0x80 } else { 0 };
    let form = match form {
        LenForm::Shortest if len < 126 => None,
        LenForm::Shortest | LenForm::U16 if len <= 0xffff => Some(LenForm::U16),
        _ => Some(LenForm::U64),
    };
    match form {
        None => out.push(m | len as u8),
        Some(LenForm::U16) => {
            out.push(m | 126);
            out.extend_from_slice(&(len as u16).to_be_bytes());
        }
        Some(_) => {
            out.push(m | 127);
            out.extend_from_slice(&len.to_be_bytes());
        }
    }
    if let Some(k) = mask {
        out.extend_from_slice(&k);
    }
    out
}

/// XORs `payload` with a client mask (its own inverse).
pub fn unmask(payload: &[u8], mask: Option<[u8; 4]>) -> Vec<u8> {
    match mask {
        Some(k) => payload
            .iter()
            .enumerate()
            .map(|(i, b)| b ^ k[i % 4])
            .collect(),
        None => payload.to_vec(),
    }
}

/// Where one frame sits in a byte string.
#[derive(Clone, Copy, Debug)]
pub struct Span {
    pub start: usize,
    /// First payload byte.
    pub payload: usize,
    /// One past the payload (may lie past the input for a frame cut off).
    pub end: usize,
    pub mask: Option<[u8; 4]>,
}

/// The frames of `bytes` whose header is complete, in order; the last may be cut off.
pub fn walk(bytes: &[u8]) -> Vec<Span> {
    let mut spans = Vec::new();
    let mut at = 0;
    while let Some((span, _)) = parse_header(bytes, at) {
        spans.push(span);
        if span.end > bytes.len() {
            break;
        }
        at = span.end;
    }
    spans
}

/// Parses the header at `at`: the frame's span and its payload length.
fn parse_header(bytes: &[u8], at: usize) -> Option<(Span, u64)> {
    let second = *bytes.get(at + 1)?;
    let (len, mut pos) = match second & 0x7f {
        126 => {
            let b = bytes.get(at + 2..at + 4)?;
            (u64::from(u16::from_be_bytes([b[0], b[1]])), at + 4)
        }
        127 => {
            let b: [u8; 8] = bytes.get(at + 2..at + 10)?.try_into().ok()?;
            (u64::from_be_bytes(b), at + 10)
        }
        n => (u64::from(n), at + 2),
    };
    let mask = if second & 0x80 != 0 {
        let k: [u8; 4] = bytes.get(pos..pos + 4)?.try_into().ok()?;
        pos += 4;
        Some(k)
    } else {
        None
    };
    let end = usize::try_from(len).ok()?.checked_add(pos)?;
    let span = Span {
        start: at,
        payload: pos,
        end,
        mask,
    };
    Some((span, len))
}

/// One frame the server queued: its first byte and payload.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServerFrame {
    pub first: u8,
    pub payload: Vec<u8>,
}

/// Reads the server's queued bytes as complete, unmasked frames.
pub fn read_server(bytes: &[u8]) -> Result<Vec<ServerFrame>, String> {
    let mut out = Vec::new();
    let mut at = 0;
    while at < bytes.len() {
        let (span, len) = parse_header(bytes, at).ok_or("server frame header cut off")?;
        if span.mask.is_some() {
            return Err("server frame is masked".into());
        }
        let shortest = match len {
            0..=125 => 2,
            126..=0xffff => 4,
            _ => 10,
        };
        if span.payload - span.start != shortest {
            return Err("server frame length not in its shortest form".into());
        }
        let payload = bytes
            .get(span.payload..span.end)
            .ok_or("server frame cut off")?;
        out.push(ServerFrame {
            first: bytes[at],
            payload: payload.to_vec(),
        });
        at = span.end;
    }
    Ok(out)
}
