//! Sealed file objects in MongoDB GridFS: the bucket `chatbox_files` in the
//! configured database (`<db>.chatbox_files.files` and `.chunks`), one GridFS
//! file per object, its `_id` the file id.
//!
//! `writer` is the driver's upload stream (it holds one GridFS chunk in memory),
//! `delete` the bucket's delete. `read_at` does not use the download stream,
//! which can only start at the beginning: it reads the file document for its
//! chunk size and length and then fetches only the GridFS chunks that overlap
//! the range (`n` between the first and the last), so reading one sealed chunk
//! of a large file costs two small queries, not a scan from the start. The
//! GridFS chunk size is one sealed chunk (plus nonce and tag), so a read
//! touches at most two of them.
//!
//! Like every [`FileStore`], its methods block: they run on the pool's blocking
//! threads and `block_on` its runtime, where the driver lives. The connection
//! is made on first use (start-up makes it at once when GridFS is where new
//! uploads go), so a node that only might read old GridFS files holds no
//! MongoDB connections for them until it does.

use std::io;
use std::sync::{Arc, OnceLock};

use futures_util::io::AsyncWriteExt;
use futures_util::TryStreamExt;
use mongodb::bson::{doc, Bson, Document};
use mongodb::error::{ErrorKind, GridFsErrorKind};
use mongodb::gridfs::{GridFsBucket, GridFsUploadStream};
use mongodb::options::GridFsBucketOptions;
use mongodb::Collection;
use tokio::runtime::Handle;

use super::sealed::{CHUNK_BYTES, CHUNK_OVERHEAD};
use super::{plain_id, FileStore, ObjectWriter};
use crate::pool::BlockingPool;
use crate::store::mongo::{connect, MongoSettings};

/// The bucket's name in the configured database.
pub const BUCKET: &str = "chatbox_files";
/// Bytes per GridFS chunk: one sealed chunk with its nonce and tag.
pub const GRIDFS_CHUNK_BYTES: u32 = (CHUNK_BYTES + CHUNK_OVERHEAD) as u32;

/// Connected: the bucket and its two collections, read directly for ranges.
struct Bucket {
    bucket: GridFsBucket,
    files: Collection<Document>,
    chunks: Collection<Document>,
}

pub struct GridFsFiles {
    settings: MongoSettings,
    pool: BlockingPool,
    handle: Handle,
    bucket: OnceLock<Arc<Bucket>>,
}

fn other(e: impl std::fmt::Display) -> io::Error {
    io::Error::other(e.to_string())
}

fn mongo_err(e: mongodb::error::Error) -> io::Error {
    io::Error::other(e)
}

impl GridFsFiles {
    /// Nothing is sent until [`GridFsFiles::connect`] or the first call.
    pub fn new(settings: MongoSettings, pool: &BlockingPool) -> GridFsFiles {
        GridFsFiles {
            settings,
            pool: pool.clone(),
            handle: pool.handle(),
            bucket: OnceLock::new(),
        }
    }

    /// Connects now (and pings), so a wrong URI stops start-up with its reason.
    /// Blocking.
    pub fn connect(&self) -> io::Result<()> {
        self.bucket().map(drop)
    }

    fn bucket(&self) -> io::Result<Arc<Bucket>> {
        if let Some(b) = self.bucket.get() {
            return Ok(b.clone());
        }
        // Two first calls at once may both connect; one client is kept.
        let (_client, db) = connect(&self.settings, &self.pool).map_err(other)?;
        let options = GridFsBucketOptions::builder()
            .bucket_name(BUCKET.to_owned())
            .chunk_size_bytes(GRIDFS_CHUNK_BYTES)
            .build();
        let made = Arc::new(Bucket {
            bucket: db.gridfs_bucket(options),
            files: db.collection(&format!("{BUCKET}.files")),
            chunks: db.collection(&format!("{BUCKET}.chunks")),
        });
        Ok(self.bucket.get_or_init(|| made).clone())
    }
}

/// A whole number stored by any driver (GridFS writes `n` and `chunkSize` as
/// 32-bit, `length` as 64-bit; other drivers differ).
fn int(d: &Document, key: &str) -> io::Result<i64> {
    match d.get(key) {
        Some(Bson::Int32(n)) => Ok(i64::from(*n)),
        Some(Bson::Int64(n)) => Ok(*n),
        Some(Bson::Double(n)) if n.fract() == 0.0 => Ok(*n as i64),
        _ => Err(other(format!("GridFS document without a whole {key}"))),
    }
}

impl FileStore for GridFsFiles {
    fn name(&self) -> &'static str {
        "gridfs"
    }

    fn writer(&self, id: &str) -> io::Result<Box<dyn ObjectWriter>> {
        let id = plain_id(id)?.to_owned();
        let b = self.bucket()?;
        let stream = self
            .handle
            .block_on(async {
                b.bucket
                    .open_upload_stream(&id)
                    .id(Bson::String(id.clone()))
                    .await
            })
            .map_err(mongo_err)?;
        Ok(Box::new(GridFsWriter {
            stream: Some(stream),
            handle: self.handle.clone(),
        }))
    }

    fn read_at(&self, id: &str, offset: u64, len: usize) -> io::Result<Vec<u8>> {
        let id = plain_id(id)?;
        let b = self.bucket()?;
        self.handle.block_on(read_range(&b, id, offset, len))
    }

    fn delete(&self, id: &str) -> io::Result<()> {
        let id = plain_id(id)?;
        let b = self.bucket()?;
        match self
            .handle
            .block_on(async { b.bucket.delete(Bson::String(id.to_owned())).await })
        {
            Ok(()) => Ok(()),
            Err(e) => match *e.kind {
                // Its chunks, if any were left, are deleted all the same.
                ErrorKind::GridFs(GridFsErrorKind::FileNotFound { .. }) => Ok(()),
                _ => Err(mongo_err(e)),
            },
        }
    }
}

/// The bytes `offset..offset+len` of GridFS file `id` (fewer at its end), from
/// the chunks that overlap them only.
async fn read_range(b: &Bucket, id: &str, offset: u64, len: usize) -> io::Result<Vec<u8>> {
    let file = b
        .files
        .find_one(doc! {"_id": id})
        .await
        .map_err(mongo_err)?
        .ok_or_else(|| io::Error::from(io::ErrorKind::NotFound))?;
    let (size, chunk) = (int(&file, "length")?, int(&file, "chunkSize")?);
    let (size, chunk) = (
        u64::try_from(size).map_err(other)?,
        u64::try_from(chunk).map_err(other)?,
    );
    let end = offset.saturating_add(len as u64).min(size);
    if chunk == 0 || offset >= end {
        return Ok(Vec::new());
    }
    let (first, last) = (offset / chunk, (end - 1) / chunk);
    let filter = doc! {
        "files_id": id,
        "n": {"$gte": i64::try_from(first).map_err(other)?, "$lte": i64::try_from(last).map_err(other)?},
    };
    let mut cursor = b
        .chunks
        .find(filter)
        .sort(doc! {"n": 1})
        .await
        .map_err(mongo_err)?;
    let mut out = Vec::with_capacity((end - offset) as usize);
    let mut want = first;
    while let Some(c) = cursor.try_next().await.map_err(mongo_err)? {
        let n = u64::try_from(int(&c, "n")?).map_err(other)?;
        let data = c.get_binary_generic("data").map_err(other)?;
        let start = n * chunk;
        let from = offset.max(start) - start;
        let to = end.min(start + data.len() as u64) - start;
        if n != want || from > to {
            return Err(other(format!(
                "GridFS file {id}: chunk {n} missing or short"
            )));
        }
        out.extend_from_slice(&data[from as usize..to as usize]);
        want += 1;
    }
    if want != last + 1 {
        return Err(other(format!("GridFS file {id}: chunk {want} missing")));
    }
    Ok(out)
}

/// The driver's upload stream: the file document is written on `close`, so the
/// object exists only once committed.
struct GridFsWriter {
    stream: Option<GridFsUploadStream>,
    handle: Handle,
}

impl ObjectWriter for GridFsWriter {
    fn write(&mut self, bytes: &[u8]) -> io::Result<()> {
        let stream = self.stream.as_mut().ok_or(io::ErrorKind::BrokenPipe)?;
        self.handle.block_on(stream.write_all(bytes))
    }

    fn commit(mut self: Box<Self>) -> io::Result<()> {
        let mut stream = self.stream.take().ok_or(io::ErrorKind::BrokenPipe)?;
        let closed = self.handle.block_on(stream.close());
        if closed.is_err() {
            let _ = self.handle.block_on(stream.abort());
        }
        closed
    }
}

impl Drop for GridFsWriter {
    /// Given up: the chunks written so far are deleted (on a blocking thread,
    /// as every [`FileStore`] call runs).
    fn drop(&mut self) {
        if let Some(mut stream) = self.stream.take() {
            if let Err(e) = self.handle.block_on(stream.abort()) {
                tracing::warn!(error = %e, "an abandoned GridFS upload could not be removed");
            }
        }
    }
}
