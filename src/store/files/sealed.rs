//! The sealed file format: a file's bytes encrypted with the message key ring in
//! fixed-size chunks, so that writing and reading (a range, too) hold one chunk
//! in memory whatever the file's size.
//!
//! Layout: a 12-byte header (`CBF1`, the key id, the chunk size; big-endian),
//! then for each chunk of [`CHUNK_BYTES`] plaintext (the last may be shorter) a
//! fresh 12-byte nonce and the AES-256-GCM ciphertext with its tag. Each chunk's
//! associated data binds the file id, its index and whether it is the last: a
//! chunk moved, reordered, dropped from the end or copied into another file
//! fails to open.

use std::io;
use std::sync::Arc;

use bytes::Bytes;
use sha2::{Digest, Sha256};

use super::FileStore;
use crate::crypto::{CryptoError, KeyRing, NONCE_BYTES};

/// Plaintext bytes per chunk.
pub const CHUNK_BYTES: usize = 64 * 1024;
const MAGIC: &[u8; 4] = b"CBF1";
pub const HEADER_BYTES: usize = 12;
/// What sealing adds to each chunk: its nonce and its tag.
pub const CHUNK_OVERHEAD: usize = NONCE_BYTES + 16;

#[derive(Debug, thiserror::Error)]
pub enum FileError {
    #[error("file storage: {0}")]
    Io(#[from] io::Error),
    #[error("sealed file: {0}")]
    Crypto(#[from] CryptoError),
    #[error("sealed file: a blocking task failed: {0}")]
    Task(#[from] tokio::task::JoinError),
    #[error("sealed file: the header is not a chatbox file of this version")]
    Header,
    #[error("the upload ended before it was complete")]
    Aborted,
}

fn aad(file_id: &str, index: u64, last: bool) -> Vec<u8> {
    let mut a = Vec::with_capacity(32 + file_id.len());
    a.extend_from_slice(b"chatbox file v1");
    a.extend_from_slice(&(file_id.len() as u32).to_be_bytes());
    a.extend_from_slice(file_id.as_bytes());
    a.extend_from_slice(&index.to_be_bytes());
    a.push(u8::from(last));
    a
}

/// What a sealed upload came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sealed {
    pub size: u64,
    pub sha256: String,
    pub key_id: u32,
}

/// Seals a stream of plaintext into the format, chunk by chunk. Pure: the
/// caller writes what it returns.
pub struct Sealer {
    ring: Arc<KeyRing>,
    key_id: u32,
    file_id: String,
    index: u64,
    pending: Vec<u8>,
    hash: Sha256,
    size: u64,
}

impl Sealer {
    /// Seals with the ring's current key.
    pub fn new(ring: Arc<KeyRing>, file_id: &str) -> Sealer {
        Sealer {
            key_id: ring.current_key_id(),
            ring,
            file_id: file_id.to_owned(),
            index: 0,
            pending: Vec::with_capacity(CHUNK_BYTES),
            hash: Sha256::new(),
            size: 0,
        }
    }

    pub fn header(&self) -> Vec<u8> {
        let mut h = Vec::with_capacity(HEADER_BYTES);
        h.extend_from_slice(MAGIC);
        h.extend_from_slice(&self.key_id.to_be_bytes());
        h.extend_from_slice(&(CHUNK_BYTES as u32).to_be_bytes());
        h
    }

    /// Takes more plaintext; returns the chunks it completed, sealed. A full
    /// chunk is held back until more follows: only then is it known not to be
    /// the last.
    pub fn push(&mut self, mut data: &[u8]) -> Result<Vec<u8>, CryptoError> {
        self.hash.update(data);
        self.size += data.len() as u64;
        let mut out = Vec::new();
        while !data.is_empty() {
            if self.pending.len() == CHUNK_BYTES {
                self.seal_pending(false, &mut out)?;
            }
            let take = (CHUNK_BYTES - self.pending.len()).min(data.len());
            self.pending.extend_from_slice(&data[..take]);
            data = &data[take..];
        }
        Ok(out)
    }

    fn seal_pending(&mut self, last: bool, out: &mut Vec<u8>) -> Result<(), CryptoError> {
        let aad = aad(&self.file_id, self.index, last);
        let (nonce, ct) = self.ring.seal_bytes(self.key_id, &aad, &self.pending)?;
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&ct);
        self.pending.clear();
        self.index += 1;
        Ok(())
    }

    /// Seals the last chunk; returns it and what the file came to.
    pub fn finish(mut self) -> Result<(Vec<u8>, Sealed), CryptoError> {
        let mut out = Vec::new();
        self.seal_pending(true, &mut out)?;
        let sealed = Sealed {
            size: self.size,
            sha256: hex::encode(self.hash.finalize()),
            key_id: self.key_id,
        };
        Ok((out, sealed))
    }
}

/// One piece of an upload on its way to [`store_stream`].
#[derive(Debug)]
pub enum Piece {
    Data(Bytes),
    /// The upload is complete: commit it. A channel closed without it aborts.
    End,
}

/// Runs on the blocking pool's runtime: seals what arrives on `rx` and writes
/// it to `files` as object `file_id` (every write on a blocking thread), and
/// commits on [`Piece::End`]. Nothing is left behind when it fails or the
/// sender goes away first.
pub async fn store_stream(
    files: Arc<dyn FileStore>,
    ring: Arc<KeyRing>,
    file_id: String,
    rx: async_channel::Receiver<Piece>,
) -> Result<Sealed, FileError> {
    let mut sealer = Sealer::new(ring, &file_id);
    let header = sealer.header();
    let f = files.clone();
    let mut w = tokio::task::spawn_blocking(move || {
        let mut w = f.writer(&file_id)?;
        w.write(&header)?;
        Ok::<_, io::Error>(w)
    })
    .await??;
    loop {
        match rx.recv().await {
            Ok(Piece::Data(b)) => {
                let out = sealer.push(&b)?;
                if !out.is_empty() {
                    w = tokio::task::spawn_blocking(move || w.write(&out).map(|()| w)).await??;
                }
            }
            Ok(Piece::End) => break,
            Err(_) => {
                // Dropping the writer removes its partial object: a blocking call.
                tokio::task::spawn_blocking(move || drop(w)).await?;
                return Err(FileError::Aborted);
            }
        }
    }
    let (last, sealed) = sealer.finish()?;
    tokio::task::spawn_blocking(move || {
        w.write(&last)?;
        w.commit()
    })
    .await??;
    Ok(sealed)
}

/// How many chunks a file of `size` bytes has (an empty file has one, empty).
pub fn chunks_of(size: u64) -> u64 {
    size.div_ceil(CHUNK_BYTES as u64).max(1)
}

/// Reads and opens chunk `index` of a sealed file of `size` bytes. Blocking.
pub fn read_chunk(
    files: &dyn FileStore,
    ring: &KeyRing,
    file_id: &str,
    key_id: u32,
    size: u64,
    index: u64,
) -> Result<Vec<u8>, FileError> {
    let n = chunks_of(size);
    if index == 0 {
        let head = files.read_at(file_id, 0, HEADER_BYTES)?;
        if head.len() != HEADER_BYTES
            || &head[..4] != MAGIC
            || head[8..12] != (CHUNK_BYTES as u32).to_be_bytes()
        {
            return Err(FileError::Header);
        }
    }
    let plain = (size - index.min(n - 1) * CHUNK_BYTES as u64).min(CHUNK_BYTES as u64) as usize;
    let offset = HEADER_BYTES as u64 + index * (CHUNK_BYTES + CHUNK_OVERHEAD) as u64;
    let raw = files.read_at(file_id, offset, plain + CHUNK_OVERHEAD)?;
    if raw.len() != plain + CHUNK_OVERHEAD || index >= n {
        return Err(FileError::Crypto(CryptoError::Tampered));
    }
    let (nonce, ct) = raw.split_at(NONCE_BYTES);
    let nonce: [u8; NONCE_BYTES] = nonce.try_into().map_err(|_| CryptoError::Tampered)?;
    let aad = aad(file_id, index, index == n - 1);
    Ok(ring.open_bytes(key_id, &nonce, &aad, ct)?)
}

#[cfg(test)]
mod tests {
    use super::super::LocalFiles;
    use super::*;

    fn ring() -> Arc<KeyRing> {
        Arc::new(KeyRing::new(&"11".repeat(32), &[]).unwrap())
    }

    fn seal_all(ring: &Arc<KeyRing>, id: &str, data: &[u8], piece: usize) -> (Vec<u8>, Sealed) {
        let mut s = Sealer::new(ring.clone(), id);
        let mut out = s.header();
        for p in data.chunks(piece.max(1)) {
            out.extend(s.push(p).unwrap());
        }
        let (last, sealed) = s.finish().unwrap();
        out.extend(last);
        (out, sealed)
    }

    #[test]
    fn chunks_round_trip_at_every_boundary_and_bind_their_place() {
        let dir = tempfile::tempdir().unwrap();
        let files = LocalFiles::open(dir.path()).unwrap();
        let ring = ring();
        for size in [
            1,
            CHUNK_BYTES - 1,
            CHUNK_BYTES,
            CHUNK_BYTES + 1,
            3 * CHUNK_BYTES,
        ] {
            let data: Vec<u8> = (0..size).map(|i| (i % 251) as u8).collect();
            let id = format!("f_{size}");
            let (bytes, sealed) = seal_all(&ring, &id, &data, 10_000);
            assert_eq!(sealed.size, size as u64);
            assert_eq!(sealed.sha256, hex::encode(Sha256::digest(&data)));
            assert!(!bytes
                .windows(64)
                .any(|w| data.windows(64).next() == Some(w)));
            let mut w = files.writer(&id).unwrap();
            w.write(&bytes).unwrap();
            w.commit().unwrap();
            let mut back = Vec::new();
            for i in 0..chunks_of(size as u64) {
                back.extend(read_chunk(&files, &ring, &id, sealed.key_id, size as u64, i).unwrap());
            }
            assert_eq!(back, data, "size {size}");
        }
        // A file read as a shorter one: its chunk at the new end was not the last.
        let id = format!("f_{}", 3 * CHUNK_BYTES);
        let key = ring.current_key_id();
        let short = 2 * CHUNK_BYTES as u64;
        assert!(read_chunk(&files, &ring, &id, key, short, 1).is_err());
        // Another file's id: nothing opens.
        let copied = files.path_of("f_copied").unwrap();
        std::fs::create_dir_all(copied.parent().unwrap()).unwrap();
        std::fs::copy(files.path_of(&id).unwrap(), copied).unwrap();
        let size = 3 * CHUNK_BYTES as u64;
        assert!(read_chunk(&files, &ring, "f_copied", key, size, 0).is_err());
    }
}
