//! Bounded channels between stages.
//!
//! Items travel in chunks (a `Vec` of Python references) so a worker takes the GIL once
//! per chunk. The capacity is counted in *items*, not chunks: a sender takes one permit per
//! item before its chunk enters the queue and the receiver gives them back when it takes
//! the chunk out. Transport is a crossbeam channel; the end of the stream is crossbeam's
//! disconnection, which happens once every upstream worker dropped its sender and the
//! stage's master sender is dropped (when its last upstream stage finished).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

use crossbeam_channel::{select, Receiver, RecvTimeoutError, Sender};

use crate::shutdown::Shutdown;

/// What a stage hands to the next one.
pub struct Chunk<T> {
    pub items: Vec<T>,
    /// Permits this chunk holds against the receiver's capacity.
    permits: usize,
}

/// Outcome of waiting for input.
pub enum Recv<T> {
    Chunk(Vec<T>),
    /// Nothing arrived before the deadline; the stream is still open.
    Timeout,
    /// Every upstream finished and the queue is drained.
    Closed,
    /// The run is being torn down.
    Shutdown,
}

/// The item budget of a bounded channel: a counting semaphore that also wakes on shutdown.
///
/// A waiting sender is woken only once half the capacity (or all it wants, if more) is
/// free, not as each chunk is taken: on a GIL build a woken sender can only queue for the
/// GIL the receiver holds, and every wake-up costs the receiver a system call and both
/// threads a context switch. With this hysteresis a sender that filled the queue sleeps
/// until the receiver drained half of it, then refills it in one go.
struct Permits {
    capacity: Option<usize>,
    state: Mutex<PermitState>,
    freed: Condvar,
}

struct PermitState {
    available: usize,
    /// Senders waiting for room, and the most permits one of them wants.
    waiters: usize,
    most_wanted: usize,
}

impl PermitState {
    /// Whether a waiting sender should be woken now (see [`Permits`]).
    fn wakes_a_sender(&self, capacity: usize) -> bool {
        self.waiters > 0 && self.available >= self.most_wanted.max(capacity.div_ceil(2))
    }
}

impl Permits {
    fn new(capacity: Option<usize>) -> Self {
        Permits {
            capacity,
            state: Mutex::new(PermitState {
                available: capacity.unwrap_or(0),
                waiters: 0,
                most_wanted: 0,
            }),
            freed: Condvar::new(),
        }
    }

    /// Take permits for `n` items, waiting while the queue is full. A chunk larger than the
    /// whole capacity waits for an empty queue and takes everything, so it cannot deadlock.
    fn acquire(&self, n: usize, shutdown: &Shutdown) -> Option<usize> {
        let Some(capacity) = self.capacity else {
            return Some(0);
        };
        let want = n.min(capacity);
        let mut state = self.state.lock().unwrap();
        if state.available < want {
            state.waiters += 1;
            state.most_wanted = state.most_wanted.max(want);
            while state.available < want && !shutdown.is_set() {
                state = self
                    .freed
                    .wait_timeout(state, Duration::from_millis(50))
                    .unwrap()
                    .0;
            }
            state.waiters -= 1;
            if state.waiters == 0 {
                state.most_wanted = 0;
            }
            if state.available < want {
                return None; // the run shut down
            }
        }
        state.available -= want;
        Some(want)
    }

    fn try_acquire(&self, n: usize) -> Option<usize> {
        let Some(capacity) = self.capacity else {
            return Some(0);
        };
        let want = n.min(capacity);
        let mut state = self.state.lock().unwrap();
        if state.available < want {
            return None;
        }
        state.available -= want;
        Some(want)
    }

    fn release(&self, n: usize) {
        let Some(capacity) = self.capacity.filter(|_| n > 0) else {
            return;
        };
        let wake = {
            let mut state = self.state.lock().unwrap();
            state.available += n;
            state.wakes_a_sender(capacity)
        };
        // Notified after the lock is dropped, so a woken sender does not wake into it.
        if wake {
            self.freed.notify_all();
        }
    }

    fn wake_all(&self) {
        let _state = self.state.lock().unwrap();
        self.freed.notify_all();
    }
}

/// The input queue of one stage.
pub struct ItemChannel<T> {
    rx: Receiver<Chunk<T>>,
    master: Mutex<Option<Sender<Chunk<T>>>>,
    permits: Permits,
    upstreams_left: AtomicUsize,
    /// How many items the receiving stage wants per chunk (adapted to its per-item cost).
    preferred_chunk: AtomicUsize,
    /// The receiver wants at least this many items per chunk when they are there (an
    /// async stage keeps that many coroutines in flight).
    min_chunk: usize,
    max_chunk: usize,
    queued_items: AtomicUsize,
    /// References the receiver is done with, kept for an upstream worker to release
    /// (`hand_back`); `None` where the receiver releases them itself.
    handed_back: Option<Mutex<Vec<T>>>,
}

/// Work worth about this long per chunk: long enough to amortise the GIL hand-off, short
/// enough that slow items still spread over every worker of the receiving stage.
pub const TARGET_CHUNK_NANOS: u64 = 200_000;
/// The same for stages whose every chunk pays a fixed cost far above the GIL hand-off (a
/// round trip to a worker process): a short target would keep their chunks small, since a
/// small chunk's fixed cost makes each of its items look expensive.
pub const TARGET_CHUNK_NANOS_REMOTE: u64 = 5_000_000;
/// The most items one chunk carries.
pub const MAX_CHUNK: usize = 512;

impl<T> ItemChannel<T> {
    /// `capacity` in items (`None`: unbounded); `upstreams` is the number of upstream stages.
    pub fn new(capacity: Option<usize>, upstreams: usize) -> Self {
        Self::for_receiver(capacity, upstreams, 1, 1, false)
    }

    /// Like `new`, for a receiving stage of `workers` threads that wants chunks of at least
    /// `min_chunk` items.
    ///
    /// A full queue holds at least two chunks per worker: one a worker takes while the
    /// sender fills the next. Bigger chunks than that would leave workers without input,
    /// smaller ones cost more hand-offs (a chunk of 500 instead of 250 made W1 5 to 8%
    /// faster with the default capacity of 1000).
    ///
    /// With `hand_back`, the receiver hands the items it is done with back to the senders
    /// to release (see [`Self::hand_back`]).
    pub fn for_receiver(
        capacity: Option<usize>,
        upstreams: usize,
        workers: usize,
        min_chunk: usize,
        hand_back: bool,
    ) -> Self {
        let (tx, rx) = crossbeam_channel::unbounded();
        let max_chunk = match capacity {
            Some(cap) => (cap / (2 * workers.max(1))).clamp(1, MAX_CHUNK),
            None => MAX_CHUNK,
        };
        ItemChannel {
            rx,
            master: Mutex::new(Some(tx)),
            permits: Permits::new(capacity),
            upstreams_left: AtomicUsize::new(upstreams),
            preferred_chunk: AtomicUsize::new(min_chunk.clamp(1, max_chunk)),
            min_chunk: min_chunk.clamp(1, max_chunk),
            max_chunk,
            queued_items: AtomicUsize::new(0),
            handed_back: hand_back.then(|| Mutex::new(Vec::new())),
        }
    }

    /// A sender for one upstream worker; `None` once the channel was closed.
    pub fn sender(&self) -> Option<Sender<Chunk<T>>> {
        self.master.lock().unwrap().clone()
    }

    /// One upstream stage finished; the last one closes the channel for new senders.
    pub fn upstream_finished(&self) {
        if self.upstreams_left.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.master.lock().unwrap().take();
        }
    }

    pub fn preferred_chunk(&self) -> usize {
        self.preferred_chunk.load(Ordering::Relaxed)
    }

    /// Record that the receiving stage spent `nanos` on `items` items, to size later chunks
    /// so that one takes about `target` nanoseconds.
    pub fn observe_cost(&self, items: usize, nanos: u64, target: u64) {
        if items == 0 {
            return;
        }
        let per_item = (nanos / items as u64).max(1);
        let wanted = (target / per_item) as usize;
        self.preferred_chunk.store(
            wanted.clamp(self.min_chunk, self.max_chunk),
            Ordering::Relaxed,
        );
    }

    pub fn queued_items(&self) -> usize {
        self.queued_items.load(Ordering::Relaxed)
    }

    pub fn is_empty(&self) -> bool {
        self.rx.is_empty()
    }

    /// Send a chunk, waiting for room. Gives the items back if the run shuts down first.
    pub fn send(
        &self,
        tx: &Sender<Chunk<T>>,
        items: Vec<T>,
        shutdown: &Shutdown,
    ) -> Result<(), Vec<T>> {
        match self.permits.acquire(items.len(), shutdown) {
            Some(permits) => self.push(tx, items, permits),
            None => Err(items),
        }
    }

    /// Send only if there is room now.
    pub fn try_send(&self, tx: &Sender<Chunk<T>>, items: Vec<T>) -> Result<(), Vec<T>> {
        match self.permits.try_acquire(items.len()) {
            Some(permits) => self.push(tx, items, permits),
            None => Err(items),
        }
    }

    fn push(&self, tx: &Sender<Chunk<T>>, items: Vec<T>, permits: usize) -> Result<(), Vec<T>> {
        let n = items.len();
        self.queued_items.fetch_add(n, Ordering::Relaxed);
        tx.send(Chunk { items, permits }).map_err(|err| {
            self.queued_items.fetch_sub(n, Ordering::Relaxed);
            self.permits.release(permits);
            err.into_inner().items
        })
    }

    /// Wait for the next chunk until `deadline` (forever if `None`).
    pub fn recv(&self, shutdown: &Shutdown, deadline: Option<Instant>) -> Recv<T> {
        let got = match deadline {
            None => select! {
                recv(self.rx) -> msg => msg.map_err(|_| RecvTimeoutError::Disconnected),
                recv(shutdown.receiver()) -> _ => return Recv::Shutdown,
            },
            Some(deadline) => {
                let timeout = deadline.saturating_duration_since(Instant::now());
                select! {
                    recv(self.rx) -> msg => msg.map_err(|_| RecvTimeoutError::Disconnected),
                    recv(shutdown.receiver()) -> _ => return Recv::Shutdown,
                    default(timeout) => Err(RecvTimeoutError::Timeout),
                }
            }
        };
        match got {
            Ok(chunk) => Recv::Chunk(self.take(chunk)),
            Err(RecvTimeoutError::Timeout) => Recv::Timeout,
            Err(RecvTimeoutError::Disconnected) => Recv::Closed,
        }
    }

    /// Take a chunk without waiting, if one is queued.
    pub fn try_recv(&self) -> Option<Vec<T>> {
        self.rx.try_recv().ok().map(|chunk| self.take(chunk))
    }

    fn take(&self, chunk: Chunk<T>) -> Vec<T> {
        self.queued_items
            .fetch_sub(chunk.items.len(), Ordering::Relaxed);
        self.permits.release(chunk.permits);
        chunk.items
    }

    /// Whether the receiver hands the items it is done with back to the senders.
    pub fn hands_back(&self) -> bool {
        self.handed_back.is_some()
    }

    /// The receiver is done with `items`: they are kept for a sender to release (see
    /// [`Self::take_handed_back`]), or returned for the caller to release once no upstream
    /// stage is left to do it, or where this channel does not hand back.
    ///
    /// This is for free-threaded CPython, where an object's reference count belongs to
    /// the thread that made it: a release by any other thread goes through the owner's
    /// queue of shared decrements (a mutex and a later merge). The items of a chunk were
    /// mostly made by the worker that sent it; W1 there ran 2x faster once they were
    /// released by it (docs/performance.md). With the GIL, only batches come back (see
    /// `scheduler::hand_back_plan`).
    pub fn hand_back(&self, items: Vec<T>) -> Option<Vec<T>> {
        match &self.handed_back {
            Some(kept) if self.upstreams_left.load(Ordering::Acquire) > 0 => {
                let mut kept = kept.lock().unwrap();
                if kept.is_empty() {
                    *kept = items;
                } else {
                    kept.extend(items);
                }
                None
            }
            _ => Some(items),
        }
    }

    /// What the receiver handed back since the last call, for a sender to release.
    pub fn take_handed_back(&self) -> Vec<T> {
        match &self.handed_back {
            Some(kept) => std::mem::take(&mut *kept.lock().unwrap()),
            None => Vec::new(),
        }
    }

    /// Wake every sender waiting for room so it can notice the shutdown.
    pub fn wake_senders(&self) {
        self.permits.wake_all();
    }

    /// Everything still queued, for dropping under the GIL at teardown.
    pub fn drain(&self) -> Vec<T> {
        let mut out = self.take_handed_back();
        while let Ok(chunk) = self.rx.try_recv() {
            out.extend(self.take(chunk));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::thread;

    #[test]
    fn delivers_every_item_in_order() {
        let shutdown = Shutdown::new();
        let ch = Arc::new(ItemChannel::<u32>::new(Some(8), 1));
        let tx = ch.sender().unwrap();
        let producer = {
            let ch = ch.clone();
            let shutdown = shutdown.clone();
            thread::spawn(move || {
                for start in (0..1000).step_by(3) {
                    let chunk: Vec<u32> = (start..(start + 3).min(1000)).collect();
                    ch.send(&tx, chunk, &shutdown).unwrap();
                }
                ch.upstream_finished();
            })
        };
        let mut got = Vec::new();
        loop {
            match ch.recv(&shutdown, None) {
                Recv::Chunk(items) => got.extend(items),
                Recv::Closed => break,
                _ => unreachable!(),
            }
        }
        producer.join().unwrap();
        assert_eq!(got, (0..1000).collect::<Vec<_>>());
    }

    #[test]
    fn capacity_is_counted_in_items() {
        let shutdown = Shutdown::new();
        let ch = ItemChannel::<u32>::new(Some(5), 1);
        let tx = ch.sender().unwrap();
        ch.try_send(&tx, vec![1, 2, 3]).unwrap();
        assert!(
            ch.try_send(&tx, vec![4, 5, 6]).is_err(),
            "6 items must not fit in 5"
        );
        ch.try_send(&tx, vec![4, 5]).unwrap();
        assert_eq!(ch.queued_items(), 5);
        let _ = ch.recv(&shutdown, None);
        ch.try_send(&tx, vec![6, 7, 8]).unwrap();
    }

    #[test]
    fn oversized_chunk_waits_for_an_empty_queue() {
        let ch = ItemChannel::<u32>::new(Some(2), 1);
        let tx = ch.sender().unwrap();
        ch.try_send(&tx, vec![1]).unwrap();
        assert!(ch.try_send(&tx, vec![1, 2, 3]).is_err());
        ch.try_recv().unwrap();
        ch.try_send(&tx, vec![1, 2, 3]).unwrap();
    }

    #[test]
    fn closes_after_the_last_upstream_and_drain() {
        let shutdown = Shutdown::new();
        let ch = ItemChannel::<u32>::new(None, 2);
        let tx = ch.sender().unwrap();
        ch.send(&tx, vec![1], &shutdown).unwrap();
        drop(tx);
        ch.upstream_finished();
        assert!(ch.sender().is_some(), "one upstream stage is still running");
        ch.upstream_finished();
        assert!(ch.sender().is_none());
        assert!(matches!(ch.recv(&shutdown, None), Recv::Chunk(_)));
        assert!(matches!(ch.recv(&shutdown, None), Recv::Closed));
    }

    #[test]
    fn shutdown_wakes_a_blocked_sender_and_receiver() {
        let shutdown = Shutdown::new();
        let ch = Arc::new(ItemChannel::<u32>::new(Some(1), 1));
        let tx = ch.sender().unwrap();
        ch.send(&tx, vec![1], &shutdown).unwrap();
        let blocked = {
            let ch = ch.clone();
            let shutdown = shutdown.clone();
            thread::spawn(move || ch.send(&tx, vec![2], &shutdown).is_err())
        };
        thread::sleep(Duration::from_millis(20));
        shutdown.set();
        ch.wake_senders();
        assert!(blocked.join().unwrap());
        let empty = ItemChannel::<u32>::new(Some(1), 1);
        assert!(matches!(empty.recv(&shutdown, None), Recv::Shutdown));
    }

    #[test]
    fn a_waiting_sender_is_woken_once_half_the_capacity_is_free() {
        let state = |available, waiters, most_wanted| PermitState {
            available,
            waiters,
            most_wanted,
        };
        assert!(!state(1000, 0, 0).wakes_a_sender(1000), "nobody waits");
        assert!(!state(250, 1, 250).wakes_a_sender(1000));
        assert!(!state(499, 1, 250).wakes_a_sender(1000));
        assert!(state(500, 1, 250).wakes_a_sender(1000));
        assert!(
            state(3, 1, 1).wakes_a_sender(5),
            "half of an odd capacity rounds up"
        );
        assert!(
            !state(600, 1, 800).wakes_a_sender(1000),
            "it wants more than half"
        );
        assert!(state(800, 2, 800).wakes_a_sender(1000));
    }

    #[test]
    fn many_senders_and_receivers_neither_lose_nor_overfill() {
        // Four senders, two receivers, a capacity of 5: every item arrives once, and the
        // permits come back to the whole capacity.
        let shutdown = Shutdown::new();
        let ch = Arc::new(ItemChannel::<u32>::new(Some(5), 1));
        let senders: Vec<_> = (0..4u32)
            .map(|s| {
                let (ch, shutdown) = (ch.clone(), shutdown.clone());
                let tx = ch.sender().unwrap();
                thread::spawn(move || {
                    for i in 0..500 {
                        let chunk = vec![s * 10_000 + 2 * i, s * 10_000 + 2 * i + 1];
                        ch.send(&tx, chunk, &shutdown).unwrap();
                    }
                })
            })
            .collect();
        let receivers: Vec<_> = (0..2)
            .map(|_| {
                let (ch, shutdown) = (ch.clone(), shutdown.clone());
                thread::spawn(move || {
                    let mut got = Vec::new();
                    loop {
                        match ch.recv(&shutdown, None) {
                            Recv::Chunk(items) => got.extend(items),
                            Recv::Closed => return got,
                            _ => unreachable!(),
                        }
                    }
                })
            })
            .collect();
        for sender in senders {
            sender.join().unwrap();
        }
        ch.upstream_finished();
        let mut got: Vec<u32> = receivers
            .into_iter()
            .flat_map(|r| r.join().unwrap())
            .collect();
        got.sort_unstable();
        let mut want: Vec<u32> = (0..4u32)
            .flat_map(|s| (0..1000).map(move |i| s * 10_000 + i))
            .collect();
        want.sort_unstable();
        assert_eq!(got, want);
        assert_eq!(ch.permits.state.lock().unwrap().available, 5);
    }

    #[test]
    fn a_blocked_sender_gets_through_as_the_receiver_drains() {
        let shutdown = Shutdown::new();
        let ch = Arc::new(ItemChannel::<u32>::new(Some(4), 1));
        let tx = ch.sender().unwrap();
        ch.try_send(&tx, vec![1, 2]).unwrap();
        ch.try_send(&tx, vec![3, 4]).unwrap();
        let sender = {
            let ch = ch.clone();
            let shutdown = shutdown.clone();
            thread::spawn(move || ch.send(&tx, vec![5, 6], &shutdown).is_ok())
        };
        let mut got = Vec::new();
        while got.len() < 6 {
            match ch.recv(&shutdown, None) {
                Recv::Chunk(items) => got.extend(items),
                _ => unreachable!(),
            }
        }
        assert!(sender.join().unwrap());
        assert_eq!(got, vec![1, 2, 3, 4, 5, 6]);
    }

    #[test]
    fn chunk_size_follows_per_item_cost() {
        let ch = ItemChannel::<u32>::new(Some(1000), 1);
        ch.observe_cost(100, 100 * 10_000_000, TARGET_CHUNK_NANOS); // 10 ms per item
        assert_eq!(ch.preferred_chunk(), 1);
        ch.observe_cost(1000, 1000 * 100, TARGET_CHUNK_NANOS); // 100 ns per item
        assert_eq!(
            ch.preferred_chunk(),
            500,
            "half the capacity for one worker"
        );
        let shared = ItemChannel::<u32>::for_receiver(Some(1000), 1, 4, 1, false);
        shared.observe_cost(1000, 1000 * 100, TARGET_CHUNK_NANOS);
        assert_eq!(shared.preferred_chunk(), 125, "two chunks per worker");
        let unbounded = ItemChannel::<u32>::new(None, 1);
        unbounded.observe_cost(1000, 1000 * 100, TARGET_CHUNK_NANOS);
        assert_eq!(unbounded.preferred_chunk(), MAX_CHUNK);
    }

    #[test]
    fn min_chunk_holds_for_slow_items() {
        let ch = ItemChannel::<u32>::for_receiver(Some(1000), 1, 2, 8, false);
        assert_eq!(ch.preferred_chunk(), 8);
        ch.observe_cost(8, 8 * 10_000_000, TARGET_CHUNK_NANOS);
        assert_eq!(ch.preferred_chunk(), 8);
    }

    #[test]
    fn handed_back_items_wait_for_a_sender_while_an_upstream_is_left() {
        let ch = ItemChannel::<u32>::for_receiver(Some(10), 1, 1, 1, true);
        assert!(ch.hands_back());
        assert_eq!(ch.hand_back(vec![1, 2]), None, "kept for the sender");
        assert_eq!(ch.hand_back(vec![3]), None);
        assert_eq!(ch.take_handed_back(), vec![1, 2, 3]);
        assert_eq!(ch.take_handed_back(), Vec::<u32>::new(), "taken once");

        assert_eq!(ch.hand_back(vec![4]), None);
        ch.upstream_finished();
        assert_eq!(
            ch.hand_back(vec![5]),
            Some(vec![5]),
            "no sender is left to take them: the receiver releases them itself"
        );
        assert_eq!(ch.drain(), vec![4], "teardown drains what was kept");
    }

    #[test]
    fn a_channel_without_hand_back_returns_the_items_at_once() {
        let ch = ItemChannel::<u32>::new(Some(10), 1);
        assert!(!ch.hands_back());
        assert_eq!(ch.hand_back(vec![1, 2]), Some(vec![1, 2]));
        assert_eq!(ch.take_handed_back(), Vec::<u32>::new());
    }
}
