//! Uploaded files: their metadata (a [`FileRecord`] in the store, beside the
//! sessions) and their bytes, sealed in chunks ([`sealed`]) and kept by a
//! [`FileStore`]: a place that holds opaque objects by id.
//!
//! Only [`LocalFiles`] (a directory under `data_dir`) is built. Other places plug
//! in behind the same trait: an S3-compatible bucket through the `object_store`
//! crate (`writer` = a multipart upload, `read_at` = a ranged GET, `delete` =
//! DELETE) and MongoDB GridFS (`writer` = an upload stream, `read_at` = a
//! download from an offset); both are async clients, so their methods would
//! `block_on` the pool's runtime handle from the blocking thread they run on.
//! The sealing is the same for every place: what leaves the process is ciphertext.

pub mod sealed;

use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use super::Millis;

/// An uploaded file, as the store records it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileRecord {
    pub file_id: String,
    /// The user who uploaded it (`sub` of the token).
    pub owner: String,
    /// Decided from the content, never from the client's claim.
    pub mime: String,
    /// Bytes of the plaintext.
    pub size: u64,
    /// SHA-256 of the plaintext, lowercase hex.
    pub sha256: String,
    /// The client's file name, sanitised; only ever shown, never a path.
    pub name: Option<String>,
    pub created_at: Millis,
    /// The key the file was sealed with.
    pub key_id: u32,
    /// Which [`FileStore`] holds the bytes (`local`).
    pub location: String,
}

impl FileRecord {
    /// What a message that carries the file shows of it.
    pub fn to_ref(&self) -> FileRef {
        FileRef {
            file_id: self.file_id.clone(),
            mime: self.mime.clone(),
            size: self.size,
            name: self.name.clone(),
        }
    }
}

/// A file attached to a message: what history and transcripts show of it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct FileRef {
    pub file_id: String,
    pub mime: String,
    pub size: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

impl FileRef {
    /// As stored beside a message (SQLite keeps it as JSON text).
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }

    /// A stored reference; `None` for anything unreadable (shown without it).
    pub fn from_json(s: &str) -> Option<FileRef> {
        serde_json::from_str(s).ok()
    }
}

/// Where sealed file objects live. Every method blocks: callers run them on the
/// blocking pool (`tokio::task::spawn_blocking`), never on a core.
pub trait FileStore: Send + Sync + 'static {
    /// The name recorded in [`FileRecord::location`].
    fn name(&self) -> &'static str;
    /// Starts a new object; it exists under `id` only once committed.
    fn writer(&self, id: &str) -> io::Result<Box<dyn ObjectWriter>>;
    /// Up to `len` bytes of object `id` from `offset` (fewer only at its end).
    fn read_at(&self, id: &str, offset: u64, len: usize) -> io::Result<Vec<u8>>;
    /// Removes object `id`; one that does not exist is not an error.
    fn delete(&self, id: &str) -> io::Result<()>;
}

/// An object being written. Dropped without [`ObjectWriter::commit`], it leaves
/// nothing behind.
pub trait ObjectWriter: Send {
    fn write(&mut self, bytes: &[u8]) -> io::Result<()>;
    /// Makes the object durable and visible under its id.
    fn commit(self: Box<Self>) -> io::Result<()>;
}

/// Objects as files under a directory (`<data_dir>/files`), in subdirectories
/// by the id's last two characters so no directory grows without end. Ids are
/// made by the server ([`crate::clock::new_id`]) and checked again here: no
/// client string ever becomes part of a path.
#[derive(Debug, Clone)]
pub struct LocalFiles {
    root: PathBuf,
}

impl LocalFiles {
    /// Creates the directory (owner-only) if needed.
    pub fn open(root: &Path) -> io::Result<LocalFiles> {
        fs::create_dir_all(root)?;
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            fs::set_permissions(root, fs::Permissions::from_mode(0o700))?;
        }
        Ok(LocalFiles {
            root: root.to_owned(),
        })
    }

    /// The object's path; an id that is not a plain server-made id is refused.
    pub fn path_of(&self, id: &str) -> io::Result<PathBuf> {
        let plain = !id.is_empty()
            && id.len() <= 64
            && id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
        if !plain || id.len() < 2 {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "bad file id"));
        }
        let shard = &id[id.len() - 2..];
        Ok(self.root.join(shard).join(format!("{id}.cbf")))
    }
}

impl FileStore for LocalFiles {
    fn name(&self) -> &'static str {
        "local"
    }

    fn writer(&self, id: &str) -> io::Result<Box<dyn ObjectWriter>> {
        let path = self.path_of(id)?;
        if let Some(dir) = path.parent() {
            fs::create_dir_all(dir)?;
        }
        let tmp = path.with_extension("part");
        let file = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&tmp)?;
        Ok(Box::new(LocalWriter {
            file: Some(io::BufWriter::new(file)),
            tmp,
            path,
        }))
    }

    fn read_at(&self, id: &str, offset: u64, len: usize) -> io::Result<Vec<u8>> {
        use std::io::{Read, Seek, SeekFrom};
        let mut f = fs::File::open(self.path_of(id)?)?;
        f.seek(SeekFrom::Start(offset))?;
        let mut out = Vec::with_capacity(len);
        f.take(len as u64).read_to_end(&mut out)?;
        Ok(out)
    }

    fn delete(&self, id: &str) -> io::Result<()> {
        match fs::remove_file(self.path_of(id)?) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }
}

struct LocalWriter {
    file: Option<io::BufWriter<fs::File>>,
    tmp: PathBuf,
    path: PathBuf,
}

impl ObjectWriter for LocalWriter {
    fn write(&mut self, bytes: &[u8]) -> io::Result<()> {
        match &mut self.file {
            Some(f) => f.write_all(bytes),
            None => Err(io::ErrorKind::BrokenPipe.into()),
        }
    }

    fn commit(mut self: Box<Self>) -> io::Result<()> {
        let file = self.file.take().ok_or(io::ErrorKind::BrokenPipe)?;
        let file = file.into_inner().map_err(|e| e.into_error())?;
        file.sync_all()?;
        drop(file);
        // Renamed only once complete and on disk: a crash leaves a `.part`, never
        // a short object under the real name.
        fs::rename(&self.tmp, &self.path)?;
        Ok(())
    }
}

impl Drop for LocalWriter {
    fn drop(&mut self) {
        if self.file.take().is_some() {
            let _ = fs::remove_file(&self.tmp);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn objects_appear_on_commit_and_ids_never_escape_the_root() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalFiles::open(dir.path()).unwrap();
        let mut w = store.writer("f_abc123").unwrap();
        w.write(b"hello world").unwrap();
        assert!(
            store.read_at("f_abc123", 0, 5).is_err(),
            "not before commit"
        );
        w.commit().unwrap();
        assert_eq!(store.read_at("f_abc123", 6, 100).unwrap(), b"world");
        let dropped = store.writer("f_gone").unwrap();
        drop(dropped);
        assert!(store.read_at("f_gone", 0, 1).is_err());
        for bad in ["../x", "a/b", "", "x", "..", "f.cbf"] {
            assert!(store.path_of(bad).is_err(), "{bad}");
        }
        store.delete("f_abc123").unwrap();
        store.delete("f_abc123").unwrap();
    }
}
