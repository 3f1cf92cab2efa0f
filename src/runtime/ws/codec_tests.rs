//! Unit tests of the WebSocket codec (a file of their own: the codec is long enough).

use super::*;

const LIMITS: Limits = Limits {
    frame_bytes_max: 64,
    message_bytes_max: 100,
    tx_bytes_max: 256,
};

/// A client frame: `first` is the FIN/RSV/opcode byte; masked unless `mask` is None.
fn frame(first: u8, payload: &[u8], mask: Option<[u8; 4]>) -> Vec<u8> {
    let mut f = vec![first];
    let m = if mask.is_some() { 0x80 } else { 0 };
    match payload.len() {
        n if n < 126 => f.push(m | n as u8),
        n => {
            f.push(m | 126);
            f.extend_from_slice(&(n as u16).to_be_bytes());
        }
    }
    match mask {
        Some(k) => {
            f.extend_from_slice(&k);
            f.extend(payload.iter().enumerate().map(|(i, b)| b ^ k[i % 4]));
        }
        None => f.extend_from_slice(payload),
    }
    f
}

const K: Option<[u8; 4]> = Some([1, 2, 3, 4]);
const TEXT: u8 = 0x81;
const FIRST_TEXT_FRAGMENT: u8 = 0x01;
const CONT: u8 = 0x00;
const LAST_CONT: u8 = 0x80;
const PING: u8 = 0x89;
const CLOSE: u8 = 0x88;

fn codec(frames: &[Vec<u8>]) -> Codec {
    Codec::new(frames.concat(), LIMITS)
}

fn text(c: &mut Codec) -> Option<String> {
    match c.read().expect("valid") {
        Some(Msg::Text(t)) => Some(t.to_owned()),
        None => None,
        other => panic!("expected text, got {other:?}"),
    }
}

#[test]
fn unmasks_messages_and_frees_the_read_buffer() {
    let long = "x".repeat(37); // not a multiple of the 8-byte unmasking stride
    let mut c = codec(&[frame(TEXT, b"hello", K), frame(TEXT, long.as_bytes(), K)]);
    assert_eq!(text(&mut c).as_deref(), Some("hello"));
    assert_eq!(text(&mut c).as_deref(), Some(long.as_str()));
    assert_eq!(text(&mut c), None);
    assert_eq!(c.rx.capacity(), 0, "an idle codec holds no read buffer");
}

#[test]
fn waits_for_the_rest_of_a_frame() {
    let f = frame(TEXT, b"hello world", K);
    let mut c = Codec::new(f[..7].to_vec(), LIMITS);
    assert_eq!(text(&mut c), None);
    c.feed(&f[7..]);
    assert_eq!(text(&mut c).as_deref(), Some("hello world"));
}

#[test]
fn feed_appends_like_fill_and_held_reports_what_is_kept() {
    let f = frame(FIRST_TEXT_FRAGMENT, b"abc", K);
    let mut c = Codec::new(f[..3].to_vec(), LIMITS);
    assert_eq!(text(&mut c), None);
    assert_eq!(c.held().rx_unread, 3, "a partial header waits");
    c.feed(&f[3..]);
    assert_eq!(text(&mut c), None);
    let held = Held {
        rx_unread: 0,
        rx_capacity: 0,
        fragments: 3,
        tx: 0,
    };
    assert_eq!(c.held(), held, "only the fragment is kept");
    c.feed(&frame(LAST_CONT, b"d", K));
    assert_eq!(text(&mut c).as_deref(), Some("abcd"));
    c.feed(&frame(PING, b"", K));
    assert_eq!(
        c.held().fragments,
        0,
        "a message read is dropped on the next feed"
    );
    assert_eq!(text(&mut c), None);
    assert_eq!(c.queued(), [0x8a, 0], "the pong is queued");
}

#[test]
fn reassembles_fragments_and_answers_pings_between_them() {
    let mut c = codec(&[
        frame(FIRST_TEXT_FRAGMENT, "ré".as_bytes(), K),
        frame(PING, b"p1", K),
        frame(CONT, &"sumé".as_bytes()[..2], K), // cuts a character in two
        frame(LAST_CONT, &"sumé".as_bytes()[2..], K),
    ]);
    assert_eq!(text(&mut c).as_deref(), Some("résumé"));
    assert_eq!(c.tx, [0x8a, 2, b'p', b'1'], "the pong echoes the ping");
    assert_eq!(text(&mut c), None);
    assert!(c.frag.is_none(), "fragments are dropped after use");
}

#[test]
fn bad_utf8_fails_at_the_fragment_that_has_it() {
    let mut c = codec(&[frame(FIRST_TEXT_FRAGMENT, &[b'a', 0xff], K)]);
    assert_eq!(c.read(), Err(WsError::Utf8));
    let mut c = codec(&[frame(TEXT, &[0xc3], K)]);
    assert_eq!(c.read(), Err(WsError::Utf8), "cut off in a final frame");
}

#[test]
fn protocol_errors_and_limits() {
    let cases: Vec<(Vec<u8>, WsError)> = vec![
        (
            frame(TEXT, b"a", None),
            WsError::Protocol("client frames must be masked"),
        ),
        (
            frame(TEXT | 0x40, b"a", K),
            WsError::Protocol("reserved bits set"),
        ),
        (frame(0x83, b"a", K), WsError::Protocol("reserved opcode")),
        (
            frame(LAST_CONT, b"a", K),
            WsError::Protocol("continuation without a message"),
        ),
        (
            frame(0x09, b"a", K),
            WsError::Protocol("fragmented or oversized control frame"),
        ),
        (
            frame(CLOSE, b"a", K),
            WsError::Protocol("close frame with a one-byte payload"),
        ),
        (
            frame(CLOSE, &[0x03, 0xed], K),
            WsError::Protocol("invalid close code"),
        ),
        (frame(CLOSE, &[0x03, 0xe8, 0xff], K), WsError::Utf8),
        (
            frame(TEXT, &[b'a'; 65], K),
            WsError::TooBig("frame too big"),
        ),
    ];
    for (bytes, want) in cases {
        assert_eq!(
            Codec::new(bytes.clone(), LIMITS).read(),
            Err(want),
            "{bytes:x?}"
        );
    }
    let mut c = codec(&[
        frame(FIRST_TEXT_FRAGMENT, &[b'a'; 60], K),
        frame(LAST_CONT, &[b'a'; 60], K),
    ]);
    assert_eq!(c.read(), Err(WsError::TooBig("message too big")));
    let mut c = codec(&[frame(FIRST_TEXT_FRAGMENT, b"a", K), frame(TEXT, b"b", K)]);
    assert_eq!(
        c.read(),
        Err(WsError::Protocol("new message inside a fragmented one"))
    );
}

#[test]
fn close_is_answered_once_and_ends_reading() {
    let mut c = codec(&[
        frame(CLOSE, &[0x03, 0xe9, b'b', b'y', b'e'], K),
        frame(TEXT, b"after", K),
    ]);
    assert_eq!(c.read(), Ok(Some(Msg::Close)));
    assert!(c.is_closed());
    assert_eq!(c.tx, [0x88, 2, 0x03, 0xe8], "answered with 1000");
    assert_eq!(c.read(), Ok(None), "frames after the close are dropped");
    c.send_text("late").expect("ignored, not an error");
    assert_eq!(c.tx.len(), 4, "nothing may follow our close");
}

#[test]
fn our_close_waits_for_the_peers() {
    let mut c = codec(&[frame(TEXT, b"in flight", K), frame(CLOSE, &[0x03, 0xe9], K)]);
    c.send_close(CloseCode::Away, "bye").expect("queued");
    assert_eq!(
        c.read(),
        Ok(Some(Msg::Close)),
        "data after our close is skipped"
    );
    assert!(c.is_closed());
    assert_eq!(
        &c.tx[..4],
        [0x88, 5, 0x03, 0xe9],
        "only our own close went out"
    );
    assert_eq!(c.tx.len(), 7);
}

#[test]
fn the_frame_guard_counts_frames_of_every_kind() {
    const PONG: u8 = 0x8a;
    let frames = [
        frame(PING, b"", K),
        frame(PONG, b"", K),
        frame(FIRST_TEXT_FRAGMENT, b"a", K),
        frame(CONT, b"b", K),
        frame(LAST_CONT, b"c", K),
    ];
    let guarded =
        |n: u32| Codec::new(frames.concat(), LIMITS).with_frame_guard(FrameGuard::new(n, now_ms()));
    let mut c = guarded(5);
    assert_eq!(
        text(&mut c).as_deref(),
        Some("abc"),
        "five frames, five allowed"
    );
    let mut c = guarded(4);
    assert_eq!(
        c.read(),
        Err(WsError::Flood),
        "the fifth frame is one too many"
    );
    let mut c = guarded(1);
    assert_eq!(c.read(), Err(WsError::Flood));
    assert_eq!(
        c.tx,
        [0x8a, 0],
        "the first ping was answered, nothing after it"
    );
    assert_eq!(
        WsError::Flood.close(),
        Some((CloseCode::Policy, "too many frames"))
    );
    let mut unguarded = Codec::new(frames.concat(), LIMITS);
    assert_eq!(
        text(&mut unguarded).as_deref(),
        Some("abc"),
        "the echo route"
    );
}

#[test]
fn the_write_queue_is_bounded_but_a_close_still_fits() {
    let mut c = codec(&[]);
    c.send_text(&"x".repeat(200)).expect("fits");
    assert_eq!(c.send_text(&"x".repeat(100)), Err(WsError::WriteFull));
    c.send_close(CloseCode::Again, "too slow")
        .expect("a close always fits");
    assert!(c.wants_write());
}

#[test]
fn a_slow_reader_close_skips_whole_frames_not_yet_begun() {
    let mut c = codec(&[]);
    c.send_text(&"a".repeat(100)).unwrap(); // 2 + 100 bytes
    c.send_text(&"b".repeat(130)).unwrap(); // 4 + 130 bytes
                                            // 50 bytes of the first frame went: 52 of it must still go.
    assert_eq!(c.front_after(50), 52);
    assert_eq!(c.front_after(102), 0);
    assert_eq!(c.front_after(103), 133);
    c.tx_front = c.front_after(50);
    c.tx.drain(..50);
    c.close_before_queued(CloseCode::Again, "too slow");
    let q = c.queued();
    assert_eq!(
        &q[..52],
        "a".repeat(52).as_bytes(),
        "the frame begun is finished"
    );
    assert_eq!(
        q[52], 0x88,
        "then the close, before the frame not yet begun"
    );
    assert_eq!(u16::from_be_bytes([q[54], q[55]]), 1013);
    assert_eq!(q.len(), 52 + 2 + 2 + "too slow".len());
}
