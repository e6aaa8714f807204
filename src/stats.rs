//! Per-stage counters and a latency histogram, updated lock-free by every worker.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Log-scale buckets: bucket `i` holds latencies in [2^(i/4), 2^((i+1)/4)) nanoseconds,
/// which keeps percentile error under 19% from 1 ns to about 70 years.
const BUCKETS: usize = 4 * 64;

pub struct StageStats {
    pub items_in: AtomicU64,
    /// Items emitted by workers that finished; a running worker counts in its own
    /// [`OutCounter`], listed in `out_counters`.
    items_out: AtomicU64,
    out_counters: Mutex<Vec<Arc<AtomicU64>>>,
    pub errors: AtomicU64,
    pub retries: AtomicU64,
    pub chunks_in: AtomicU64,
    /// Time workers spent handling items, and the part of it they spent waiting for room
    /// in a full downstream queue: their difference is the busy time (the bottleneck).
    busy_nanos: AtomicU64,
    blocked_nanos: AtomicU64,
    histogram: Box<[AtomicU64]>,
    /// When the stage took its first item and when it finished, for throughput.
    window: Mutex<(Option<Instant>, Option<Instant>)>,
}

/// A copy of the counters at one moment.
#[derive(Debug, Clone, PartialEq)]
pub struct Snapshot {
    pub items_in: u64,
    pub items_out: u64,
    pub errors: u64,
    pub retries: u64,
    pub chunks_in: u64,
    pub latency_p50: f64,
    pub latency_p99: f64,
    pub throughput: f64,
    pub active_seconds: f64,
    pub busy_seconds: f64,
}

fn bucket_of(nanos: u64) -> usize {
    if nanos <= 1 {
        return 0;
    }
    // floor(4 * log2(nanos)) from the position of the top bit and the next two bits.
    let top = 63 - nanos.leading_zeros() as usize;
    let frac = if top >= 2 {
        ((nanos >> (top - 2)) & 0b11) as usize
    } else {
        ((nanos << (2 - top)) & 0b11) as usize
    };
    (4 * top + frac).min(BUCKETS - 1)
}

fn bucket_midpoint_seconds(bucket: usize) -> f64 {
    2f64.powf((bucket as f64 + 0.5) / 4.0) / 1e9
}

impl StageStats {
    pub fn new() -> Self {
        StageStats {
            items_in: AtomicU64::new(0),
            items_out: AtomicU64::new(0),
            out_counters: Mutex::new(Vec::new()),
            errors: AtomicU64::new(0),
            retries: AtomicU64::new(0),
            chunks_in: AtomicU64::new(0),
            busy_nanos: AtomicU64::new(0),
            blocked_nanos: AtomicU64::new(0),
            histogram: (0..BUCKETS).map(|_| AtomicU64::new(0)).collect(),
            window: Mutex::new((None, None)),
        }
    }

    pub fn started(&self) {
        let mut w = self.window.lock().unwrap();
        if w.0.is_none() {
            w.0 = Some(Instant::now());
        }
    }

    pub fn finished(&self) {
        self.window.lock().unwrap().1 = Some(Instant::now());
    }

    /// A chunk of `n` items arrived.
    pub fn add_in(&self, n: u64) {
        self.add_items(n, 1);
    }

    /// `items` arrived in `chunks` chunks.
    pub fn add_items(&self, items: u64, chunks: u64) {
        self.items_in.fetch_add(items, Ordering::Relaxed);
        self.chunks_in.fetch_add(chunks, Ordering::Relaxed);
    }

    /// A counter of emitted items for one worker thread.
    pub fn out_counter(self: &Arc<Self>) -> OutCounter {
        let count = Arc::new(AtomicU64::new(0));
        self.out_counters.lock().unwrap().push(count.clone());
        OutCounter {
            stats: self.clone(),
            count,
        }
    }

    /// Every item emitted so far, by finished and running workers.
    fn items_out(&self) -> u64 {
        let running = self.out_counters.lock().unwrap();
        self.items_out.load(Ordering::Relaxed)
            + running
                .iter()
                .map(|c| c.load(Ordering::Relaxed))
                .sum::<u64>()
    }

    pub fn add_error(&self) {
        self.errors.fetch_add(1, Ordering::Relaxed);
    }

    pub fn add_retry(&self) {
        self.retries.fetch_add(1, Ordering::Relaxed);
    }

    /// A worker spent `spent` handling items (emits that waited for room included).
    pub fn add_busy(&self, spent: Duration) {
        self.busy_nanos.fetch_add(
            spent.as_nanos().min(u64::MAX as u128) as u64,
            Ordering::Relaxed,
        );
    }

    /// A worker waited `waited` for room in a downstream queue.
    pub fn add_blocked(&self, waited: Duration) {
        self.blocked_nanos.fetch_add(
            waited.as_nanos().min(u64::MAX as u128) as u64,
            Ordering::Relaxed,
        );
    }

    pub fn record_latency(&self, latency: Duration) {
        self.record_latency_n(latency, 1);
    }

    /// Count `n` items that each took `latency`.
    pub fn record_latency_n(&self, latency: Duration, n: u64) {
        let nanos = latency.as_nanos().min(u64::MAX as u128) as u64;
        self.histogram[bucket_of(nanos)].fetch_add(n, Ordering::Relaxed);
    }

    fn percentile(&self, counts: &[u64], total: u64, q: f64) -> f64 {
        if total == 0 {
            return 0.0;
        }
        let rank = ((total as f64) * q).ceil().max(1.0) as u64;
        let mut seen = 0;
        for (bucket, &count) in counts.iter().enumerate() {
            seen += count;
            if seen >= rank {
                return bucket_midpoint_seconds(bucket);
            }
        }
        bucket_midpoint_seconds(BUCKETS - 1)
    }

    pub fn snapshot(&self) -> Snapshot {
        let counts: Vec<u64> = self
            .histogram
            .iter()
            .map(|c| c.load(Ordering::Relaxed))
            .collect();
        let total: u64 = counts.iter().sum();
        let items_in = self.items_in.load(Ordering::Relaxed);
        let (start, end) = *self.window.lock().unwrap();
        let active = match start {
            Some(s) => end
                .unwrap_or_else(Instant::now)
                .saturating_duration_since(s)
                .as_secs_f64(),
            None => 0.0,
        };
        let items_out = self.items_out();
        Snapshot {
            items_in,
            items_out,
            errors: self.errors.load(Ordering::Relaxed),
            retries: self.retries.load(Ordering::Relaxed),
            chunks_in: self.chunks_in.load(Ordering::Relaxed),
            latency_p50: self.percentile(&counts, total, 0.50),
            latency_p99: self.percentile(&counts, total, 0.99),
            // Producers take no items: their rate is what they emit.
            throughput: if active > 0.0 {
                items_in.max(items_out) as f64 / active
            } else {
                0.0
            },
            active_seconds: active,
            busy_seconds: self
                .busy_nanos
                .load(Ordering::Relaxed)
                .saturating_sub(self.blocked_nanos.load(Ordering::Relaxed))
                as f64
                / 1e9,
        }
    }
}

/// One worker's count of the items it emitted. Only its own thread adds to it, with a
/// plain load and store: an atomic add per item (a locked instruction) cost a few percent
/// of a cheap stage's time. Readers sum every worker's counter; a finished worker's count
/// moves into the stage's total when its counter drops.
pub struct OutCounter {
    stats: Arc<StageStats>,
    count: Arc<AtomicU64>,
}

impl OutCounter {
    pub fn add(&self, n: u64) {
        let count = self.count.load(Ordering::Relaxed);
        self.count.store(count + n, Ordering::Relaxed);
    }
}

impl Drop for OutCounter {
    fn drop(&mut self) {
        // Moved under the list's lock, so a reader never counts these items twice or not
        // at all.
        let mut running = self.stats.out_counters.lock().unwrap();
        running.retain(|c| !Arc::ptr_eq(c, &self.count));
        self.stats
            .items_out
            .fetch_add(self.count.load(Ordering::Relaxed), Ordering::Relaxed);
    }
}

impl Default for StageStats {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_monotonic() {
        let mut last = 0;
        for n in [
            1u64,
            2,
            3,
            5,
            8,
            100,
            1_000,
            1_000_000,
            1_000_000_000,
            u64::MAX,
        ] {
            let b = bucket_of(n);
            assert!(b >= last, "bucket of {n} went down");
            last = b;
        }
    }

    #[test]
    fn percentiles_are_close_to_the_truth() {
        let s = StageStats::new();
        for _ in 0..98 {
            s.record_latency(Duration::from_micros(100));
        }
        s.record_latency(Duration::from_millis(50));
        s.record_latency(Duration::from_millis(50));
        let snap = s.snapshot();
        assert!(
            (snap.latency_p50 / 100e-6 - 1.0).abs() < 0.2,
            "{}",
            snap.latency_p50
        );
        assert!(
            (snap.latency_p99 / 50e-3 - 1.0).abs() < 0.2,
            "{}",
            snap.latency_p99
        );
    }

    #[test]
    fn busy_time_excludes_time_blocked_downstream() {
        let s = StageStats::new();
        s.add_busy(Duration::from_millis(30));
        s.add_blocked(Duration::from_millis(10));
        assert!((s.snapshot().busy_seconds - 0.020).abs() < 1e-9);
        s.add_blocked(Duration::from_millis(50));
        assert_eq!(s.snapshot().busy_seconds, 0.0);
    }

    #[test]
    fn items_out_counts_running_and_finished_workers() {
        let s = Arc::new(StageStats::new());
        let (first, second) = (s.out_counter(), s.out_counter());
        first.add(3);
        second.add(4);
        assert_eq!(s.snapshot().items_out, 7);
        drop(first);
        assert_eq!(s.snapshot().items_out, 7);
        second.add(1);
        drop(second);
        assert_eq!(s.snapshot().items_out, 8);
        assert!(s.out_counters.lock().unwrap().is_empty());
    }

    #[test]
    fn empty_stats_are_zero() {
        let snap = StageStats::new().snapshot();
        assert_eq!(snap.items_in, 0);
        assert_eq!(snap.latency_p50, 0.0);
        assert_eq!(snap.throughput, 0.0);
    }
}
