//! Uploaded files: their metadata (a [`FileRecord`] in the store, beside the
//! sessions) and their bytes, sealed in chunks ([`sealed`]) and kept by a
//! [`FileStore`]: a place that holds opaque objects by id.
//!
//! Three places: [`LocalFiles`] (a directory under `data_dir`), [`s3::S3Files`]
//! (an S3-compatible bucket through `object_store`) and [`gridfs::GridFsFiles`]
//! (MongoDB GridFS). `file_store` says where new uploads go; a record names the
//! place that holds its bytes (`location`), and [`FileStores`] reads each file
//! from that place, so a node whose `file_store` changed still serves the files
//! stored before, as long as it can still reach where they are. The sealing is
//! the same for every place: what leaves the process is ciphertext.

pub mod gridfs;
pub mod s3;
pub mod sealed;

use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::Millis;

/// An uploaded file, as the store records it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
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
    /// Which [`FileStore`] holds the bytes: `local`, `s3` or `gridfs`.
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

/// `id` when it is a plain server-made id (2-64 letters, digits, `_`, `-`):
/// every place names objects by it, and no client string may become a path or
/// a key.
pub fn plain_id(id: &str) -> io::Result<&str> {
    let plain = (2..=64).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    if plain {
        Ok(id)
    } else {
        Err(io::Error::new(io::ErrorKind::InvalidInput, "bad file id"))
    }
}

/// Why file storage could not be set up at start.
#[derive(Debug, thiserror::Error)]
pub enum FileStoreError {
    #[error("file storage ({store}): {source}")]
    Open {
        store: &'static str,
        #[source]
        source: io::Error,
    },
}

/// The places this node keeps and reads files: the one new uploads go to
/// (`file_store`), and the others it is configured to reach, for files recorded
/// there before a change of `file_store`.
#[derive(Clone, Default)]
pub struct FileStores {
    /// Where uploads go; `None` when it could not be opened (uploads are then
    /// refused with 503, downloads from elsewhere still work).
    current: Option<Arc<dyn FileStore>>,
    /// Every place that could be opened, `current` among them.
    all: Vec<Arc<dyn FileStore>>,
}

impl FileStores {
    /// Opens `file_store` (an S3 or GridFS store that cannot be set up stops
    /// start-up; a local directory that cannot be made only refuses uploads, as
    /// before), plus every other place the configuration reaches: the local
    /// directory always, the bucket when `s3_bucket` is set, GridFS when
    /// `mongo_uri` is (connected on first use). Blocking.
    pub fn open(
        config: &crate::config::Config,
        pool: &crate::pool::BlockingPool,
    ) -> Result<FileStores, FileStoreError> {
        let (current, _) = config.file_store_choice();
        let mut stores = FileStores::default();
        let dir = config.data_dir.join("files");
        match LocalFiles::open(&dir) {
            Ok(local) => stores.add(Arc::new(local), current == "local"),
            Err(e) if current == "local" => {
                tracing::warn!(dir = %dir.display(), error = %e, "file storage unavailable: uploads are refused");
            }
            Err(_) => {}
        }
        if config.s3_bucket.is_some() {
            match s3::S3Files::open(config, pool) {
                Ok(b) => stores.add(Arc::new(b), current == "s3"),
                Err(source) if current == "s3" => {
                    return Err(FileStoreError::Open {
                        store: "s3",
                        source,
                    })
                }
                Err(e) => tracing::warn!(error = %e, "the S3 bucket is not readable"),
            }
        }
        if let Some(settings) = crate::store::mongo::MongoSettings::from_config(config) {
            let g = gridfs::GridFsFiles::new(settings, pool);
            if current == "gridfs" {
                g.connect().map_err(|source| FileStoreError::Open {
                    store: "gridfs",
                    source,
                })?;
            }
            stores.add(Arc::new(g), current == "gridfs");
        }
        Ok(stores)
    }

    /// A set of one place, for tests and tools.
    pub fn only(store: Arc<dyn FileStore>) -> FileStores {
        let mut s = FileStores::default();
        s.add(store, true);
        s
    }

    fn add(&mut self, store: Arc<dyn FileStore>, current: bool) {
        if current {
            self.current = Some(store.clone());
        }
        self.all.push(store);
    }

    /// Where new uploads go.
    pub fn current(&self) -> Option<Arc<dyn FileStore>> {
        self.current.clone()
    }

    /// The place a record names (its `location`), if this node reaches it.
    pub fn get(&self, location: &str) -> Option<Arc<dyn FileStore>> {
        self.all.iter().find(|s| s.name() == location).cloned()
    }

    /// Every place this node reaches (deleting a user's files asks each).
    pub fn all(&self) -> &[Arc<dyn FileStore>] {
        &self.all
    }
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
        let id = plain_id(id)?;
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
