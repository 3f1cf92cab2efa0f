//! What an audio file's container says about it: its duration, read from the
//! headers alone (WAV's byte rate and data size; Ogg's last granule position;
//! MP3's Xing/Info frame count, or its constant bit rate), so that a voice
//! message too long to transcribe is refused before any byte of it leaves the
//! process. WebM and MP4 (whose duration sits in nested boxes) say nothing here
//! and are not refused by length.

/// Whether a stored type (as `infer` decided it) is the audio of a voice note.
/// Browsers record WebM and MP4 containers, which `infer` names as video.
pub fn is_audio(mime: &str) -> bool {
    mime.starts_with("audio/") || mime == "video/webm" || mime == "video/mp4"
}

/// The file extension a transcription API expects for `mime` (OpenAI decides
/// the format by the name's extension).
pub fn extension(mime: &str) -> &'static str {
    match mime {
        "audio/x-wav" | "audio/wav" | "audio/wave" => "wav",
        "audio/mpeg" | "audio/mp3" => "mp3",
        "audio/ogg" | "audio/opus" => "ogg",
        "audio/m4a" | "audio/mp4" => "m4a",
        "video/mp4" => "mp4",
        "video/webm" | "audio/webm" => "webm",
        "audio/flac" | "audio/x-flac" => "flac",
        _ => "bin",
    }
}

/// The duration in milliseconds the container states, when it states one.
pub fn duration_ms(bytes: &[u8]) -> Option<u64> {
    if bytes.len() >= 12 && &bytes[..4] == b"RIFF" && &bytes[8..12] == b"WAVE" {
        return wav_ms(bytes);
    }
    if bytes.starts_with(b"OggS") {
        return ogg_ms(bytes);
    }
    mp3_ms(bytes)
}

fn u32_be(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_be_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

/// MP3 (MPEG audio layer III), after an ID3v2 tag if there is one: the first
/// frame's header gives the sample rate and bit rate; a Xing or Info header in
/// that frame gives the frame count (variable bit rate), else the length
/// follows from the constant bit rate.
fn mp3_ms(b: &[u8]) -> Option<u64> {
    let mut at = 0usize;
    if b.starts_with(b"ID3") {
        // A synchsafe size: 7 bits per byte; a footer adds 10 more bytes.
        let size = b
            .get(6..10)?
            .iter()
            .fold(0usize, |n, x| (n << 7) | usize::from(x & 0x7f));
        let footer = if b.get(5)? & 0x10 != 0 { 10 } else { 0 };
        at = 10 + size + footer;
    }
    let h = b.get(at..at + 4)?;
    if h[0] != 0xff || h[1] & 0xe0 != 0xe0 || (h[1] >> 1) & 3 != 1 {
        return None; // not a layer III frame header
    }
    let version = (h[1] >> 3) & 3; // 3: MPEG-1, 2: MPEG-2, 0: MPEG-2.5
    const KBPS_V1: [u64; 15] = [
        0, 32, 40, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320,
    ];
    const KBPS_V2: [u64; 15] = [0, 8, 16, 24, 32, 40, 48, 56, 64, 80, 96, 112, 128, 144, 160];
    let (rates, kbps, samples) = match version {
        3 => ([44_100u64, 48_000, 32_000], KBPS_V1, 1152u64),
        2 => ([22_050, 24_000, 16_000], KBPS_V2, 576),
        0 => ([11_025, 12_000, 8_000], KBPS_V2, 576),
        _ => return None,
    };
    let rate = *rates.get(usize::from((h[2] >> 2) & 3))?;
    let kbps = *kbps.get(usize::from(h[2] >> 4))?;
    // Xing (VBR) or Info (CBR) sits within the first frame's first bytes.
    let first = b.get(at..b.len().min(at + 200))?;
    if let Some(tag) = first.windows(4).position(|w| w == b"Xing" || w == b"Info") {
        let flags = u32_be(first, tag + 4)?;
        if flags & 1 != 0 {
            let frames = u64::from(u32_be(first, tag + 8)?);
            return Some(frames * samples * 1000 / rate);
        }
    }
    (kbps > 0).then(|| (b.len() - at) as u64 * 8 / kbps)
}

fn u16_le(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_le_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

fn u32_le(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

fn u64_le(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(at..at + 8)?.try_into().ok()?))
}

/// WAV: the `data` chunk's size over the `fmt ` chunk's byte rate. A size
/// larger than what follows (streamed WAVs write 0xFFFFFFFF) counts only the
/// bytes present.
fn wav_ms(b: &[u8]) -> Option<u64> {
    let mut at = 12usize;
    let mut byte_rate = None;
    while at + 8 <= b.len() {
        let id = &b[at..at + 4];
        let size = u32_le(b, at + 4)? as usize;
        let body = at + 8;
        if id == b"fmt " {
            byte_rate = u32_le(b, body + 8).filter(|r| *r > 0);
        } else if id == b"data" {
            let present = size.min(b.len() - body) as u64;
            return Some(present * 1000 / u64::from(byte_rate?));
        }
        // Chunks are padded to an even size.
        at = body.checked_add(size)?.checked_add(size & 1)?;
    }
    None
}

/// Ogg: the granule position of the last page, in samples of the stream's rate
/// (48 kHz for Opus, less its pre-skip; the identification header's for Vorbis).
fn ogg_ms(b: &[u8]) -> Option<u64> {
    // The first page's payload starts after its 27-byte header and segment table.
    let segments = usize::from(*b.get(26)?);
    let payload = b.get(27 + segments..)?;
    let (rate, skip) = if payload.starts_with(b"OpusHead") {
        (48_000u64, u64::from(u16_le(payload, 10)?))
    } else if payload.starts_with(b"\x01vorbis") {
        (u64::from(u32_le(payload, 12)?), 0)
    } else {
        return None;
    };
    if rate == 0 {
        return None;
    }
    // The last page: the last capture pattern in the file's tail.
    let tail_from = b.len().saturating_sub(64 * 1024);
    let last = b[tail_from..].windows(4).rposition(|w| w == b"OggS")? + tail_from;
    let granule = u64_le(b, last + 6)?;
    if granule == u64::MAX {
        return None;
    }
    Some(granule.saturating_sub(skip) * 1000 / rate)
}

#[cfg(test)]
pub(crate) mod tests_support {
    /// A PCM WAV of `ms` milliseconds at 16 kHz, 16-bit mono, with a LIST chunk
    /// before the data as sox writes.
    pub fn wav(ms: u32) -> Vec<u8> {
        let data_len = 16_000 * 2 * ms / 1000;
        let mut b = b"RIFF".to_vec();
        b.extend_from_slice(&(36 + 12 + data_len).to_le_bytes());
        b.extend_from_slice(b"WAVEfmt ");
        b.extend_from_slice(&16u32.to_le_bytes());
        b.extend_from_slice(&1u16.to_le_bytes());
        b.extend_from_slice(&1u16.to_le_bytes());
        b.extend_from_slice(&16_000u32.to_le_bytes());
        b.extend_from_slice(&32_000u32.to_le_bytes());
        b.extend_from_slice(&2u16.to_le_bytes());
        b.extend_from_slice(&16u16.to_le_bytes());
        b.extend_from_slice(b"LIST");
        b.extend_from_slice(&3u32.to_le_bytes());
        b.extend_from_slice(b"abc\0");
        b.extend_from_slice(b"data");
        b.extend_from_slice(&data_len.to_le_bytes());
        b.resize(b.len() + data_len as usize, 0);
        b
    }
}

#[cfg(test)]
mod tests {
    use super::tests_support::wav;
    use super::*;

    fn ogg_page(granule: u64, payload: &[u8]) -> Vec<u8> {
        let mut p = b"OggS\0\0".to_vec();
        p.extend_from_slice(&granule.to_le_bytes());
        p.extend_from_slice(&[0; 12]);
        p.push(1);
        p.push(payload.len() as u8);
        p.extend_from_slice(payload);
        p
    }

    #[test]
    fn wav_durations_come_from_the_header() {
        assert_eq!(duration_ms(&wav(2500)), Some(2500));
        assert_eq!(duration_ms(&wav(0)), Some(0));
        // A data size past the end (a streamed WAV) counts what is there.
        let mut w = wav(1000);
        let at = w.len() - 32_000 - 4;
        w[at..at + 4].copy_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(duration_ms(&w), Some(1000));
        // Cut before the data chunk, or no byte rate: unknown, never a panic.
        assert_eq!(duration_ms(&w[..40]), None);
        for n in 0..60 {
            let _ = duration_ms(&w[..n]);
        }
    }

    #[test]
    fn ogg_durations_come_from_the_last_granule() {
        let mut head = b"OpusHead\x01\x01".to_vec();
        head.extend_from_slice(&312u16.to_le_bytes());
        head.extend_from_slice(&[0; 7]);
        let mut opus = ogg_page(0, &head);
        opus.extend(ogg_page(48_000 * 7 + 312, b"audio"));
        assert_eq!(duration_ms(&opus), Some(7000));
        let mut vorbis_head = b"\x01vorbis".to_vec();
        vorbis_head.extend_from_slice(&0u32.to_le_bytes());
        vorbis_head.push(1);
        vorbis_head.extend_from_slice(&22_050u32.to_le_bytes());
        let mut vorbis = ogg_page(0, &vorbis_head);
        vorbis.extend(ogg_page(22_050 * 3, b"audio"));
        assert_eq!(duration_ms(&vorbis), Some(3000));
        assert_eq!(duration_ms(b"OggS"), None);
        assert_eq!(duration_ms(b"ID3\x03 an mp3"), None);
    }

    /// An MPEG-1 layer III frame header: 128 kb/s, 44.1 kHz, mono.
    const MP3_HEADER: [u8; 4] = [0xff, 0xfb, 0x90, 0xc4];

    #[test]
    fn mp3_durations_come_from_the_frame_count_or_the_bit_rate() {
        // Constant bit rate after an ID3 tag: 128 kb/s is 16,000 bytes a second.
        let mut cbr = b"ID3\x03\x00\x00\x00\x00\x00\x0a".to_vec();
        cbr.extend_from_slice(&[0; 10]);
        cbr.extend_from_slice(&MP3_HEADER);
        cbr.resize(cbr.len() + 16_000 * 3 - 4, 0);
        assert_eq!(duration_ms(&cbr), Some(3000));
        // A Xing header's frame count: 1152 samples each at 44.1 kHz.
        let mut vbr = MP3_HEADER.to_vec();
        vbr.extend_from_slice(&[0; 17]);
        vbr.extend_from_slice(b"Xing");
        vbr.extend_from_slice(&1u32.to_be_bytes());
        vbr.extend_from_slice(&383u32.to_be_bytes());
        vbr.resize(2000, 0);
        assert_eq!(duration_ms(&vbr), Some(383 * 1152 * 1000 / 44_100));
        // Not a layer III header, or cut short: unknown.
        assert_eq!(duration_ms(&[0xff, 0xfd, 0x90, 0xc4, 0, 0]), None);
        for n in 0..30 {
            let _ = duration_ms(&cbr[..n]);
            let _ = duration_ms(&vbr[..n]);
        }
    }

    #[test]
    fn audio_types_and_their_extensions() {
        for t in [
            "audio/x-wav",
            "audio/ogg",
            "audio/mpeg",
            "video/webm",
            "video/mp4",
        ] {
            assert!(is_audio(t), "{t}");
            assert_ne!(extension(t), "bin", "{t}");
        }
        for t in ["image/png", "application/pdf", "video/x-msvideo"] {
            assert!(!is_audio(t), "{t}");
        }
    }
}
