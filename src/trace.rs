//! Request ids an operator can follow: W3C trace context (`traceparent`).
//!
//! A WebSocket connection gets one trace id, the one of the `traceparent` its
//! upgrade carried when that is well formed, else a fresh one; each frame it
//! sends gets its own span id under it. The pair is the *current* context of
//! whatever runs for that frame: tasks spawned meanwhile inherit it ([`Traced`]
//! sets it around every poll, on a core or on the blocking pool), log lines carry
//! it as span fields (`trace_id`, `span_id`), and outbound requests (models,
//! webhooks) send it on as `traceparent`. So one user's problem is one grep for
//! the trace id.
//!
//! A thread-local is enough: a core runs one task at a time, and a pool thread
//! polls one future at a time; [`Traced`] restores what was there after each poll.

use std::cell::Cell;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

/// A trace id: 16 bytes, never all zero.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct TraceId([u8; 16]);

/// A span (parent) id: 8 bytes, never all zero.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct SpanId([u8; 8]);

fn nonzero<const N: usize>() -> [u8; N] {
    loop {
        let b: [u8; N] = rand::random();
        if b.iter().any(|&x| x != 0) {
            return b;
        }
    }
}

/// `2 * N` lowercase hex digits, not all zero (W3C: uppercase is invalid).
fn parse_hex<const N: usize>(s: &str) -> Option<[u8; N]> {
    let ok = s.len() == 2 * N && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
    let mut out = [0u8; N];
    hex::decode_to_slice(s, &mut out).ok().filter(|_| ok)?;
    out.iter().any(|&b| b != 0).then_some(out)
}

impl TraceId {
    pub fn new() -> TraceId {
        TraceId(nonzero())
    }
}

impl Default for TraceId {
    fn default() -> TraceId {
        TraceId::new()
    }
}

impl SpanId {
    pub fn new() -> SpanId {
        SpanId(nonzero())
    }
}

impl Default for SpanId {
    fn default() -> SpanId {
        SpanId::new()
    }
}

impl fmt::Display for TraceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl fmt::Debug for TraceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl fmt::Display for SpanId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl fmt::Debug for SpanId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl std::str::FromStr for TraceId {
    type Err = ();
    fn from_str(s: &str) -> Result<TraceId, ()> {
        parse_hex(s).map(TraceId).ok_or(())
    }
}

/// Where work stands in a trace: the trace, and the span doing the work.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TraceCtx {
    pub trace_id: TraceId,
    pub span_id: SpanId,
    /// The trace flags received (bit 0: sampled); ours are sampled.
    pub flags: u8,
}

impl TraceCtx {
    /// A new trace.
    pub fn new() -> TraceCtx {
        TraceCtx::within(TraceId::new())
    }

    /// A new span of trace `trace_id`.
    pub fn within(trace_id: TraceId) -> TraceCtx {
        TraceCtx {
            trace_id,
            span_id: SpanId::new(),
            flags: 1,
        }
    }

    /// A `traceparent` header value (W3C Trace Context, level 1). Invalid values
    /// are `None`, as are all-zero ids and version `ff`; a version above 00 may
    /// carry more fields after the flags, which are ignored.
    pub fn parse(value: &str) -> Option<TraceCtx> {
        let value = value.trim();
        let mut parts = value.split('-');
        let version = parts.next()?;
        let version = parse_hex::<1>(version)
            .map(|v| v[0])
            .or((version == "00").then_some(0))?;
        let (trace, span, flags) = (parts.next()?, parts.next()?, parts.next()?);
        if version == 0xff || (version == 0 && (value.len() != 55 || parts.next().is_some())) {
            return None;
        }
        let flags = u8::from_str_radix(flags, 16).ok().filter(|_| {
            flags.len() == 2
                && flags
                    .bytes()
                    .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
        })?;
        Some(TraceCtx {
            trace_id: TraceId(parse_hex(trace)?),
            span_id: SpanId(parse_hex(span)?),
            flags,
        })
    }

    /// The context of work done on behalf of this one: same trace, new span.
    pub fn child(&self) -> TraceCtx {
        TraceCtx {
            span_id: SpanId::new(),
            ..*self
        }
    }

    /// This context as a `traceparent` header value (version 00).
    pub fn traceparent(&self) -> String {
        format!("00-{}-{}-{:02x}", self.trace_id, self.span_id, self.flags)
    }
}

impl Default for TraceCtx {
    fn default() -> TraceCtx {
        TraceCtx::new()
    }
}

thread_local! {
    static CURRENT: Cell<Option<TraceCtx>> = const { Cell::new(None) };
}

/// The context of the work running now on this thread, if any.
pub fn current() -> Option<TraceCtx> {
    CURRENT.with(Cell::get)
}

/// Runs `f` with `ctx` as the current context, restoring the previous one after
/// (also when `f` unwinds).
pub fn scope<R>(ctx: Option<TraceCtx>, f: impl FnOnce() -> R) -> R {
    struct Restore(Option<TraceCtx>);
    impl Drop for Restore {
        fn drop(&mut self) {
            CURRENT.with(|c| c.set(self.0));
        }
    }
    let _restore = Restore(CURRENT.with(|c| c.replace(ctx)));
    f()
}

/// A future that runs with a trace context (and a tracing span) current while it
/// is polled, wherever that is.
pub struct Traced<F> {
    inner: F,
    ctx: Option<TraceCtx>,
    span: tracing::Span,
}

impl<F> Traced<F> {
    pub fn new(inner: F, ctx: Option<TraceCtx>, span: tracing::Span) -> Traced<F> {
        Traced { inner, ctx, span }
    }

    /// `inner` in the context and span current now (a task spawned from here).
    pub fn inherit(inner: F) -> Traced<F> {
        Traced::new(inner, current(), tracing::Span::current())
    }
}

impl<F: Future> Future for Traced<F> {
    type Output = F::Output;
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        // SAFETY: structural pinning of `inner`; it is never moved out. The other
        // fields are not pinned.
        let this = unsafe { self.get_unchecked_mut() };
        // SAFETY: `this` is pinned, so `inner` is too (see above).
        let inner = unsafe { Pin::new_unchecked(&mut this.inner) };
        let _entered = this.span.enter();
        scope(this.ctx, || inner.poll(cx))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn parses_the_w3c_example_and_writes_it_back() {
        let ctx = TraceCtx::parse(GOOD).unwrap();
        assert_eq!(ctx.trace_id.to_string(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(ctx.span_id.to_string(), "00f067aa0ba902b7");
        assert_eq!(ctx.traceparent(), GOOD);
        let child = ctx.child();
        assert_eq!(child.trace_id, ctx.trace_id);
        assert_ne!(child.span_id, ctx.span_id);
    }

    #[test]
    fn refuses_malformed_values() {
        for bad in [
            "",
            "00",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-1",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "zz-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0g",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-+1",
        ] {
            assert_eq!(TraceCtx::parse(bad), None, "{bad:?}");
        }
        // A later version may add fields.
        let later = "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-what-ever";
        assert!(TraceCtx::parse(later).is_some());
    }

    #[test]
    fn the_current_context_follows_scopes_and_polls() {
        assert_eq!(current(), None);
        let ctx = TraceCtx::new();
        scope(Some(ctx), || {
            assert_eq!(current(), Some(ctx));
            let inner = TraceCtx::new();
            scope(Some(inner), || assert_eq!(current(), Some(inner)));
            assert_eq!(current(), Some(ctx));
        });
        assert_eq!(current(), None);
        let fut = Traced::new(async { current() }, Some(ctx), tracing::Span::none());
        let seen = futures_util::FutureExt::now_or_never(fut).unwrap();
        assert_eq!(seen, Some(ctx));
        assert_eq!(current(), None);
    }
}
