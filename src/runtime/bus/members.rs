//! Who the live nodes are, from their heartbeats, and which node owns a user.
//!
//! Pure: no I/O and no clock of its own (callers pass `now_ms`), so every rule is
//! unit-tested. The view may lag the truth by up to the member timeout; it only
//! decides where requests go, never who may write (the store's fence does that).

use std::collections::HashMap;
use std::sync::Arc;

/// At most this many members are remembered: a bus shared with a misconfigured
/// fleet must not grow a node's memory without bound.
pub const MEMBERS_MAX: usize = 1024;

/// One heartbeat as sent on `{prefix}.members`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Heartbeat {
    pub node: String,
    /// The node is stopping: forget it now instead of after the timeout.
    #[serde(default)]
    pub leaving: bool,
    /// The sender just started and asks every node for a heartbeat at once.
    #[serde(default)]
    pub sync: bool,
}

/// The live members other than this node, as this node sees them.
pub struct Members {
    me: Arc<str>,
    timeout_ms: i64,
    last_seen_ms: HashMap<Arc<str>, i64>,
}

impl Members {
    pub fn new(me: Arc<str>, timeout_ms: i64) -> Members {
        assert!(timeout_ms > 0, "a member timeout must be positive");
        Members {
            me,
            timeout_ms,
            last_seen_ms: HashMap::new(),
        }
    }

    /// Notes a heartbeat; returns whether the node was not live before (a join).
    pub fn heard(&mut self, beat: &Heartbeat, now_ms: i64) -> bool {
        if *beat.node == *self.me {
            return false;
        }
        if beat.leaving {
            self.last_seen_ms.remove(beat.node.as_str());
            return false;
        }
        let was_live = self.is_live(&beat.node, now_ms);
        if !self.last_seen_ms.contains_key(beat.node.as_str()) {
            self.forget_dead(now_ms);
            if self.last_seen_ms.len() >= MEMBERS_MAX {
                return false;
            }
        }
        self.last_seen_ms.insert(beat.node.as_str().into(), now_ms);
        !was_live
    }

    fn is_live(&self, node: &str, now_ms: i64) -> bool {
        self.last_seen_ms
            .get(node)
            .is_some_and(|seen| now_ms - seen < self.timeout_ms)
    }

    /// Drops members silent past the timeout.
    pub fn forget_dead(&mut self, now_ms: i64) {
        let timeout_ms = self.timeout_ms;
        self.last_seen_ms
            .retain(|_, seen| now_ms - *seen < timeout_ms);
    }

    /// The other live nodes, sorted.
    pub fn others(&self, now_ms: i64) -> Vec<Arc<str>> {
        let mut live: Vec<Arc<str>> = self
            .last_seen_ms
            .iter()
            .filter(|(_, seen)| now_ms - **seen < self.timeout_ms)
            .map(|(node, _)| node.clone())
            .collect();
        live.sort();
        live
    }

    /// The node that owns `user` among the live members and this one: the highest
    /// rendezvous score, so a join or a leave moves only the users it gains or loses.
    pub fn owner(&self, user: &str, now_ms: i64) -> Arc<str> {
        let mut best = (score(&self.me, user), self.me.clone());
        for node in self.others(now_ms) {
            let s = score(&node, user);
            if s > best.0 {
                best = (s, node);
            }
        }
        best.1
    }
}

/// The node of `nodes` that owns `user` when they are the live members: what
/// every node with that view computes (for tools and tests that pick users of a
/// given node; `None` for no nodes).
pub fn owner_among<'a>(nodes: &[&'a str], user: &str) -> Option<&'a str> {
    nodes.iter().copied().max_by_key(|n| score(n, user))
}

/// FNV-1a over `node`, a separator and `user`, then a 64-bit mix (FNV alone
/// correlates the scores of similar node names).
fn score(node: &str, user: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in node.bytes().chain([0xff]).chain(user.bytes()) {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    // splitmix64's finaliser.
    h = (h ^ (h >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h = (h ^ (h >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn beat(node: &str) -> Heartbeat {
        Heartbeat {
            node: node.into(),
            leaving: false,
            sync: false,
        }
    }

    #[test]
    fn members_live_until_the_timeout_or_their_leave() {
        let mut m = Members::new("a".into(), 3000);
        assert!(m.heard(&beat("b"), 0), "a first heartbeat is a join");
        assert!(!m.heard(&beat("b"), 1000), "a second one is not");
        assert!(
            !m.heard(&beat("a"), 1000),
            "this node is never its own member"
        );
        assert!(m.heard(&beat("c"), 2000));
        assert_eq!(m.others(3999), vec![Arc::from("b"), Arc::from("c")]);
        assert_eq!(m.others(4000), vec![Arc::from("c")], "b fell silent");
        assert!(m.heard(&beat("b"), 4000), "coming back is a join again");
        m.heard(
            &Heartbeat {
                leaving: true,
                ..beat("c")
            },
            4001,
        );
        assert_eq!(m.others(4001), vec![Arc::from("b")], "c left at once");
    }

    #[test]
    fn owner_among_a_fixed_view_is_the_owner_each_member_computes() {
        let mut view = Members::new("a".into(), 3000);
        view.heard(&beat("b"), 0);
        view.heard(&beat("c"), 0);
        for i in 0..100 {
            let user = format!("user-{i}");
            let owner = owner_among(&["c", "a", "b"], &user);
            assert_eq!(owner, Some(&*view.owner(&user, 1)));
        }
        assert_eq!(owner_among(&[], "u"), None);
    }

    #[test]
    fn ownership_is_agreed_and_moves_only_with_the_member_that_changes() {
        let view = |me: &str, others: &[&str]| {
            let mut m = Members::new(me.into(), 3000);
            for o in others {
                m.heard(&beat(o), 0);
            }
            m
        };
        let (a, b) = (view("a", &["b", "c"]), view("b", &["a", "c"]));
        let without_c = view("a", &["b"]);
        let (mut moved, mut per_node) = (0, HashMap::<Arc<str>, usize>::new());
        for i in 0..3000 {
            let user = format!("user-{i}");
            let owner = a.owner(&user, 1);
            assert_eq!(owner, b.owner(&user, 1), "two nodes with one view agree");
            *per_node.entry(owner.clone()).or_default() += 1;
            if owner.as_ref() != "c" {
                assert_eq!(owner, without_c.owner(&user, 1), "only c's users move");
            } else {
                moved += 1;
            }
        }
        assert!(per_node.values().all(|&n| n > 800), "{per_node:?}");
        assert_eq!(moved, per_node[&Arc::from("c")]);
    }

    #[test]
    fn the_member_table_is_bounded() {
        let mut m = Members::new("me".into(), 3000);
        for i in 0..MEMBERS_MAX + 10 {
            m.heard(&beat(&format!("n{i}")), 0);
        }
        assert_eq!(m.others(0).len(), MEMBERS_MAX);
        // Dead ones make room.
        assert!(m.heard(&beat("late"), 5000));
        assert_eq!(m.others(5000), vec![Arc::from("late")]);
    }
}
