//! The agent's half of the TLS fast path (`--tls-fast-path=on`; docs/design.md, "The TLS fast
//! path", "Verified destinations"): which destinations count as verified, for which rule
//! sets, until when.
//!
//! What DNS said is kept by name: `(name, port, address) → valid until`, learned from every TLS
//! connection the proxy allowed and verified (`--domain-destination verify|resolve`), and
//! pre-warmed by resolving the exact names of the active policies' `tls` Domain matches. It is
//! projected onto rule sets: a destination is verified for every rule set whose table at that
//! port allows the name. The projection is written into `VERIFIED` for the active plan as
//! destinations are learned, and for each new plan before its generation flips (so a policy
//! change keeps exactly what the new policy still allows; the old generation's entries are
//! removed with it).
//!
//! Lifetimes: an entry lives as long as the DNS answer it came from, but at least
//! [`TTL_FLOOR`] (a name with a zero or tiny TTL would otherwise never be direct) and at most
//! [`TTL_CEILING`]; an expired entry sends the next connection to the proxy, which learns it
//! again. A name that moves is followed within those bounds.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use aya::maps::{HashMap, MapData};
use passthrough_common::{VerifiedKey, VerifiedValue};
use passthrough_policy::{plan::KernelPlan, sni_plan::FastPathTables as Tables};
use passthrough_proxy::{Destinations, report::FastPathLearner};
use tracing::{debug, warn};

use crate::events::monotonic_ns;

/// Shortest life of a verified destination, whatever its DNS TTL.
pub const TTL_FLOOR: Duration = Duration::from_secs(5);
/// Longest life of a verified destination, whatever its DNS TTL.
pub const TTL_CEILING: Duration = Duration::from_secs(300);
/// How often the pre-warmer looks for names to resolve again.
const PREWARM_EVERY: Duration = Duration::from_secs(1);

struct Inner {
    map: HashMap<MapData, VerifiedKey, VerifiedValue>,
    /// What DNS said: `(name, destination)` → valid until.
    dests: BTreeMap<(Arc<str>, SocketAddr), Instant>,
    /// The active plan's tables.
    active: Tables,
    /// What was written for the active plan (to skip rewriting an entry that is current).
    written: std::collections::HashMap<VerifiedKey, u64>,
}

/// The fast path's verified destinations (see the module doc). Shared by the proxy (learning)
/// and the agent's main thread (policy changes).
pub struct FastPath {
    inner: Mutex<Inner>,
    /// Wakes the pre-warmer when a new plan becomes active (its names are due at once).
    wake: tokio::sync::Notify,
}

/// The kernel expiry of an answer valid until `until`, bounded by the floor and the ceiling.
fn expiry_ns(until: Instant, now: Instant, now_ns: u64) -> u64 {
    let life = until
        .saturating_duration_since(now)
        .clamp(TTL_FLOOR, TTL_CEILING);
    now_ns + life.as_nanos() as u64
}

impl FastPath {
    /// A fast path writing `VERIFIED` through `map` (a handle of its own, see
    /// `Kernel::verified_map`).
    pub fn new(map: HashMap<MapData, VerifiedKey, VerifiedValue>) -> Self {
        FastPath {
            inner: Mutex::new(Inner {
                map,
                dests: BTreeMap::new(),
                active: Tables::default(),
                written: std::collections::HashMap::new(),
            }),
            wake: tokio::sync::Notify::new(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The `VERIFIED` entries of `plan`'s rule sets, from what is known now: write them with
    /// the plan (`Kernel::apply_with_verified`), before its generation flips.
    pub fn project(&self, plan: &KernelPlan) -> Vec<(VerifiedKey, u64)> {
        let tables = Tables::of(plan);
        let (now, now_ns) = (Instant::now(), monotonic_ns());
        let mut inner = self.lock();
        inner.dests.retain(|_, until| *until > now);
        let mut out = Vec::new();
        for ((name, dst), until) in &inner.dests {
            let exp = expiry_ns(*until, now, now_ns);
            out.extend(tables.keys(name, *dst).map(|k| (k, exp)));
        }
        out
    }

    /// After the flip to `plan`: learn into its rule sets from now on.
    pub fn activate(&self, plan: &KernelPlan, written: &[(VerifiedKey, u64)]) {
        let mut inner = self.lock();
        inner.active = Tables::of(plan);
        inner.written = written.iter().copied().collect();
        drop(inner);
        self.wake.notify_one();
    }

    /// How many destinations are known (learned or pre-warmed, not yet expired).
    pub fn len(&self) -> usize {
        let now = Instant::now();
        self.lock().dests.values().filter(|u| **u > now).count()
    }

    /// Whether none is.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Records that `dst` is an address of `name` until `until` and writes it for the active
    /// plan's rule sets that allow `name` at that port.
    pub fn learn(&self, name: &str, dst: SocketAddr, until: Instant) {
        let (now, now_ns) = (Instant::now(), monotonic_ns());
        if until <= now {
            return;
        }
        let dst = SocketAddr::new(dst.ip().to_canonical(), dst.port());
        let mut inner = self.lock();
        let key = (Arc::<str>::from(name), dst);
        match inner.dests.get_mut(&key) {
            Some(u) if *u >= until => {}
            Some(u) => *u = until,
            None => {
                inner.dests.insert(key, until);
            }
        }
        let exp = expiry_ns(until, now, now_ns);
        let keys: Vec<VerifiedKey> = inner.active.keys(name, dst).collect();
        for k in keys {
            // Rewrite only when the kernel's entry would expire noticeably earlier.
            if inner
                .written
                .get(&k)
                .is_some_and(|w| *w + 1_000_000_000 >= exp)
            {
                continue;
            }
            match inner.map.insert(k, VerifiedValue { expires_ns: exp }, 0) {
                Ok(()) => {
                    inner.written.insert(k, exp);
                }
                Err(e) => warn!(error = %e, "TLS fast path: cannot write a verified destination"),
            }
        }
    }

    /// The exact names of the active plan's `tls` matches whose answers end within
    /// `margin` (or are unknown), with their ports: what the pre-warmer resolves next.
    fn due(&self, margin: Duration) -> Vec<(Arc<str>, u16)> {
        let now = Instant::now();
        let inner = self.lock();
        inner
            .active
            .exact_names()
            .into_iter()
            .filter(|(name, port)| {
                !inner
                    .dests
                    .iter()
                    .any(|((n, d), u)| n == name && d.port() == *port && *u > now + margin)
            })
            .collect()
    }

    /// Pre-warms until cancelled: resolves the exact names of the active policies' `tls`
    /// Domain matches with the proxy's resolver (and answer cache), before their answers end.
    pub async fn prewarm(&self, dest: &Destinations, stop: tokio_util::sync::CancellationToken) {
        loop {
            for (name, port) in self.due(PREWARM_EVERY * 2) {
                match dest.resolve(&name).await {
                    Ok(Some((ips, until))) => {
                        for ip in ips.iter() {
                            self.learn(&name, SocketAddr::new(*ip, port), until);
                        }
                    }
                    Ok(None) => return, // --domain-destination original: nothing is verified
                    Err(e) => debug!(name = %name, error = %e, "TLS fast path: pre-warming"),
                }
            }
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(PREWARM_EVERY) => {}
                _ = self.wake.notified() => {}
            }
        }
    }
}

impl FastPathLearner for FastPath {
    fn verified(&self, name: &str, dst: SocketAddr, valid_until: Instant) {
        self.learn(name, dst, valid_until);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lifetimes_are_bounded() {
        let now = Instant::now();
        assert_eq!(expiry_ns(now, now, 0), TTL_FLOOR.as_nanos() as u64);
        assert_eq!(
            expiry_ns(now + Duration::from_secs(60), now, 7),
            7 + 60_000_000_000
        );
        assert_eq!(
            expiry_ns(now + Duration::from_secs(86_400), now, 0),
            TTL_CEILING.as_nanos() as u64
        );
    }
}
