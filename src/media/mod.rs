//! Location metadata removed from uploaded images as they stream past, pixels
//! untouched.
//!
//! JPEG, PNG and WebP are walked by their containers (segments, chunks), so only
//! a metadata block is ever held, never the image: memory stays bounded by
//! [`HELD_BYTES_MAX`] whatever the file's size. In an EXIF block the GPS
//! directory is emptied in place (its entries and their values zeroed, its count
//! set to 0) so that every other tag (orientation, above all) keeps its meaning
//! and no offset moves; an XMP packet, which may repeat the location as text, is
//! dropped where the container allows it (JPEG, PNG) and blanked to spaces where
//! sizes must not change (WebP's RIFF header counts every byte). A file that ends
//! inside a metadata block, or whose structure cannot be followed up to its image
//! data, is refused rather than stored with what it might carry.
//!
//! Hand-written because the crates that edit these containers (`img-parts`) hold
//! the whole file in memory, and none edits the GPS directory alone.

use bytes::Bytes;

/// The largest metadata block held to be cleaned (a JPEG segment is at most
/// 64 KiB by format; PNG and WebP blocks are bounded here).
pub const HELD_BYTES_MAX: usize = 1 << 20;

/// The TIFF tag of the GPS directory's offset, in IFD0.
const GPS_IFD_TAG: u16 = 0x8825;
/// The signature before a TIFF block in a JPEG APP1 segment (and, from some
/// writers, in a WebP EXIF chunk).
const EXIF_PREFIX: &[u8] = b"Exif\0\0";
/// XMP in a JPEG APP1 segment, standard and extended.
const XMP_PREFIXES: [&[u8]; 2] = [
    b"http://ns.adobe.com/xap/1.0/\0",
    b"http://ns.adobe.com/xmp/extension/\0",
];
/// The keyword of a PNG iTXt chunk that carries XMP.
const PNG_XMP_KEYWORD: &[u8] = b"XML:com.adobe.xmp\0";

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ScrubError {
    #[error("the image's metadata block is larger than {HELD_BYTES_MAX} bytes")]
    BlockTooLarge,
    #[error("the image is malformed: {0}")]
    Malformed(&'static str),
}

/// The image formats cleaned; anything else is stored as it came.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Format {
    Jpeg,
    Png,
    Webp,
}

/// What the walker waits for once `Need` has its bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Await {
    /// The signature (JPEG SOI, PNG's 8 bytes, WebP's RIFF header).
    Signature,
    /// A JPEG marker (2 bytes), a PNG chunk head (length, type), a WebP chunk
    /// head (fourcc, size).
    Head,
    /// A JPEG marker with its segment's length (4 bytes).
    SegmentLength,
    /// A JPEG APP1 segment, marker and length included.
    App1,
    /// A PNG eXIf chunk's data and CRC.
    PngExif,
    /// The start of a PNG iTXt chunk (its keyword), `len` bytes of data in all.
    PngText { len: u32 },
    /// A WebP EXIF (`xmp`: XMP) chunk's data and its padding byte, if any.
    WebpMeta { xmp: bool },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Need(usize, Await),
    Pass(u64),
    Drop(u64),
    /// The image data: everything from here on is passed as it is.
    Rest,
}

/// Cleans one image as its bytes arrive.
#[derive(Debug)]
pub struct Scrubber {
    format: Format,
    state: State,
    held: Vec<u8>,
    /// Whether a GPS directory or an XMP packet was removed.
    removed: bool,
}

impl Scrubber {
    /// A scrubber for a detected type; `None` for types that carry no location.
    pub fn for_mime(mime: &str) -> Option<Scrubber> {
        let (format, signature) = match mime {
            "image/jpeg" => (Format::Jpeg, 2),
            "image/png" => (Format::Png, 8),
            "image/webp" => (Format::Webp, 12),
            _ => return None,
        };
        Some(Scrubber {
            format,
            state: State::Need(signature, Await::Signature),
            held: Vec::new(),
            removed: false,
        })
    }

    /// Whether location metadata was found and removed so far.
    pub fn removed(&self) -> bool {
        self.removed
    }

    /// Takes the next piece of the file; what may be stored is pushed to `out`
    /// (slices of `piece` where nothing changes).
    pub fn push(&mut self, piece: Bytes, out: &mut Vec<Bytes>) -> Result<(), ScrubError> {
        let mut at = 0;
        while at < piece.len() {
            let left = piece.len() - at;
            match self.state {
                State::Rest => {
                    out.push(piece.slice(at..));
                    return Ok(());
                }
                State::Pass(n) | State::Drop(n) => {
                    let k = left.min(usize::try_from(n).unwrap_or(usize::MAX));
                    if matches!(self.state, State::Pass(_)) {
                        out.push(piece.slice(at..at + k));
                    }
                    at += k;
                    let n = n - k as u64;
                    self.state = match (self.state, n) {
                        (_, 0) => State::Need(self.head_len(), Await::Head),
                        (State::Pass(_), n) => State::Pass(n),
                        (_, n) => State::Drop(n),
                    };
                }
                State::Need(n, what) => {
                    let k = left.min(n - self.held.len());
                    self.held.extend_from_slice(&piece[at..at + k]);
                    at += k;
                    if self.held.len() == n {
                        let held = std::mem::take(&mut self.held);
                        self.state = self.next(held, what, out)?;
                    }
                }
            }
        }
        Ok(())
    }

    /// The file ended: refused if it ended inside a metadata block.
    pub fn finish(&mut self, out: &mut Vec<Bytes>) -> Result<(), ScrubError> {
        match self.state {
            State::Need(_, Await::App1 | Await::PngExif | Await::PngText { .. })
            | State::Need(_, Await::WebpMeta { .. }) => {
                Err(ScrubError::Malformed("it ends inside its metadata"))
            }
            _ => {
                // A truncated image is stored as truncated: nothing it holds
                // back is metadata.
                out.push(Bytes::from(std::mem::take(&mut self.held)));
                Ok(())
            }
        }
    }

    fn head_len(&self) -> usize {
        match self.format {
            Format::Jpeg => 2,
            Format::Png | Format::Webp => 8,
        }
    }

    /// Decides what follows `held`, which `what` was waiting for.
    fn next(
        &mut self,
        held: Vec<u8>,
        what: Await,
        out: &mut Vec<Bytes>,
    ) -> Result<State, ScrubError> {
        match self.format {
            Format::Jpeg => self.jpeg(held, what, out),
            Format::Png => self.png(held, what, out),
            Format::Webp => self.webp(held, what, out),
        }
    }

    fn jpeg(
        &mut self,
        held: Vec<u8>,
        what: Await,
        out: &mut Vec<Bytes>,
    ) -> Result<State, ScrubError> {
        let head = State::Need(self.head_len(), Await::Head);
        let next = match what {
            Await::Signature if held == [0xff, 0xd8] => {
                out.push(Bytes::from(held));
                head
            }
            Await::Signature => return Err(ScrubError::Malformed("no JPEG start")),
            Await::Head if held[0] != 0xff => {
                return Err(ScrubError::Malformed("no JPEG marker where one belongs"))
            }
            // A fill byte before the marker: it goes on, the next byte is looked at.
            Await::Head if held[1] == 0xff => {
                out.push(Bytes::from_static(&[0xff]));
                self.held = vec![0xff];
                head
            }
            Await::Head => match held[1] {
                // Start of scan, end of image: the entropy-coded data follows.
                0xda | 0xd9 => {
                    out.push(Bytes::from(held));
                    State::Rest
                }
                // Markers without a length.
                0x01 | 0xd0..=0xd7 => {
                    out.push(Bytes::from(held));
                    head
                }
                _ => {
                    self.held = held;
                    State::Need(4, Await::SegmentLength)
                }
            },
            Await::SegmentLength => {
                let len = usize::from(u16::from_be_bytes([held[2], held[3]]));
                let body = len.checked_sub(2).ok_or(ScrubError::Malformed(
                    "a JPEG segment shorter than its length",
                ))?;
                if held[1] == 0xe1 {
                    self.held = held;
                    return Ok(State::Need(body + 4, Await::App1));
                }
                out.push(Bytes::from(held));
                State::Pass(body as u64)
            }
            Await::App1 => {
                self.app1(held, out)?;
                head
            }
            _ => unreachable!("a JPEG never waits for {what:?}"),
        };
        Ok(next)
    }

    /// An APP1 segment (marker and length first): EXIF is cleaned, XMP dropped.
    fn app1(&mut self, mut segment: Vec<u8>, out: &mut Vec<Bytes>) -> Result<(), ScrubError> {
        let payload = &mut segment[4..];
        if XMP_PREFIXES.iter().any(|p| payload.starts_with(p)) {
            self.removed = true;
            return Ok(());
        }
        if payload.starts_with(EXIF_PREFIX) {
            self.removed |= clear_gps_settled(&mut payload[EXIF_PREFIX.len()..])?;
        }
        out.push(Bytes::from(segment));
        Ok(())
    }

    fn png(
        &mut self,
        held: Vec<u8>,
        what: Await,
        out: &mut Vec<Bytes>,
    ) -> Result<State, ScrubError> {
        let head = State::Need(self.head_len(), Await::Head);
        let next = match what {
            Await::Signature if held == b"\x89PNG\r\n\x1a\n" => {
                out.push(Bytes::from(held));
                head
            }
            Await::Signature => return Err(ScrubError::Malformed("no PNG signature")),
            Await::Head => {
                let len = u32::from_be_bytes([held[0], held[1], held[2], held[3]]);
                let kind = [held[4], held[5], held[6], held[7]];
                let with_crc = u64::from(len) + 4;
                match &kind {
                    b"eXIf" => {
                        self.held = held;
                        State::Need(bounded(with_crc)? + 8, Await::PngExif)
                    }
                    b"iTXt" => {
                        self.held = held;
                        let peek = (len as usize).min(PNG_XMP_KEYWORD.len());
                        State::Need(8 + peek, Await::PngText { len })
                    }
                    _ => {
                        out.push(Bytes::from(held));
                        State::Pass(with_crc)
                    }
                }
            }
            Await::PngExif => {
                let mut chunk = held;
                let data_end = chunk.len() - 4;
                // The CRC is written again only over data that changed: a chunk
                // left alone is stored byte for byte, its CRC right or wrong.
                if clear_gps_settled(&mut chunk[8..data_end])? {
                    self.removed = true;
                    let crc = crc32fast::hash(&chunk[4..data_end]);
                    chunk[data_end..].copy_from_slice(&crc.to_be_bytes());
                }
                out.push(Bytes::from(chunk));
                head
            }
            Await::PngText { len } => {
                let rest = u64::from(len) + 4 - (held.len() as u64 - 8);
                if held[8..].starts_with(PNG_XMP_KEYWORD) {
                    self.removed = true;
                    State::Drop(rest)
                } else {
                    out.push(Bytes::from(held));
                    State::Pass(rest)
                }
            }
            _ => unreachable!("a PNG never waits for {what:?}"),
        };
        Ok(next)
    }

    fn webp(
        &mut self,
        held: Vec<u8>,
        what: Await,
        out: &mut Vec<Bytes>,
    ) -> Result<State, ScrubError> {
        let head = State::Need(self.head_len(), Await::Head);
        let next = match what {
            Await::Signature if held.starts_with(b"RIFF") && &held[8..] == b"WEBP" => {
                out.push(Bytes::from(held));
                head
            }
            Await::Signature => return Err(ScrubError::Malformed("no WebP header")),
            Await::Head => {
                let size = u32::from_le_bytes([held[4], held[5], held[6], held[7]]);
                let padded = u64::from(size) + u64::from(size % 2);
                let xmp = match &held[..4] {
                    b"EXIF" => false,
                    b"XMP " => true,
                    _ => {
                        out.push(Bytes::from(held));
                        return Ok(State::Pass(padded));
                    }
                };
                out.push(Bytes::from(held));
                State::Need(bounded(padded)?, Await::WebpMeta { xmp })
            }
            Await::WebpMeta { xmp } => {
                let mut data = held;
                if xmp {
                    data.fill(b' ');
                    self.removed = true;
                } else {
                    let tiff = if data.starts_with(EXIF_PREFIX) {
                        EXIF_PREFIX.len()
                    } else {
                        0
                    };
                    self.removed |= clear_gps_settled(&mut data[tiff..])?;
                }
                out.push(Bytes::from(data));
                head
            }
            _ => unreachable!("a WebP never waits for {what:?}"),
        };
        Ok(next)
    }
}

/// A block length that may be held.
fn bounded(len: u64) -> Result<usize, ScrubError> {
    usize::try_from(len)
        .ok()
        .filter(|n| *n <= HELD_BYTES_MAX)
        .ok_or(ScrubError::BlockTooLarge)
}

/// Reads TIFF numbers in the block's byte order.
struct Tiff<'a> {
    data: &'a mut [u8],
    little: bool,
    /// Whether a byte was zeroed that was not zero.
    changed: bool,
}

impl Tiff<'_> {
    fn u16_at(&self, at: usize) -> Option<u16> {
        let b = self.data.get(at..at + 2)?;
        Some(if self.little {
            u16::from_le_bytes([b[0], b[1]])
        } else {
            u16::from_be_bytes([b[0], b[1]])
        })
    }

    fn u32_at(&self, at: usize) -> Option<u32> {
        let b = self.data.get(at..at + 4)?;
        let b = [b[0], b[1], b[2], b[3]];
        Some(if self.little {
            u32::from_le_bytes(b)
        } else {
            u32::from_be_bytes(b)
        })
    }

    fn zero(&mut self, at: usize, len: usize) {
        if let Some(range) = self.data.get_mut(at..at.saturating_add(len)) {
            self.changed |= range.iter().any(|b| *b != 0);
            range.fill(0);
        }
    }
}

/// [`clear_gps`] until it changes nothing more: in a block whose values overlap
/// its directories, zeroing one can make IFD0 point somewhere new. Returns
/// whether anything changed; a block that does not settle is refused.
pub fn clear_gps_settled(block: &mut [u8]) -> Result<bool, ScrubError> {
    const PASSES_MAX: usize = 8;
    let mut changed = false;
    for _ in 0..PASSES_MAX {
        if !clear_gps(block) {
            return Ok(changed);
        }
        changed = true;
    }
    Err(ScrubError::Malformed(
        "its EXIF directories point into each other",
    ))
}

/// Empties the GPS directory of a TIFF block in place: its entries and the values
/// they point to are zeroed and its count set to 0 (IFD0 still points at it, now
/// an empty directory). Returns whether a byte changed. Offsets outside the block
/// are ignored: what is not in the block cannot be stored with it.
pub fn clear_gps(block: &mut [u8]) -> bool {
    let little = match block.get(..4) {
        Some(b"II*\0") => true,
        Some(b"MM\0*") => false,
        _ => return false,
    };
    let mut tiff = Tiff {
        data: block,
        little,
        changed: false,
    };
    let Some(gps) = gps_directory(&tiff) else {
        return false;
    };
    let Some(count) = tiff.u16_at(gps) else {
        return false;
    };
    for i in 0..usize::from(count) {
        let entry = gps + 2 + i * 12;
        let (Some(kind), Some(n)) = (tiff.u16_at(entry + 2), tiff.u32_at(entry + 4)) else {
            break;
        };
        let len = type_size(kind).saturating_mul(n as usize);
        if len > 4 {
            if let Some(at) = tiff.u32_at(entry + 8) {
                tiff.zero(at as usize, len);
            }
        }
        tiff.zero(entry, 12);
    }
    tiff.zero(gps, 2);
    tiff.changed
}

/// Where IFD0's GPS pointer leads, if it has one.
fn gps_directory(tiff: &Tiff<'_>) -> Option<usize> {
    let ifd0 = tiff.u32_at(4)? as usize;
    let count = tiff.u16_at(ifd0)?;
    (0..usize::from(count)).find_map(|i| {
        let entry = ifd0 + 2 + i * 12;
        (tiff.u16_at(entry)? == GPS_IFD_TAG)
            .then(|| tiff.u32_at(entry + 8))
            .flatten()
            .map(|at| at as usize)
    })
}

/// Bytes per value of a TIFF field type (unknown types as 1: never more than
/// the count says).
fn type_size(kind: u16) -> usize {
    match kind {
        3 | 8 => 2,
        4 | 9 | 11 | 13 => 4,
        5 | 10 | 12 => 8,
        _ => 1,
    }
}

#[cfg(test)]
mod tests;
