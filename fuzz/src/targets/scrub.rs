//! Target `scrub`: location metadata removed from images as they stream past
//! (src/media/ `Scrubber`).
//!
//! The first input byte picks the format (JPEG, PNG, WebP); the rest is the file.
//! Oracles beyond "does not panic": the cleaned file does not depend on how the
//! input was split into pieces; it is never longer than the input, and a WebP keeps
//! its length (its RIFF header counts every byte); cleaning the cleaned file again
//! changes nothing; a file with nothing removed is stored byte for byte.

use bytes::Bytes;
use chatbox::media::{ScrubError, Scrubber};

use crate::mutate::havoc;
use crate::rng::{hash, mix, Rng};

const MIMES: [&str; 3] = ["image/jpeg", "image/png", "image/webp"];

type Cleaned = Result<(Vec<u8>, bool), ScrubError>;

fn scrub(mime: &str, file: &[u8], cuts: &[usize]) -> Cleaned {
    let mut s = Scrubber::for_mime(mime).ok_or(ScrubError::Malformed("no scrubber"))?;
    let mut out = Vec::new();
    let mut at = 0;
    for &cut in cuts.iter().chain([&file.len()]) {
        let cut = cut.clamp(at, file.len());
        s.push(Bytes::copy_from_slice(&file[at..cut]), &mut out)?;
        at = cut;
    }
    s.finish(&mut out)?;
    Ok((out.concat(), s.removed()))
}

pub fn check(input: &[u8]) -> Result<u64, String> {
    let Some((&pick, file)) = input.split_first() else {
        return Ok(0);
    };
    let mime = MIMES[usize::from(pick) % MIMES.len()];
    let whole = scrub(mime, file, &[]);
    let mut rng = Rng::new(hash(input));
    let mut cuts: Vec<usize> = (0..rng.below(8))
        .map(|_| rng.below(file.len() + 1))
        .collect();
    cuts.sort_unstable();
    let split = scrub(mime, file, &cuts);
    if split != whole {
        return Err(format!("split at {cuts:?}: {split:?}, whole: {whole:?}"));
    }
    if let Ok((out, removed)) = &whole {
        check_cleaned(mime, file, out, *removed)?;
    }
    Ok(signature(pick, &whole))
}

fn check_cleaned(mime: &str, file: &[u8], out: &[u8], removed: bool) -> Result<(), String> {
    if out.len() > file.len() || (mime == "image/webp" && out.len() != file.len()) {
        return Err(format!(
            "{mime}: {} bytes in, {} out",
            file.len(),
            out.len()
        ));
    }
    if !removed && out != file {
        return Err(format!("{mime}: changed with nothing removed"));
    }
    match scrub(mime, out, &[]) {
        Ok((again, _)) if again == out => Ok(()),
        other => Err(format!("{mime}: cleaning again gave {other:?}")),
    }
}

fn signature(pick: u8, c: &Cleaned) -> u64 {
    let format = u64::from(pick) % MIMES.len() as u64;
    match c {
        Ok((out, removed)) => mix(
            format,
            u64::from(*removed) << 32 | (out.len() as u64).min(64),
        ),
        Err(e) => mix(format, hash(format!("{e}").as_bytes())),
    }
}

/// Container tokens: markers, chunk types, the metadata signatures.
pub const DICT: &[&[u8]] = &[
    b"\xff\xd8",
    b"\xff\xe1",
    b"\xff\xda",
    b"\xff\xd9",
    b"\xff\xff",
    b"Exif\0\0",
    b"http://ns.adobe.com/xap/1.0/\0",
    b"\x89PNG\r\n\x1a\n",
    b"eXIf",
    b"iTXt",
    b"XML:com.adobe.xmp\0",
    b"IDAT",
    b"RIFF",
    b"WEBP",
    b"EXIF",
    b"XMP ",
    b"MM\0*",
    b"II*\0",
    b"\x88\x25",
    b"\x25\x88",
];

pub fn mutate(rng: &mut Rng, input: &mut Vec<u8>, corpus: &[Vec<u8>]) {
    havoc(rng, input, corpus, DICT);
}
