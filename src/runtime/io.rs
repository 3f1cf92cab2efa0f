//! Readiness-driven socket I/O: monoio tells us when a socket is ready, and we
//! `recv`/`send` with `MSG_DONTWAIT` into buffers that exist only while bytes move.
//!
//! Why not monoio's owned-buffer reads: an io_uring read must own its buffer for as
//! long as it is pending, so every idle connection would pin a buffer. Waiting for
//! readiness (an io_uring poll, or epoll in the legacy driver) and then reading
//! without blocking keeps an idle connection free of read buffers, lets the WebSocket
//! codec read straight into its own buffer (no extra copy), and makes every wait safe
//! to cancel in `select!` (a cancelled poll consumes no data).

use std::future::Future;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::pin::Pin;
use std::task::{Context, Poll};

use monoio::net::TcpStream;

/// A connected TCP socket owned by one core.
pub struct Socket {
    stream: TcpStream,
}

impl Socket {
    pub fn new(stream: TcpStream) -> Socket {
        let _ = stream.set_nodelay(true);
        Socket { stream }
    }

    /// Adopts a socket handed over from another core.
    pub fn from_owned_fd(fd: OwnedFd) -> io::Result<Socket> {
        let std = std::net::TcpStream::from(fd);
        Ok(Socket::new(TcpStream::from_std(std)?))
    }

    /// Detaches the socket from this core's driver so another core can adopt it.
    ///
    /// The descriptor is duplicated and this core's copy dropped: monoio removes its
    /// own registration (epoll) on drop, and the duplicate is registered afresh by the
    /// adopting core. Callers must not have an I/O operation in flight on it.
    pub fn into_owned_fd(self) -> io::Result<OwnedFd> {
        // SAFETY: the descriptor is open for as long as `self.stream` lives.
        let dup = unsafe { libc::fcntl(self.fd(), libc::F_DUPFD_CLOEXEC, 0) };
        if dup < 0 {
            return Err(io::Error::last_os_error());
        }
        drop(self.stream);
        // SAFETY: `dup` is a fresh descriptor that nothing else owns.
        Ok(unsafe { OwnedFd::from_raw_fd(dup) })
    }

    /// The descriptor, for our own non-blocking syscalls (not kept in a field: every
    /// byte of a socket's struct is paid once per idle connection).
    fn fd(&self) -> RawFd {
        self.stream.as_raw_fd()
    }

    pub fn peer_addr(&self) -> io::Result<std::net::SocketAddr> {
        self.stream.peer_addr()
    }

    /// Resolves when bytes (or EOF, or an error) can be read without blocking.
    pub async fn readable(&self) -> io::Result<()> {
        self.stream.readable(false).await
    }

    /// Resolves when some bytes can be written without blocking.
    pub async fn writable(&self) -> io::Result<()> {
        self.stream.writable(false).await
    }

    /// One non-blocking `recv`; `WouldBlock` when nothing is buffered.
    pub fn try_recv(&self, buf: &mut [u8]) -> io::Result<usize> {
        // SAFETY: `buf` is valid for `buf.len()` writable bytes.
        let n = unsafe {
            libc::recv(
                self.fd(),
                buf.as_mut_ptr().cast(),
                buf.len(),
                libc::MSG_DONTWAIT,
            )
        };
        cvt(n)
    }

    /// One non-blocking `recv` of up to `max` bytes appended to `buf` (no zeroing).
    pub fn try_recv_into(&self, buf: &mut Vec<u8>, max: usize) -> io::Result<usize> {
        buf.reserve(max);
        let spare = buf.spare_capacity_mut();
        let want = spare.len().min(max);
        // SAFETY: `spare` is valid for `want` writable bytes; recv writes at most that.
        let n = unsafe {
            libc::recv(
                self.fd(),
                spare.as_mut_ptr().cast(),
                want,
                libc::MSG_DONTWAIT,
            )
        };
        let n = cvt(n)?;
        // SAFETY: the kernel initialised `n` bytes right after the old length.
        unsafe { buf.set_len(buf.len() + n) };
        Ok(n)
    }

    /// One non-blocking `send` (no SIGPIPE); `WouldBlock` when the send buffer is full.
    pub fn try_send(&self, buf: &[u8]) -> io::Result<usize> {
        // SAFETY: `buf` is valid for `buf.len()` readable bytes.
        let n = unsafe {
            libc::send(
                self.fd(),
                buf.as_ptr().cast(),
                buf.len(),
                libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
            )
        };
        cvt(n)
    }

    /// Sends all of `buf`, waiting for writability as needed.
    pub async fn send_all(&self, mut buf: &[u8]) -> io::Result<()> {
        while !buf.is_empty() {
            match self.try_send(buf) {
                Ok(n) => buf = &buf[n..],
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => self.writable().await?,
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Half-closes the write side so a final response is delivered before close.
    pub fn shutdown_write(&self) {
        // SAFETY: plain syscall on an fd we own.
        unsafe { libc::shutdown(self.fd(), libc::SHUT_WR) };
    }

    /// Ends the connection both ways now. Dropping the socket is not enough while
    /// a read is still in flight on it (io_uring holds the descriptor until the
    /// read completes, and a client waiting for the rest of a body never sends
    /// anything): the shutdown completes that read and tells the client.
    pub fn shutdown_both(&self) {
        // SAFETY: plain syscall on an fd we own.
        unsafe { libc::shutdown(self.fd(), libc::SHUT_RDWR) };
    }
}

fn cvt(n: isize) -> io::Result<usize> {
    if n < 0 {
        let e = io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::EINTR) {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        Err(e)
    } else {
        Ok(n as usize)
    }
}

type Wait = Pin<Box<dyn Future<Output = io::Result<()>>>>;

/// hyper's I/O traits over a [`Socket`], replaying bytes already read (the request
/// head that routing looked at) before reading from the socket.
pub struct HyperIo {
    /// Dropped when hyper shuts the connection down, before the FIN (declared
    /// first, so also before the socket closes if hyper never does).
    until_shutdown: Option<Box<dyn std::any::Any>>,
    sock: std::rc::Rc<Socket>,
    replay: bytes::Bytes,
    read_wait: Option<Wait>,
    write_wait: Option<Wait>,
}

impl HyperIo {
    pub fn new(sock: std::rc::Rc<Socket>, replay: Vec<u8>) -> Self {
        HyperIo {
            until_shutdown: None,
            sock,
            replay: replay.into(),
            read_wait: None,
            write_wait: None,
        }
    }

    /// Holds `guard` until the connection is shut down (a client address's slot,
    /// so that a client that saw the end finds it free).
    pub fn hold_until_shutdown(mut self, guard: Box<dyn std::any::Any>) -> Self {
        self.until_shutdown = Some(guard);
        self
    }
}

/// Polls a readiness wait stored in `slot`, creating it with `make` if needed.
fn poll_ready(
    slot: &mut Option<Wait>,
    cx: &mut Context<'_>,
    make: impl FnOnce() -> Wait,
) -> Poll<io::Result<()>> {
    let wait = slot.get_or_insert_with(make);
    let res = std::task::ready!(wait.as_mut().poll(cx));
    *slot = None;
    Poll::Ready(res)
}

impl hyper::rt::Read for HyperIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        mut buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.replay.is_empty() {
            let n = this.replay.len().min(buf.remaining());
            buf.put_slice(&this.replay.split_to(n));
            return Poll::Ready(Ok(()));
        }
        loop {
            // SAFETY: recv writes at most `dst.len()` bytes and we advance by what it wrote.
            let dst = unsafe { buf.as_mut() };
            let n = unsafe {
                libc::recv(
                    this.sock.fd(),
                    dst.as_mut_ptr().cast(),
                    dst.len(),
                    libc::MSG_DONTWAIT,
                )
            };
            match cvt(n) {
                Ok(n) => {
                    unsafe { buf.advance(n) };
                    return Poll::Ready(Ok(()));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    let sock = this.sock.clone();
                    std::task::ready!(poll_ready(&mut this.read_wait, cx, || Box::pin(
                        async move { sock.readable().await }
                    )))?;
                }
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }
}

impl hyper::rt::Write for HyperIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        loop {
            match this.sock.try_send(buf) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    let sock = this.sock.clone();
                    std::task::ready!(poll_ready(&mut this.write_wait, cx, || Box::pin(
                        async move { sock.writable().await }
                    )))?;
                }
                other => return Poll::Ready(other),
            }
        }
    }
    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        this.until_shutdown = None;
        this.sock.shutdown_write();
        Poll::Ready(Ok(()))
    }
}
