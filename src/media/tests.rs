//! The scrubber on images made byte by byte (tests/common/images.rs), fed whole
//! and one byte at a time, read back by an independent EXIF reader.

#[path = "../../tests/common/images.rs"]
mod images;

use super::*;
use images::*;

/// The cleaned file, fed in pieces of `piece` bytes.
fn scrub(mime: &str, file: &[u8], piece: usize) -> Result<(Vec<u8>, bool), ScrubError> {
    let mut s = Scrubber::for_mime(mime).expect("an image type");
    let mut out = Vec::new();
    for p in file.chunks(piece) {
        s.push(Bytes::copy_from_slice(p), &mut out)?;
    }
    s.finish(&mut out)?;
    Ok((out.concat(), s.removed()))
}

fn latitude_bytes() -> Vec<u8> {
    GPS_LATITUDE
        .iter()
        .flat_map(|(n, d)| [n.to_be_bytes(), d.to_be_bytes()].concat())
        .collect()
}

/// What an independent reader finds: (has GPS fields, orientation).
fn read_back(file: &[u8]) -> (bool, Option<u32>) {
    let exif = exif::Reader::new()
        .read_from_container(&mut std::io::Cursor::new(file))
        .expect("the cleaned file's EXIF still reads");
    let gps = exif
        .fields()
        .any(|f| f.ifd_num == exif::In::PRIMARY && f.tag.context() == exif::Context::Gps);
    let orientation = exif
        .get_field(exif::Tag::Orientation, exif::In::PRIMARY)
        .and_then(|f| f.value.get_uint(0));
    (gps, orientation)
}

#[test]
fn every_format_loses_its_location_and_keeps_the_rest_however_it_is_split() {
    let files = [
        ("image/jpeg", jpeg_with(true)),
        ("image/png", png_with(3, 2, true)),
        ("image/webp", webp_with(true)),
    ];
    for (mime, file) in files {
        let before = read_back(&file);
        assert_eq!(
            before,
            (true, Some(u32::from(ORIENTATION))),
            "{mime}: the fixture"
        );
        let (whole, removed) = scrub(mime, &file, file.len()).unwrap();
        assert!(removed, "{mime}");
        assert!(
            !contains(&whole, &latitude_bytes()),
            "{mime}: the latitude stayed"
        );
        assert!(
            !contains(&whole, XMP_LOCATION.as_bytes()),
            "{mime}: the XMP stayed"
        );
        assert_eq!(
            read_back(&whole),
            (false, Some(u32::from(ORIENTATION))),
            "{mime}"
        );
        for piece in [1, 2, 3, 7, 64] {
            assert_eq!(
                scrub(mime, &file, piece).unwrap().0,
                whole,
                "{mime} in {piece}s"
            );
        }
    }
}

#[test]
fn an_image_without_location_is_stored_byte_for_byte() {
    for (mime, file) in [
        ("image/jpeg", jpeg_with(false)),
        ("image/png", png(5, 4)),
        ("image/webp", webp_with(false)),
    ] {
        assert_eq!(scrub(mime, &file, 5).unwrap(), (file, false), "{mime}");
    }
}

#[test]
fn sizes_are_kept_where_the_container_counts_them_and_png_crcs_stay_valid() {
    let webp = webp_with(true);
    assert_eq!(scrub("image/webp", &webp, 9).unwrap().0.len(), webp.len());
    let (png, _) = scrub("image/png", &png_with(3, 2, true), 4).unwrap();
    let mut at = 8;
    while at < png.len() {
        let len = u32::from_be_bytes(png[at..at + 4].try_into().unwrap()) as usize;
        let body = &png[at + 4..at + 8 + len];
        let crc = u32::from_be_bytes(png[at + 8 + len..at + 12 + len].try_into().unwrap());
        assert_eq!(
            crc32(body),
            crc,
            "chunk {:?}",
            String::from_utf8_lossy(&body[..4])
        );
        at += 12 + len;
    }
}

#[test]
fn a_file_that_ends_inside_its_metadata_or_is_not_what_it_claims_is_refused() {
    let jpeg = jpeg_with(true);
    // Cut inside the EXIF segment (it starts after SOI and the 20-byte APP0).
    let cut = &jpeg[..2 + 18 + 10];
    assert_eq!(
        scrub("image/jpeg", cut, 3).unwrap_err(),
        ScrubError::Malformed("it ends inside its metadata")
    );
    assert!(scrub("image/jpeg", b"\xff\xd8\x00\x00", 4).is_err());
    assert!(scrub("image/png", b"\x89PNX\r\n\x1a\n", 8).is_err());
    // A metadata block larger than what is held.
    let mut huge = b"RIFF\0\0\0\0WEBPEXIF".to_vec();
    huge.extend_from_slice(&(HELD_BYTES_MAX as u32 + 2).to_le_bytes());
    assert_eq!(
        scrub("image/webp", &huge, 100).unwrap_err(),
        ScrubError::BlockTooLarge
    );
    assert!(Scrubber::for_mime("application/pdf").is_none());
}

#[test]
fn gps_offsets_outside_the_block_are_ignored_not_followed() {
    let mut tiff = tiff_with_gps();
    // Point the GPS directory past the end: nothing to clear, nothing panics.
    let len = tiff.len() as u32;
    // IFD0 at 8: its count, then the GPS pointer is the second 12-byte entry.
    tiff[10 + 12 + 8..10 + 12 + 12].copy_from_slice(&(len + 100).to_be_bytes());
    assert!(!clear_gps(&mut tiff));
    assert!(!clear_gps(b"MM\0*\xff\xff\xff\xff".to_vec().as_mut_slice()));
    assert!(!clear_gps(&mut []));
    // Cleaning is done once: a second pass finds nothing left to change.
    let mut tiff = tiff_with_gps();
    assert_eq!(clear_gps_settled(&mut tiff), Ok(true));
    assert!(!clear_gps(&mut tiff));
}

#[test]
fn a_chunk_left_alone_keeps_its_bytes_even_a_wrong_crc() {
    // An eXIf chunk without GPS and a CRC that does not match: stored as it came
    // (found by the fuzzer: the CRC was rewritten although nothing changed).
    let mut file = png(2, 2);
    let mut chunk = Vec::new();
    png_chunk(&mut chunk, b"eXIf", b"MM\0*\0\0\0\x08\0\0\0\0\0\0");
    let last = chunk.len() - 1;
    chunk[last] ^= 0xff;
    file.splice(33..33, chunk);
    assert_eq!(scrub("image/png", &file, 3).unwrap(), (file, false));
}
