//! Sealed file objects in an S3-compatible bucket (AWS S3, MinIO, Ceph, ...)
//! through the `object_store` crate: `writer` buffers up to one part and then
//! becomes a multipart upload, `read_at` is a ranged GET, `delete` a DELETE.
//!
//! The client is async and lives on the blocking pool's runtime; the
//! [`FileStore`] methods are called on that runtime's blocking threads, so each
//! one `block_on`s the runtime's handle (never from a core, never from inside an
//! async task).

use std::io;
use std::sync::Arc;

use object_store::aws::{AmazonS3, AmazonS3Builder};
use object_store::path::Path as ObjectPath;
use object_store::{MultipartUpload, ObjectStoreExt, PutPayload};
use tokio::runtime::Handle;

use super::{plain_id, FileStore, ObjectWriter};
use crate::config::Config;
use crate::pool::BlockingPool;

/// S3 requires every part but the last to be at least 5 MiB: that is what an
/// upload holds in memory at most (the sealed chunks arrive ~64 KiB at a time).
/// An object no larger than one part is a single PUT.
pub const PART_BYTES: usize = 5 * 1024 * 1024;

/// The bucket, and the runtime its client runs on.
pub struct S3Files {
    bucket: Arc<AmazonS3>,
    handle: Handle,
}

fn io_err(e: object_store::Error) -> io::Error {
    io::Error::from(e)
}

impl S3Files {
    /// Builds the client from `s3_*` (nothing is sent until the first request:
    /// a wrong endpoint or key shows on the first upload, and in the log).
    pub fn open(config: &Config, pool: &BlockingPool) -> io::Result<S3Files> {
        let bucket = config
            .s3_bucket
            .as_deref()
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "s3_bucket is not set"))?;
        // The HTTP client is created inside the runtime it will run on.
        let _in_pool = pool.enter();
        // A request that fails is retried for up to 30 s (object_store's default
        // is 3 minutes): each call holds a blocking thread of the pool meanwhile.
        let retry = object_store::RetryConfig {
            max_retries: 4,
            retry_timeout: std::time::Duration::from_secs(30),
            ..Default::default()
        };
        let mut b = AmazonS3Builder::new()
            .with_bucket_name(bucket)
            .with_region(&config.s3_region)
            .with_retry(retry);
        if let Some(endpoint) = &config.s3_endpoint {
            // Validation allowed plain http only to loopback.
            b = b
                .with_endpoint(endpoint)
                .with_allow_http(endpoint.starts_with("http://"));
        }
        if let (Some(id), Some(secret)) = (&config.s3_access_key_id, &config.s3_secret_access_key) {
            b = b.with_access_key_id(id).with_secret_access_key(secret);
        }
        let bucket = b.build().map_err(io_err)?;
        Ok(S3Files {
            bucket: Arc::new(bucket),
            handle: pool.handle(),
        })
    }

    /// The object's key: `files/<id>.cbf`, the id checked like a local path.
    pub fn key_of(id: &str) -> io::Result<ObjectPath> {
        let id = plain_id(id)?;
        Ok(ObjectPath::from(format!("files/{id}.cbf")))
    }
}

impl FileStore for S3Files {
    fn name(&self) -> &'static str {
        "s3"
    }

    fn writer(&self, id: &str) -> io::Result<Box<dyn ObjectWriter>> {
        Ok(Box::new(S3Writer {
            bucket: self.bucket.clone(),
            handle: self.handle.clone(),
            key: Self::key_of(id)?,
            buf: Vec::new(),
            upload: None,
            done: false,
        }))
    }

    fn read_at(&self, id: &str, offset: u64, len: usize) -> io::Result<Vec<u8>> {
        let key = Self::key_of(id)?;
        let bucket = self.bucket.clone();
        let range = offset..offset.saturating_add(len as u64);
        let bytes = self
            .handle
            .block_on(async move { bucket.get_range(&key, range).await })
            .map_err(io_err)?;
        Ok(bytes.to_vec())
    }

    fn delete(&self, id: &str) -> io::Result<()> {
        let key = Self::key_of(id)?;
        let bucket = self.bucket.clone();
        match self
            .handle
            .block_on(async move { bucket.delete(&key).await })
        {
            Err(object_store::Error::NotFound { .. }) | Ok(()) => Ok(()),
            Err(e) => Err(io_err(e)),
        }
    }
}

/// One object on its way up: bytes gather in `buf` until a part is full; the
/// first full part starts the multipart upload.
struct S3Writer {
    bucket: Arc<AmazonS3>,
    handle: Handle,
    key: ObjectPath,
    buf: Vec<u8>,
    upload: Option<Box<dyn MultipartUpload>>,
    /// Committed: nothing to abort on drop.
    done: bool,
}

impl S3Writer {
    /// Sends `buf` as the next part (starting the upload if needed).
    fn send_part(&mut self) -> io::Result<()> {
        let part = PutPayload::from(std::mem::take(&mut self.buf));
        let (bucket, key) = (self.bucket.clone(), self.key.clone());
        let upload = self.upload.take();
        let sent = self.handle.block_on(async move {
            let mut up = match upload {
                Some(up) => up,
                None => bucket.put_multipart(&key).await?,
            };
            match up.put_part(part).await {
                Ok(()) => Ok(up),
                Err(e) => {
                    let _ = up.abort().await;
                    Err(e)
                }
            }
        });
        self.upload = Some(sent.map_err(io_err)?);
        Ok(())
    }
}

impl ObjectWriter for S3Writer {
    fn write(&mut self, mut bytes: &[u8]) -> io::Result<()> {
        while !bytes.is_empty() {
            // A full part goes only once more follows: the last part may be the
            // short one, and a one-part object stays a single PUT.
            if self.buf.len() == PART_BYTES {
                self.send_part()?;
            }
            let take = (PART_BYTES - self.buf.len()).min(bytes.len());
            self.buf.extend_from_slice(&bytes[..take]);
            bytes = &bytes[take..];
        }
        Ok(())
    }

    fn commit(mut self: Box<Self>) -> io::Result<()> {
        let (bucket, key) = (self.bucket.clone(), self.key.clone());
        let rest = PutPayload::from(std::mem::take(&mut self.buf));
        let upload = self.upload.take();
        self.handle
            .block_on(async move {
                let Some(mut up) = upload else {
                    return bucket.put(&key, rest).await.map(drop);
                };
                let sent = match rest.content_length() {
                    0 => Ok(()),
                    _ => up.put_part(rest).await,
                };
                let done = match sent {
                    Ok(()) => up.complete().await.map(drop),
                    Err(e) => Err(e),
                };
                if done.is_err() {
                    let _ = up.abort().await;
                }
                done
            })
            .map_err(io_err)?;
        self.done = true;
        Ok(())
    }
}

impl Drop for S3Writer {
    /// An upload given up: its parts are discarded (S3 keeps and bills
    /// unfinished multipart uploads until aborted). Runs on a blocking thread,
    /// as every [`FileStore`] call does.
    fn drop(&mut self) {
        if self.done {
            return;
        }
        if let Some(mut up) = self.upload.take() {
            if let Err(e) = self.handle.block_on(async move { up.abort().await }) {
                tracing::warn!(error = %e, "an abandoned multipart upload could not be aborted");
            }
        }
    }
}
