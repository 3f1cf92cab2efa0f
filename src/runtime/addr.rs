//! Per-client-address limits of the front door: how many connections one client
//! address holds at once (those still in their handshake included), and how many
//! new connections it opens per second. Both are exact for the whole process.
//!
//! Where the state lives. The kernel spreads one address's connections over the
//! cores (SO_REUSEPORT hashes the 4-tuple, source port included), and after the
//! handshake each connection moves to its user's core. A per-core count could
//! therefore only enforce a share of the limit (`limit / cores`): an address with
//! fewer connections than its limit would be refused whenever the hash, or its
//! users, put more than a share on one core (with a limit of 10 on 16 cores,
//! five connections collide on some core half the time), and one user's several
//! connections, which all live on that user's core, would count against one
//! share. Instead each address has a home core (a hash of the address) that alone
//! keeps its count and its token bucket, plain data without locks. A connection
//! accepted elsewhere asks the home core through a per-core queue and waits for
//! the answer (one cross-core round trip per connection, the same kind of hop a
//! handover already makes; none when this core is the home); its close sends a
//! release there. Connections from the same address on the home core see earlier
//! releases first (the queue is drained before a local decision), so a client that
//! saw its connection close finds the slot free.
//!
//! The client address is the TCP peer, or, when the peer is one of
//! `trusted_proxies`, the right-most address of `X-Forwarded-For` that is not a
//! trusted proxy itself (what the nearest untrusted hop told the first trusted
//! one; everything left of it could be forged). IPv6 clients count per /64, the
//! block one subscriber usually gets, so rotating addresses within it gains
//! nothing.

use std::cell::RefCell;
use std::collections::HashMap;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::rc::Rc;
use std::sync::Arc;

use monoio::time::Instant;

use crate::clock::now_ms;
use crate::config::{Cidr, Config};
use crate::limiter::Limiter;
use crate::runtime::gate::Gate;

/// Rate-limit buckets one core keeps for the addresses it is home to. At the cap,
/// full buckets (idle addresses) go first, then the least recently used; an
/// evicted address only gets a fresh burst. About 40 bytes each.
pub const ADDR_BUCKETS_MAX: usize = 65_536;

/// A client address as the limits count it: an IPv4 address or an IPv6 /64.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AddrKey {
    V4(u32),
    V6(u64),
}

impl AddrKey {
    pub fn of(ip: IpAddr) -> AddrKey {
        match ip.to_canonical() {
            IpAddr::V4(v4) => AddrKey::V4(u32::from(v4)),
            IpAddr::V6(v6) => AddrKey::V6((u128::from(v6) >> 64) as u64),
        }
    }

    /// The core that keeps this address's count and bucket.
    pub fn home(self, cores: usize) -> usize {
        let bits = match self {
            AddrKey::V4(a) => u64::from(a),
            AddrKey::V6(p) => p ^ (p >> 32) ^ 0x9e37_79b9,
        };
        // Multiplicative hashing: neighbouring addresses land on different cores.
        let h = bits.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 32;
        (h % cores.max(1) as u64) as usize
    }
}

impl fmt::Display for AddrKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            AddrKey::V4(a) => write!(f, "{}", Ipv4Addr::from(a)),
            AddrKey::V6(p) => write!(f, "{}/64", Ipv6Addr::from(u128::from(p) << 64)),
        }
    }
}

/// Why an address was turned away.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// It holds this many connections already (the limit).
    Full(u32),
    /// It opens connections too fast; a token comes in this many milliseconds.
    Rate(u64),
    /// The server is shutting down.
    ShuttingDown,
    /// The home core did not answer in time (it is overloaded or stopping).
    Busy,
}

/// The count and the bucket of every address a core is home to. No I/O, no clock.
pub struct AddrTable {
    conns_max: u32,
    /// Open connections per address; an entry exists only while its count is > 0,
    /// so this map is bounded by the connections the process holds.
    open: HashMap<AddrKey, u32>,
    rate: Limiter<AddrKey>,
}

impl AddrTable {
    pub fn new(conns_max: u32, per_second: u32, buckets_max: usize) -> AddrTable {
        let per_minute = per_second.saturating_mul(60);
        AddrTable {
            conns_max,
            open: HashMap::new(),
            rate: Limiter::with_burst(per_second, per_minute, buckets_max),
        }
    }

    /// Takes a token (every attempt costs one, refused or not), then a slot.
    pub fn acquire(&mut self, key: AddrKey, now_ms: i64) -> Result<(), Refused> {
        self.rate.check(&key, now_ms).map_err(Refused::Rate)?;
        let n = self.open.entry(key).or_insert(0);
        if *n >= self.conns_max {
            return Err(Refused::Full(self.conns_max));
        }
        *n += 1;
        Ok(())
    }

    pub fn release(&mut self, key: AddrKey) {
        if let Some(n) = self.open.get_mut(&key) {
            *n -= 1;
            if *n == 0 {
                self.open.remove(&key);
            }
        }
    }

    /// Connections `key` holds.
    pub fn open(&self, key: AddrKey) -> u32 {
        self.open.get(&key).copied().unwrap_or(0)
    }

    /// Addresses with open connections, and addresses with a bucket.
    pub fn sizes(&self) -> (usize, usize) {
        (self.open.len(), self.rate.len())
    }
}

/// What one core asks of an address's home core.
pub enum AddrMsg {
    Acquire {
        key: AddrKey,
        reply: tokio::sync::oneshot::Sender<Result<(), Refused>>,
    },
    Release(AddrKey),
}

/// The queues into every core's address table; one set per process, `Send`.
///
/// Unbounded in type, bounded in fact: an `Acquire` waits for its answer, so each
/// handshake has at most one in a queue, and a `Release` exists only for a slot
/// its home core granted, at most one per connection the process holds. A bounded
/// queue could instead lose a release when full, and a lost release would refuse
/// that address for good.
#[derive(Clone)]
pub struct AddrMesh {
    senders: Arc<[async_channel::Sender<AddrMsg>]>,
    inboxes: Arc<[async_channel::Receiver<AddrMsg>]>,
}

impl AddrMesh {
    pub fn new(cores: usize) -> AddrMesh {
        let (senders, inboxes): (Vec<_>, Vec<_>) =
            (0..cores).map(|_| async_channel::unbounded()).unzip();
        AddrMesh {
            senders: senders.into(),
            inboxes: inboxes.into(),
        }
    }
}

/// One core's side of the limits: the table of the addresses it is home to, and
/// the way to reach the others'.
pub struct AddrLimits {
    core: usize,
    trusted: Vec<Cidr>,
    table: RefCell<AddrTable>,
    senders: Arc<[async_channel::Sender<AddrMsg>]>,
    inbox: async_channel::Receiver<AddrMsg>,
    /// Closed when the core stops: [`AddrLimits::serve`] returns.
    stop: Gate,
}

impl AddrLimits {
    pub fn new(core: usize, cfg: &Config, mesh: &AddrMesh) -> Rc<AddrLimits> {
        Rc::new(AddrLimits {
            core,
            trusted: cfg.trusted_proxies.clone(),
            table: RefCell::new(AddrTable::new(
                cfg.connections_per_address_max,
                cfg.handshakes_per_address_per_second,
                ADDR_BUCKETS_MAX,
            )),
            senders: mesh.senders.clone(),
            inbox: mesh.inboxes[core].clone(),
            stop: Gate::default(),
        })
    }

    /// True if `peer` is a configured proxy, whose clients are named in the head.
    pub fn trusts(&self, peer: IpAddr) -> bool {
        self.trusted.iter().any(|c| c.contains(peer))
    }

    /// The client behind `peer` (see the module documentation).
    pub fn client(&self, peer: IpAddr, forwarded_for: Option<&str>) -> IpAddr {
        client_addr(peer, forwarded_for, &self.trusted)
    }

    /// Counts a new connection of `ip` against its limits, on its home core. Waits
    /// at most until `deadline` (then `Busy`) or until shutdown begins.
    pub async fn acquire(
        self: &Rc<Self>,
        ip: IpAddr,
        gate: &Gate,
        deadline: Instant,
    ) -> Result<Slot, Refused> {
        let key = AddrKey::of(ip);
        let home = key.home(self.senders.len());
        if home == self.core {
            self.drain();
            self.table.borrow_mut().acquire(key, now_ms())?;
            return Ok(self.slot(key));
        }
        let (reply, answer) = tokio::sync::oneshot::channel();
        if self.senders[home]
            .try_send(AddrMsg::Acquire { key, reply })
            .is_err()
        {
            return Err(Refused::Busy);
        }
        // Given up on (deadline, shutdown), a granted slot is released by the home
        // core when it cannot deliver the answer; one granted in the instant between
        // is lost only while the process stops or is overloaded past the deadline.
        monoio::select! {
            r = answer => r.map_err(|_| Refused::Busy)??,
            _ = monoio::time::sleep_until(deadline) => return Err(Refused::Busy),
            _ = gate.stopped() => return Err(Refused::ShuttingDown),
        }
        Ok(self.slot(key))
    }

    fn slot(self: &Rc<Self>, key: AddrKey) -> Slot {
        Slot {
            key,
            limits: Some(self.clone()),
        }
    }

    fn release(&self, key: AddrKey) {
        let home = key.home(self.senders.len());
        if home != self.core {
            // Fails only once the home core has stopped, when counts no longer matter.
            let _ = self.senders[home].try_send(AddrMsg::Release(key));
            return;
        }
        match self.table.try_borrow_mut() {
            Ok(mut t) => t.release(key),
            // Only if a panic unwound while the table was borrowed.
            Err(_) => tracing::error!(addr = %key, "address table busy; release lost"),
        }
    }

    /// Serves the other cores' requests for the addresses this core is home to,
    /// until [`AddrLimits::stop`].
    ///
    /// The core must await this task before its runtime goes. monoio leaves a
    /// pending task to its wakers when the runtime is dropped, and this queue
    /// outlives the core: a release sent later by a core still draining would wake
    /// that waker from the sender's thread, free the orphaned task there (dropping
    /// `!Send` state on the wrong thread), and deadlock on the queue's lock, which
    /// the notifying sender holds. Seen once as a hang of `tests/shutdown.rs`
    /// (a `gdb` stack showed exactly that); `tests/address_limits.rs` keeps the
    /// scenario.
    pub async fn serve(self: Rc<Self>) {
        loop {
            monoio::select! {
                msg = self.inbox.recv() => match msg {
                    Ok(msg) => self.handle(msg),
                    Err(_) => return,
                },
                _ = self.stop.closed() => return,
            }
        }
    }

    /// Ends [`AddrLimits::serve`]. Later messages stay queued, unread: once the
    /// core has stopped, counts no longer matter.
    pub fn stop(&self) {
        self.stop.close();
    }

    /// Handles what is queued now, so a local decision sees every release sent
    /// before it.
    fn drain(&self) {
        while let Ok(msg) = self.inbox.try_recv() {
            self.handle(msg);
        }
    }

    fn handle(&self, msg: AddrMsg) {
        let mut table = self.table.borrow_mut();
        match msg {
            AddrMsg::Release(key) => table.release(key),
            AddrMsg::Acquire { key, reply } => {
                let verdict = table.acquire(key, now_ms());
                if reply.send(verdict).is_err() && verdict.is_ok() {
                    // The asker gave up (deadline, shutdown): undo the grant.
                    table.release(key);
                }
            }
        }
    }

    /// This core's table, for tests and metrics: (addresses with open connections,
    /// addresses with a bucket).
    pub fn sizes(&self) -> (usize, usize) {
        self.table.borrow().sizes()
    }
}

/// One connection counted against its address, released when dropped (also when
/// its task panics). Lives in the connection's registration, so it is released
/// before the connection's FIN.
pub struct Slot {
    key: AddrKey,
    /// `None` once turned into a [`Claim`].
    limits: Option<Rc<AddrLimits>>,
}

impl Slot {
    /// The `Send` form, for a connection handed over to another core.
    pub fn into_claim(mut self) -> Claim {
        self.limits = None;
        Claim { key: self.key }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        if let Some(limits) = self.limits.take() {
            limits.release(self.key);
        }
    }
}

/// A [`Slot`] in transit between cores; the receiving core adopts it at once.
#[derive(Debug)]
pub struct Claim {
    key: AddrKey,
}

impl Claim {
    pub fn adopt(self, limits: &Rc<AddrLimits>) -> Slot {
        limits.slot(self.key)
    }
}

/// The client address: `peer`, or when `peer` is trusted, the right-most entry of
/// `forwarded_for` that is not trusted. An entry that is no address stops the
/// walk at the last trusted hop (counting that proxy is safer than trusting
/// garbage); when every entry is trusted, the left-most one.
pub fn client_addr(peer: IpAddr, forwarded_for: Option<&str>, trusted: &[Cidr]) -> IpAddr {
    let is_trusted = |ip: IpAddr| trusted.iter().any(|c| c.contains(ip));
    if !is_trusted(peer) {
        return peer;
    }
    let mut nearest = peer;
    for entry in forwarded_for.unwrap_or("").rsplit(',') {
        let entry = entry.trim();
        if entry.is_empty() {
            continue;
        }
        let Some(ip) = parse_entry(entry) else {
            return nearest;
        };
        if !is_trusted(ip) {
            return ip;
        }
        nearest = ip;
    }
    nearest
}

/// `192.0.2.1`, `2001:db8::1`, or either with a port (`192.0.2.1:80`, `[2001:db8::1]:80`).
fn parse_entry(entry: &str) -> Option<IpAddr> {
    entry
        .parse::<IpAddr>()
        .ok()
        .or_else(|| entry.parse::<SocketAddr>().ok().map(|s| s.ip()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn cidrs(list: &[&str]) -> Vec<Cidr> {
        list.iter().map(|c| c.parse().unwrap()).collect()
    }

    #[test]
    fn forwarded_for_is_believed_only_from_trusted_proxies() {
        let trusted = cidrs(&["10.0.0.0/8", "127.0.0.1"]);
        let xff = Some("198.51.100.9, 203.0.113.5, 10.1.1.1");
        // From an untrusted peer, the header is the client's own say: ignored.
        assert_eq!(client_addr(ip("192.0.2.7"), xff, &trusted), ip("192.0.2.7"));
        // From a trusted one: skip trusted hops from the right; the first other is
        // the client, whatever was forged further left.
        assert_eq!(
            client_addr(ip("127.0.0.1"), xff, &trusted),
            ip("203.0.113.5")
        );
        assert_eq!(
            client_addr(ip("127.0.0.1"), None, &trusted),
            ip("127.0.0.1")
        );
        assert_eq!(
            client_addr(ip("10.0.0.2"), Some("10.0.0.3 , 10.0.0.4"), &trusted),
            ip("10.0.0.3"),
            "all trusted: the left-most"
        );
        assert_eq!(
            client_addr(
                ip("10.0.0.2"),
                Some("203.0.113.5, unknown, 10.0.0.4"),
                &trusted
            ),
            ip("10.0.0.4"),
            "garbage stops the walk at the last trusted hop"
        );
        assert_eq!(
            client_addr(ip("10.0.0.2"), Some("[2001:db8::1]:443"), &trusted),
            ip("2001:db8::1")
        );
        assert_eq!(
            client_addr(ip("10.0.0.2"), Some("192.0.2.1:8080"), &trusted),
            ip("192.0.2.1")
        );
        assert_eq!(client_addr(ip("10.0.0.2"), xff, &[]), ip("10.0.0.2"));
    }

    #[test]
    fn keys_group_ipv6_by_64_and_spread_over_cores() {
        assert_eq!(
            AddrKey::of(ip("2001:db8:1:2:aaaa::1")),
            AddrKey::of(ip("2001:db8:1:2:bbbb::2"))
        );
        assert_ne!(
            AddrKey::of(ip("2001:db8:1:2::1")),
            AddrKey::of(ip("2001:db8:1:3::1"))
        );
        assert_eq!(
            AddrKey::of(ip("::ffff:192.0.2.1")),
            AddrKey::of(ip("192.0.2.1"))
        );
        assert_eq!(
            AddrKey::of(ip("2001:db8:1:2::1")).to_string(),
            "2001:db8:1:2::/64"
        );
        let mut per_core = [0; 4];
        for i in 0..1000u32 {
            per_core[AddrKey::V4(0x7f00_0000 + i).home(4)] += 1;
        }
        assert!(per_core.iter().all(|&n| n > 150), "{per_core:?}");
        assert_eq!(AddrKey::of(ip("192.0.2.1")).home(1), 0);
    }

    #[test]
    fn the_table_counts_slots_and_tokens_per_address() {
        let (a, b) = (AddrKey::of(ip("192.0.2.1")), AddrKey::of(ip("192.0.2.2")));
        let mut t = AddrTable::new(2, 3, 100);
        t.acquire(a, 0).unwrap();
        t.acquire(a, 0).unwrap();
        assert_eq!(t.acquire(a, 0), Err(Refused::Full(2)));
        t.acquire(b, 0).unwrap();
        t.release(a);
        assert_eq!(t.open(a), 1);
        // Three tokens a second, burst three: the refused attempt cost one too.
        assert_eq!(t.acquire(a, 0), Err(Refused::Rate(334)));
        t.acquire(a, 334).unwrap();
        t.release(a);
        t.release(a);
        t.release(a);
        assert_eq!(t.sizes().0, 1, "only b still holds a connection");
    }

    #[test]
    fn bucket_state_stays_bounded_while_counts_follow_connections() {
        let mut t = AddrTable::new(10, 5, 64);
        for i in 0..10_000u32 {
            let k = AddrKey::V4(i);
            t.acquire(k, i64::from(i)).unwrap();
            t.release(k);
        }
        let (open, buckets) = t.sizes();
        assert_eq!(open, 0);
        assert!(buckets <= 64, "{buckets}");
    }
}
