//! Images the tests make, byte by byte: a PNG with valid chunks and CRCs, a
//! JPEG, a WebP, each optionally carrying an EXIF block with a GPS directory and
//! an XMP packet with a location. Shared with the unit tests of `src/media.rs`
//! (`#[path]`), so it uses nothing but std.
#![allow(dead_code)]

/// The latitude the GPS directory carries: 48° 51' 29.6" N as rationals.
pub const GPS_LATITUDE: [(u32, u32); 3] = [(48, 1), (51, 1), (296, 10)];
/// The orientation tag's value (rotate 90° CW): it must survive the cleaning.
pub const ORIENTATION: u16 = 6;
/// Text the XMP packet carries, which must not survive either.
pub const XMP_LOCATION: &str = "exif:GPSLatitude=\"48,51.493N\"";

pub fn crc32(data: &[u8]) -> u32 {
    let mut crc = 0xffff_ffffu32;
    for &b in data {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xedb8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

fn adler32(data: &[u8]) -> u32 {
    let (mut a, mut b) = (1u32, 0u32);
    for &x in data {
        a = (a + u32::from(x)) % 65521;
        b = (b + a) % 65521;
    }
    (b << 16) | a
}

/// A TIFF block (big-endian, as cameras write it) with IFD0 = {Orientation, GPS
/// pointer} and a GPS directory = {GPSLatitudeRef "N", GPSLatitude (3 rationals,
/// stored out of line)}.
pub fn tiff_with_gps() -> Vec<u8> {
    let mut t = b"MM\0*".to_vec();
    t.extend_from_slice(&8u32.to_be_bytes());
    // IFD0 at 8: 2 entries, next IFD 0. 8 + 2 + 24 + 4 = 38.
    let gps_at = 38u32;
    t.extend_from_slice(&2u16.to_be_bytes());
    entry(&mut t, 0x0112, 3, 1, u32::from(ORIENTATION) << 16);
    entry(&mut t, 0x8825, 4, 1, gps_at);
    t.extend_from_slice(&0u32.to_be_bytes());
    // GPS IFD at 38: 2 entries, next 0; the rationals follow at 38 + 30 = 68.
    let values_at = gps_at + 2 + 24 + 4;
    t.extend_from_slice(&2u16.to_be_bytes());
    entry(&mut t, 0x0001, 2, 2, u32::from_be_bytes(*b"N\0\0\0"));
    entry(&mut t, 0x0002, 5, 3, values_at);
    t.extend_from_slice(&0u32.to_be_bytes());
    for (n, d) in GPS_LATITUDE {
        t.extend_from_slice(&n.to_be_bytes());
        t.extend_from_slice(&d.to_be_bytes());
    }
    t
}

fn entry(t: &mut Vec<u8>, tag: u16, kind: u16, count: u32, value: u32) {
    t.extend_from_slice(&tag.to_be_bytes());
    t.extend_from_slice(&kind.to_be_bytes());
    t.extend_from_slice(&count.to_be_bytes());
    t.extend_from_slice(&value.to_be_bytes());
}

/// An XMP packet that repeats the location as text.
pub fn xmp() -> Vec<u8> {
    format!(
        "<?xpacket begin=\"\" id=\"W5M0MpCehiHzreSzNTczkc9d\"?><x:xmpmeta xmlns:x=\"adobe:ns:meta/\">\
         <rdf:RDF xmlns:rdf=\"http://www.w3.org/1999/02/22-rdf-syntax-ns#\"><rdf:Description \
         xmlns:exif=\"http://ns.adobe.com/exif/1.0/\" {XMP_LOCATION}/></rdf:RDF></x:xmpmeta>\
         <?xpacket end=\"w\"?>"
    )
    .into_bytes()
}

pub fn png_chunk(out: &mut Vec<u8>, kind: &[u8; 4], data: &[u8]) {
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    let mut body = kind.to_vec();
    body.extend_from_slice(data);
    out.extend_from_slice(&body);
    out.extend_from_slice(&crc32(&body).to_be_bytes());
}

/// A valid grey PNG of `w` x `h` pixels (zlib stored blocks, no compression), so
/// its size follows its dimensions.
pub fn png(w: u32, h: u32) -> Vec<u8> {
    png_with(w, h, false)
}

/// [`png`], with an eXIf chunk and an XMP iTXt chunk before the pixels when
/// `located`.
pub fn png_with(w: u32, h: u32, located: bool) -> Vec<u8> {
    let mut raw = Vec::new();
    for y in 0..h {
        raw.push(0); // filter: none
        raw.extend((0..w).map(|x| ((x * 7 + y * 13) % 256) as u8));
    }
    let mut z = vec![0x78, 0x01];
    let blocks: Vec<&[u8]> = raw.chunks(65_535).collect();
    for (i, block) in blocks.iter().enumerate() {
        z.push(u8::from(i + 1 == blocks.len()));
        let len = block.len() as u16;
        z.extend_from_slice(&len.to_le_bytes());
        z.extend_from_slice(&(!len).to_le_bytes());
        z.extend_from_slice(block);
    }
    z.extend_from_slice(&adler32(&raw).to_be_bytes());
    let mut out = b"\x89PNG\r\n\x1a\n".to_vec();
    let mut ihdr = Vec::new();
    ihdr.extend_from_slice(&w.to_be_bytes());
    ihdr.extend_from_slice(&h.to_be_bytes());
    ihdr.extend_from_slice(&[8, 0, 0, 0, 0]); // 8-bit greyscale
    png_chunk(&mut out, b"IHDR", &ihdr);
    if located {
        png_chunk(&mut out, b"eXIf", &tiff_with_gps());
        let mut text = b"XML:com.adobe.xmp\0\0\0\0\0".to_vec();
        text.extend_from_slice(&xmp());
        png_chunk(&mut out, b"iTXt", &text);
    }
    png_chunk(&mut out, b"IDAT", &z);
    png_chunk(&mut out, b"IEND", &[]);
    out
}

/// A JPEG's structure: SOI, a JFIF APP0 segment, a comment, EOI.
pub fn jpeg() -> Vec<u8> {
    jpeg_with(false)
}

fn jpeg_segment(out: &mut Vec<u8>, marker: u8, payload: &[u8]) {
    out.extend_from_slice(&[0xff, marker]);
    out.extend_from_slice(&((payload.len() + 2) as u16).to_be_bytes());
    out.extend_from_slice(payload);
}

/// [`jpeg`], with an EXIF APP1 segment and an XMP APP1 segment when `located`,
/// then a scan whose data the cleaning must leave alone.
pub fn jpeg_with(located: bool) -> Vec<u8> {
    let mut out = vec![0xff, 0xd8];
    jpeg_segment(&mut out, 0xe0, b"JFIF\0\x01\x01\0\0\x01\0\x01\0\0");
    if located {
        let mut exif = b"Exif\0\0".to_vec();
        exif.extend_from_slice(&tiff_with_gps());
        jpeg_segment(&mut out, 0xe1, &exif);
        let mut packet = b"http://ns.adobe.com/xap/1.0/\0".to_vec();
        packet.extend_from_slice(&xmp());
        jpeg_segment(&mut out, 0xe1, &packet);
    }
    jpeg_segment(&mut out, 0xfe, b"made by tests/common/images.rs");
    // A fill byte before the marker, as some encoders write.
    out.push(0xff);
    jpeg_segment(&mut out, 0xda, &[1, 1, 0, 0, 0x3f, 0]);
    out.extend_from_slice(&[0x12, 0x34, 0xff, 0x00, 0x56]);
    out.extend_from_slice(&[0xff, 0xd9]);
    out
}

/// A lossless WebP (a VP8L chunk of made-up pixel bytes), with an EXIF chunk and
/// an XMP chunk after the pixels (where WebP writers put them) when `located`.
pub fn webp_with(located: bool) -> Vec<u8> {
    let mut chunks = Vec::new();
    let mut chunk = |kind: &[u8; 4], data: &[u8]| {
        chunks.extend_from_slice(kind);
        chunks.extend_from_slice(&(data.len() as u32).to_le_bytes());
        chunks.extend_from_slice(data);
        if data.len() % 2 == 1 {
            chunks.push(0);
        }
    };
    // VP8X: flags EXIF (0x08) and XMP (0x04), canvas 1 x 1.
    let flags = if located { 0x0c } else { 0 };
    chunk(b"VP8X", &[flags, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
    chunk(
        b"VP8L",
        &[
            0x2f, 0, 0, 0, 0x10, 0x07, 0x10, 0x11, 0x11, 0x88, 0x88, 0xfe, 0x07,
        ],
    );
    if located {
        chunk(b"EXIF", &tiff_with_gps());
        chunk(b"XMP ", &xmp());
    }
    let mut out = b"RIFF".to_vec();
    out.extend_from_slice(&((chunks.len() + 4) as u32).to_le_bytes());
    out.extend_from_slice(b"WEBP");
    out.extend_from_slice(&chunks);
    out
}

/// Whether `needle` occurs in `hay`.
pub fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}
