//! Keyed batching bookkeeping for accumulator stages.
//!
//! Pure Rust: the worker maps each item's key to a slot id (through a Python dict, so
//! Python's own hash and equality decide what "the same key" means) and this module
//! decides when which batch is flushed:
//! * a key's batch is flushed when it reaches `max_size`;
//! * every `check_interval` items, if the items held over all keys exceed `max_all`, the
//!   largest batches are flushed until the total is at or under it;
//! * with `max_wait`, a batch is flushed once its oldest item has waited that long;
//! * at the end of the stream everything left is flushed, oldest batch first.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::time::{Duration, Instant};

/// Slots are small ids handed out in sequence; a multiplicative hash spreads them over the
/// table as well as the default SipHash does, for a fraction of its cost, which every item
/// of an accumulator pays.
#[derive(Default)]
struct SlotHasher(u64);

impl Hasher for SlotHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &byte in bytes {
            self.write_u64(self.0 ^ u64::from(byte));
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = n.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }
}

type BySlot<V> = HashMap<u64, V, BuildHasherDefault<SlotHasher>>;

/// A new batch reserves room for this many items at most (a `max_size` in the millions
/// must not reserve its whole size up front).
const BATCH_PREALLOCATION: usize = 1024;

pub struct Limits {
    pub max_size: usize,
    pub max_all: usize,
    pub check_interval: usize,
    pub max_wait: Option<Duration>,
}

pub struct Batch<K, T> {
    pub key: K,
    pub items: Vec<T>,
    first_at: Instant,
    seq: u64,
}

pub struct Batcher<K, T> {
    limits: Limits,
    open: BySlot<Batch<K, T>>,
    held: usize,
    since_check: usize,
    next_seq: u64,
}

impl<K, T> Batcher<K, T> {
    pub fn new(limits: Limits) -> Self {
        let limits = Limits {
            max_size: limits.max_size.max(1),
            check_interval: limits.check_interval.max(1),
            ..limits
        };
        Batcher {
            limits,
            open: BySlot::default(),
            held: 0,
            since_check: 0,
            next_seq: 0,
        }
    }

    /// Items held over all open batches.
    pub fn held(&self) -> usize {
        self.held
    }

    pub fn contains(&self, slot: u64) -> bool {
        self.open.contains_key(&slot)
    }

    /// Add one item to `slot`'s batch, opening it with `key` if needed (`key` is called only
    /// then). Returns the batches that must be flushed now, in flush order.
    pub fn push(
        &mut self,
        slot: u64,
        key: impl FnOnce() -> K,
        item: T,
        now: Instant,
    ) -> Vec<Batch<K, T>> {
        let (seq, limits) = (&mut self.next_seq, &self.limits);
        let batch = self.open.entry(slot).or_insert_with(|| {
            *seq += 1;
            Batch {
                key: key(),
                items: Vec::with_capacity(limits.max_size.min(BATCH_PREALLOCATION)),
                first_at: now,
                seq: *seq,
            }
        });
        batch.items.push(item);
        self.held += 1;
        let mut out = Vec::new();
        if batch.items.len() >= self.limits.max_size {
            out.push(self.take(slot));
        }
        self.since_check += 1;
        if self.since_check >= self.limits.check_interval {
            self.since_check = 0;
            out.extend(self.over_total());
        }
        out
    }

    fn take(&mut self, slot: u64) -> Batch<K, T> {
        let batch = self.open.remove(&slot).expect("slot is open");
        self.held -= batch.items.len();
        batch
    }

    /// Largest batches first until the total held is at or under `max_all`.
    fn over_total(&mut self) -> Vec<Batch<K, T>> {
        let mut out = Vec::new();
        if self.held <= self.limits.max_all {
            return out;
        }
        let mut by_size: Vec<(usize, u64, u64)> = self
            .open
            .iter()
            .map(|(slot, b)| (b.items.len(), b.seq, *slot))
            .collect();
        // Largest first; among equals the oldest first, so the order is deterministic.
        by_size.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
        for (_, _, slot) in by_size {
            if self.held <= self.limits.max_all {
                break;
            }
            out.push(self.take(slot));
        }
        out
    }

    /// When the oldest open batch reaches `max_wait`, if a wait is set.
    pub fn next_deadline(&self) -> Option<Instant> {
        let wait = self.limits.max_wait?;
        self.open.values().map(|b| b.first_at + wait).min()
    }

    /// Batches whose oldest item has waited `max_wait` by `now`, oldest first.
    pub fn expired(&mut self, now: Instant) -> Vec<Batch<K, T>> {
        let Some(wait) = self.limits.max_wait else {
            return Vec::new();
        };
        let mut due: Vec<(u64, u64)> = self
            .open
            .iter()
            .filter(|(_, b)| b.first_at + wait <= now)
            .map(|(slot, b)| (b.seq, *slot))
            .collect();
        due.sort_unstable();
        due.into_iter().map(|(_, slot)| self.take(slot)).collect()
    }

    /// Everything still held, oldest batch first.
    pub fn drain(&mut self) -> Vec<Batch<K, T>> {
        let mut all: Vec<Batch<K, T>> = self.open.drain().map(|(_, b)| b).collect();
        all.sort_by_key(|b| b.seq);
        self.held = 0;
        all
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(max_size: usize, max_all: usize, check_interval: usize) -> Limits {
        Limits {
            max_size,
            max_all,
            check_interval,
            max_wait: None,
        }
    }

    #[test]
    fn full_batches_flush_at_max_size() {
        let mut b = Batcher::new(limits(3, 100, 100));
        let now = Instant::now();
        let mut flushed = Vec::new();
        for i in 0..7u32 {
            flushed.extend(b.push(0, || "k", i, now));
        }
        assert_eq!(flushed.len(), 2);
        assert_eq!(flushed[0].items, vec![0, 1, 2]);
        assert_eq!(b.drain()[0].items, vec![6]);
    }

    #[test]
    fn total_over_max_all_flushes_largest_first() {
        // Three keys, max_all 5, checked every 6 items: sizes 3, 2, 1 -> flush the 3.
        let mut b = Batcher::new(limits(100, 5, 6));
        let now = Instant::now();
        let mut flushed = Vec::new();
        for (slot, item) in [(0, 0), (0, 1), (0, 2), (1, 3), (1, 4), (2, 5)] {
            flushed.extend(b.push(slot, || slot, item, now));
        }
        assert_eq!(flushed.len(), 1);
        assert_eq!(flushed[0].key, 0);
        assert_eq!(b.held(), 3);
    }

    #[test]
    fn max_all_is_only_checked_every_interval() {
        let mut b = Batcher::new(limits(100, 2, 10));
        let now = Instant::now();
        for i in 0..9u64 {
            assert!(b.push(i, || i, i, now).is_empty());
        }
        assert_eq!(b.push(9, || 9, 9, now).len(), 8, "10 held, 2 allowed");
    }

    #[test]
    fn timed_batches_expire_oldest_first() {
        let mut b = Batcher::new(Limits {
            max_wait: Some(Duration::from_millis(10)),
            ..limits(100, 100, 100)
        });
        let t0 = Instant::now();
        b.push(1, || 1, 'a', t0);
        b.push(2, || 2, 'b', t0 + Duration::from_millis(5));
        assert_eq!(b.next_deadline(), Some(t0 + Duration::from_millis(10)));
        assert!(b.expired(t0 + Duration::from_millis(9)).is_empty());
        let due = b.expired(t0 + Duration::from_millis(16));
        assert_eq!(due.iter().map(|x| x.key).collect::<Vec<_>>(), vec![1, 2]);
        assert_eq!(b.next_deadline(), None);
    }

    #[test]
    fn nothing_is_lost_or_duplicated() {
        let mut b = Batcher::new(limits(7, 20, 3));
        let now = Instant::now();
        let mut seen = Vec::new();
        for i in 0..1000u64 {
            for batch in b.push(i % 13, || i % 13, i, now) {
                assert!(batch.items.len() <= 7);
                seen.extend(batch.items);
            }
        }
        for batch in b.drain() {
            seen.extend(batch.items);
        }
        seen.sort_unstable();
        assert_eq!(seen, (0..1000).collect::<Vec<_>>());
    }
}
