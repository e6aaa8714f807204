//! Where a worker's output goes: per-edge outboxes and the emitter bound to each worker
//! thread.
//!
//! Every worker owns one [`Outbox`] per downstream edge. Items collect there (under the GIL,
//! one uncontended spin lock per item) and leave as a chunk when the receiving stage's
//! preferred chunk size is reached, when the worker is about to wait for input, or when the
//! run's flusher finds the oldest item older than a millisecond. The flusher is what
//! guarantees that no item sits in a buffer while the pipeline waits, even if user code
//! blocks between two emits.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use crossbeam_channel::Sender;
use pyo3::exceptions::PyRuntimeError;
use pyo3::prelude::*;

use crate::channel::{Chunk, ItemChannel};
use crate::gil;
use crate::shutdown::Shutdown;
use crate::stats::{OutCounter, StageStats};

pub type Item = Py<PyAny>;
pub type Channel = ItemChannel<Item>;

struct OutboxState {
    items: Vec<Item>,
    oldest: Option<Instant>,
    tx: Option<Sender<Chunk<Item>>>,
    /// A worker is sending a chunk without the lock; the flusher must not overtake it.
    sending: bool,
}

/// The lock of an outbox. Its owner takes it once per item, the flusher now and then
/// (`try_lock`, never waiting), and neither holds it for more than a push or a send without
/// waiting. A spin lock gives it back with a plain store where a `Mutex` needs a second
/// atomic read-modify-write (to learn whether anyone sleeps on it): the two locked
/// instructions were 90% of an emit's cost, and W1 ran 5% faster with one. A thread that
/// finds it taken yields to the holder instead of spinning on.
type OutboxLock<T> = spin::mutex::SpinMutex<T, spin::relax::Yield>;

pub struct Outbox {
    target: Arc<Channel>,
    /// Where what the receiver hands back goes on to, rather than being released here: an
    /// accumulator's input, whose senders made the records of its batches.
    pass_back: Option<Arc<Channel>>,
    /// The sending stage's stats: time spent waiting for room is not busy time.
    sender_stats: Arc<StageStats>,
    /// Rung when the outbox takes an item while empty.
    flusher: Arc<FlusherBell>,
    state: OutboxLock<OutboxState>,
}

impl Outbox {
    pub fn new(
        target: Arc<Channel>,
        pass_back: Option<Arc<Channel>>,
        sender_stats: Arc<StageStats>,
        flusher: Arc<FlusherBell>,
    ) -> Arc<Self> {
        let tx = target.sender();
        Arc::new(Outbox {
            target,
            pass_back,
            sender_stats,
            flusher,
            state: OutboxLock::new(OutboxState {
                items: Vec::new(),
                oldest: None,
                tx,
                sending: false,
            }),
        })
    }

    /// Add an item; sends a chunk when the receiver's preferred size is reached.
    pub fn push(&self, py: Python<'_>, item: Item, shutdown: &Shutdown) {
        let (first, full) = {
            let mut st = self.state.lock();
            let first = st.items.is_empty();
            if first {
                st.oldest = Some(Instant::now());
            }
            st.items.push(item);
            (first, st.items.len() >= self.target.preferred_chunk())
        };
        if first {
            self.flusher.item_waiting();
        }
        if full {
            self.flush(py, shutdown);
        }
    }

    /// Send whatever is buffered, waiting (without the GIL) for room if needed. First,
    /// release what the receiver handed back (`ItemChannel::hand_back`): on this thread,
    /// which made most of it; or pass it on (`pass_back`).
    pub fn flush(&self, py: Python<'_>, shutdown: &Shutdown) {
        let spent = self.target.take_handed_back();
        match &self.pass_back {
            Some(input) if !spent.is_empty() => drop(input.hand_back(spent)),
            _ => drop(spent),
        }
        let (items, tx) = {
            let mut st = self.state.lock();
            if st.items.is_empty() {
                return;
            }
            let Some(tx) = st.tx.clone() else {
                // The receiver is gone (only at teardown): drop the items here, under the GIL.
                st.items.clear();
                return;
            };
            let items = std::mem::take(&mut st.items);
            // Fast path: room now, send under the lock without giving up the GIL.
            let items = match self.target.try_send(&tx, items) {
                Ok(()) => return,
                Err(items) => items,
            };
            st.sending = true;
            (items, tx)
        };
        let target = self.target.clone();
        let shutdown = shutdown.clone();
        let waiting = Instant::now();
        let unsent = gil::detach(py, move || target.send(&tx, items, &shutdown).err());
        self.state.lock().sending = false;
        drop(unsent); // dropped with the GIL held
        self.sender_stats.add_blocked(waiting.elapsed());
    }

    /// Called by the flusher thread (no GIL): send items older than `max_age` if the
    /// receiver has nothing queued (so it would wait for them) and there is room right now.
    /// Never blocks. A receiver with work queued is not waiting: leaving the chunk to fill
    /// keeps chunks big while the sending worker merely waits for the GIL. Returns whether
    /// the outbox may still hold items.
    pub fn flush_stale(&self, max_age: Duration) -> bool {
        let Some(mut st) = self.state.try_lock() else {
            return true;
        };
        if st.items.is_empty() {
            return false;
        }
        if self.target.queued_items() > 0
            || st.sending
            || st.oldest.is_none_or(|t| t.elapsed() < max_age)
        {
            return true;
        }
        let Some(tx) = st.tx.clone() else {
            return true;
        };
        let items = std::mem::take(&mut st.items);
        match self.target.try_send(&tx, items) {
            Ok(()) => false,
            Err(items) => {
                st.items = items;
                true
            }
        }
    }

    /// Whether the outbox holds nothing now (false while its owner holds the lock).
    pub fn is_empty(&self) -> bool {
        self.state.try_lock().is_some_and(|st| st.items.is_empty())
    }

    /// The worker is done with this edge: its sender goes away so the receiver can see the
    /// end of the stream.
    pub fn close(&self) {
        self.state.lock().tx = None;
    }

    /// Buffered items, for dropping under the GIL at teardown.
    pub fn take_all(&self) -> Vec<Item> {
        std::mem::take(&mut self.state.lock().items)
    }
}

/// Wakes the run's flusher from a doze. The flusher dozes once every outbox of the run
/// has been empty for a while (an idle pipeline, or one whose stages take long per item),
/// instead of waking 2,000 times a second for nothing; the first item into an empty
/// outbox rings it, so no item waits longer than when it never dozed.
pub struct FlusherBell {
    dozing: AtomicBool,
    rung: Mutex<bool>,
    bell: Condvar,
}

impl FlusherBell {
    pub fn new() -> Self {
        FlusherBell {
            dozing: AtomicBool::new(false),
            rung: Mutex::new(false),
            bell: Condvar::new(),
        }
    }

    /// An empty outbox took an item: wake the flusher if it dozes. The item is in the
    /// outbox before this looks (SeqCst against the flusher's `dozing` store and its look
    /// at every outbox): a flusher that starts dozing after this look sees the item.
    fn item_waiting(&self) {
        if self.dozing.load(Ordering::SeqCst) {
            self.ring();
        }
    }

    /// Wake the flusher whether it dozes now or is about to (the run is stopping).
    pub fn ring(&self) {
        *self.rung.lock().unwrap() = true;
        self.bell.notify_one();
    }

    /// Doze up to `limit`, unless rung or `idle()` (asked after `dozing` is set) says an
    /// item already waits.
    pub fn doze(&self, limit: Duration, idle: impl FnOnce() -> bool) {
        let mut rung = self.rung.lock().unwrap();
        self.dozing.store(true, Ordering::SeqCst);
        if !*rung && idle() {
            rung = self
                .bell
                .wait_timeout_while(rung, limit, |rung| !*rung)
                .unwrap()
                .0;
        }
        *rung = false;
        self.dozing.store(false, Ordering::SeqCst);
    }
}

impl Default for FlusherBell {
    fn default() -> Self {
        Self::new()
    }
}

/// A stage that runs on the thread of the one stage feeding it (`inline.rs`): it takes each
/// item as it is sent, with no queue between.
pub trait InlineTarget {
    /// Run the stage on `item`, now, on this thread.
    fn take(&self, py: Python<'_>, item: Item);
    /// Send on what the stage's own outboxes hold: its sender is about to wait.
    fn flush(&self, py: Python<'_>);
    /// Its sender's stream ended: close the stage's worker and finish the stage.
    fn finish(&self, py: Python<'_>);
}

/// One downstream edge of a worker.
pub enum Edge {
    /// To a stage with an input queue of its own.
    Queue(Arc<Outbox>),
    /// To an `inline` stage that runs on this worker's thread.
    Inline(Box<dyn InlineTarget>),
}

impl Edge {
    fn send(&self, py: Python<'_>, item: Item, shutdown: &Shutdown) {
        match self {
            Edge::Queue(outbox) => outbox.push(py, item, shutdown),
            Edge::Inline(stage) => stage.take(py, item),
        }
    }
}

/// How a stage sends an item that `emit` did not address to a stage by name.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Routing {
    Broadcast,
    RoundRobin,
}

/// What every emitter of one stage shares.
pub struct Routes {
    pub stage_name: String,
    pub routing: Routing,
    /// `emit(to=name)`: the edges each accepted name reaches.
    pub by_name: HashMap<String, Vec<usize>>,
    /// Builds the `RoutingError` for a name that is not a downstream of this stage.
    pub route_error: Py<PyAny>,
}

enum Target {
    Default,
    Edges(Vec<usize>),
}

/// The output side of one worker thread.
pub struct Emitter {
    routes: Arc<Routes>,
    items_out: OutCounter,
    edges: Vec<Edge>,
    all_edges: Vec<usize>,
    shutdown: Shutdown,
    next_rr: Cell<usize>,
    /// An item's attempt is running on this worker: what it emits waits in `held` until
    /// its outcome is known (delivered if it succeeds, dropped if it fails).
    holding: Cell<bool>,
    /// What the attempt in progress emitted, in order. Only `emit()` calls and a
    /// generator's yields land here; a value-mode stage's return value is dispatched after
    /// the attempt succeeded, so a stage that never calls `emit()` never touches it.
    held: RefCell<Vec<(Target, Item)>>,
}

/// A hold buffer that grew past this many entries (a generator yielding many values per
/// item) is not kept for the next item.
const HELD_KEEP_CAPACITY: usize = 1024;

impl Emitter {
    pub fn new(
        routes: Arc<Routes>,
        stats: Arc<StageStats>,
        edges: Vec<Edge>,
        shutdown: Shutdown,
    ) -> Rc<Self> {
        Rc::new(Emitter {
            routes,
            items_out: stats.out_counter(),
            all_edges: (0..edges.len()).collect(),
            edges,
            shutdown,
            next_rr: Cell::new(0),
            holding: Cell::new(false),
            held: RefCell::new(Vec::new()),
        })
    }

    pub fn emit_default(&self, py: Python<'_>, value: Item) {
        // The common case, one downstream edge and no attempt holding what it emits, goes
        // straight to the edge: the general path's four calls per item were 9% of an
        // inline chain's samples in `perf`.
        if let [edge] = &self.edges[..] {
            if !self.holding.get() {
                self.items_out.add(1);
                edge.send(py, value, &self.shutdown);
                return;
            }
        }
        self.route(py, Target::Default, value);
    }

    /// `emit(value, to=name)`: resolve the name against this stage's downstream edges.
    pub fn emit_to(&self, py: Python<'_>, value: Item, to: &str) -> PyResult<()> {
        match self.routes.by_name.get(to) {
            Some(edges) => {
                self.route(py, Target::Edges(edges.clone()), value);
                Ok(())
            }
            None => {
                let err = self.routes.route_error.bind(py).call1((to,))?;
                Err(PyErr::from_value(err))
            }
        }
    }

    fn route(&self, py: Python<'_>, target: Target, value: Item) {
        if self.holding.get() {
            self.held.borrow_mut().push((target, value));
            return;
        }
        self.dispatch(py, target, value);
    }

    fn dispatch(&self, py: Python<'_>, target: Target, value: Item) {
        self.items_out.add(1);
        let n = self.edges.len();
        if n == 0 {
            return; // a terminal stage: the value is dropped here, under the GIL
        }
        match target {
            Target::Default if self.routes.routing == Routing::RoundRobin => {
                let i = self.next_rr.get();
                self.next_rr.set((i + 1) % n);
                self.edges[i].send(py, value, &self.shutdown);
            }
            Target::Default => self.broadcast(py, &self.all_edges, value),
            Target::Edges(edges)
                if self.routes.routing == Routing::RoundRobin && edges.len() > 1 =>
            {
                let i = self.next_rr.get();
                self.next_rr.set(i.wrapping_add(1));
                self.edges[edges[i % edges.len()]].send(py, value, &self.shutdown);
            }
            Target::Edges(edges) => self.broadcast(py, &edges, value),
        }
    }

    fn broadcast(&self, py: Python<'_>, edges: &[usize], value: Item) {
        if let Some((&last, rest)) = edges.split_last() {
            for &edge in rest {
                self.edges[edge].send(py, value.clone_ref(py), &self.shutdown);
            }
            self.edges[last].send(py, value, &self.shutdown);
        }
    }

    /// Start an item's attempt: what it emits is held until `commit` or `rollback`.
    pub fn begin_attempt(&self) {
        self.holding.set(true);
    }

    /// A generator stage yielded `value`: it is part of the attempt's output.
    pub fn hold(&self, value: Item) {
        self.held.borrow_mut().push((Target::Default, value));
    }

    /// The attempt succeeded: send what it emitted, in order.
    pub fn commit(&self, py: Python<'_>) {
        self.holding.set(false);
        if self.held.borrow().is_empty() {
            return;
        }
        // Taken out of the cell: sending may wait for room (without the GIL), and nothing
        // may borrow the cell meanwhile.
        let mut held = std::mem::take(&mut *self.held.borrow_mut());
        for (target, value) in held.drain(..) {
            self.dispatch(py, target, value);
        }
        self.keep_buffer(held);
    }

    /// The attempt failed: forget what it emitted (dropped here, under the GIL).
    pub fn rollback(&self) {
        self.holding.set(false);
        if self.held.borrow().is_empty() {
            return;
        }
        let mut held = std::mem::take(&mut *self.held.borrow_mut());
        held.clear();
        self.keep_buffer(held);
    }

    fn keep_buffer(&self, held: Vec<(Target, Item)>) {
        if held.capacity() <= HELD_KEEP_CAPACITY {
            *self.held.borrow_mut() = held;
        }
    }

    pub fn flush(&self, py: Python<'_>) {
        for edge in &self.edges {
            match edge {
                Edge::Queue(outbox) => outbox.flush(py, &self.shutdown),
                Edge::Inline(stage) => stage.flush(py),
            }
        }
    }

    /// Flush and let the receivers with queues of their own know this worker is done.
    pub fn finish(&self, py: Python<'_>) {
        self.rollback(); // an attempt cut short delivers nothing
        if !self.shutdown.is_set() {
            self.flush(py);
        }
        for edge in &self.edges {
            if let Edge::Queue(outbox) = edge {
                drop(outbox.take_all());
                outbox.close();
            }
        }
    }

    /// End the `inline` stages that ran on this thread behind this worker: after the
    /// worker itself finished, as a stage with a thread of its own would see its input end.
    pub fn finish_inline(&self, py: Python<'_>) {
        for edge in &self.edges {
            if let Edge::Inline(stage) = edge {
                stage.finish(py);
            }
        }
    }
}

/// Which emitter `emit()` reaches on one worker thread: the worker's own or, while an
/// `inline` stage runs inside it, that stage's. The worker and the inline stages opened on
/// its thread share the slot, so they swap emitters around every item without going
/// through thread-local storage: in an extension module each access to it is a call into
/// the dynamic loader (3% of an inline chain's time).
#[derive(Clone, Default)]
pub struct EmitterSlot(Rc<Cell<Option<Rc<Emitter>>>>);

impl EmitterSlot {
    /// Make `emitter` the one `emit()` reaches until the guard drops, which brings back
    /// the one before.
    pub fn bind(&self, emitter: &Rc<Emitter>) -> BindGuard<'_> {
        BindGuard {
            slot: self,
            outer: self.0.replace(Some(emitter.clone())),
        }
    }

    fn current(&self) -> Option<Rc<Emitter>> {
        let emitter = self.0.take();
        let copy = emitter.clone();
        self.0.set(emitter);
        copy
    }
}

pub struct BindGuard<'a> {
    slot: &'a EmitterSlot,
    outer: Option<Rc<Emitter>>,
}

impl Drop for BindGuard<'_> {
    fn drop(&mut self) {
        drop(self.slot.0.replace(self.outer.take()));
    }
}

thread_local! {
    /// The emitter slot of the stage worker running on this thread, if any.
    static CURRENT: Cell<Option<EmitterSlot>> = const { Cell::new(None) };
}

/// Make `slot` the one `emit()` reads on this thread until the guard drops.
pub fn use_slot(slot: &EmitterSlot) -> SlotGuard {
    SlotGuard {
        outer: CURRENT.replace(Some(slot.clone())),
    }
}

pub struct SlotGuard {
    outer: Option<EmitterSlot>,
}

impl Drop for SlotGuard {
    fn drop(&mut self) {
        drop(CURRENT.replace(self.outer.take()));
    }
}

/// The emitter `emit()` reaches on this thread, if any.
fn current() -> Option<Rc<Emitter>> {
    let slot = CURRENT.take();
    let emitter = slot.as_ref().and_then(EmitterSlot::current);
    CURRENT.set(slot);
    emitter
}

/// The id of the run whose stage runs on this thread (`Runtime.run_id`), if any: what
/// `mg.trigger` uses to reach the caller's own run when several run at once.
#[pyfunction]
pub fn current_run_id() -> Option<usize> {
    current().map(|emitter| emitter.shutdown.id())
}

/// `emit(value, to=None)`: send a value downstream from inside a running stage.
#[pyfunction]
#[pyo3(signature = (value, to=None))]
pub fn emit(py: Python<'_>, value: Item, to: Option<&str>) -> PyResult<()> {
    let Some(emitter) = current() else {
        return Err(PyRuntimeError::new_err(
            "emit() was called outside a running stage: call it from a stage function \
             (or a Stage's process/close) while the pipeline runs",
        ));
    };
    match to {
        None => {
            emitter.emit_default(py, value);
            Ok(())
        }
        Some(name) => emitter.emit_to(py, value, name),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::thread;

    const LONG: Duration = Duration::from_secs(10);

    #[test]
    fn a_flusher_with_an_item_waiting_does_not_doze() {
        let bell = FlusherBell::new();
        let started = Instant::now();
        bell.doze(LONG, || false);
        assert!(started.elapsed() < LONG / 2);
    }

    #[test]
    fn the_first_item_into_an_empty_outbox_wakes_a_dozing_flusher() {
        let bell = Arc::new(FlusherBell::new());
        let dozer = {
            let bell = bell.clone();
            thread::spawn(move || {
                let started = Instant::now();
                bell.doze(LONG, || true);
                started.elapsed()
            })
        };
        while !bell.dozing.load(Ordering::SeqCst) {
            thread::yield_now();
        }
        bell.item_waiting();
        assert!(dozer.join().unwrap() < LONG / 2);
        assert!(!bell.dozing.load(Ordering::SeqCst));
    }

    #[test]
    fn a_ring_before_the_doze_is_not_lost() {
        let bell = FlusherBell::new();
        bell.ring();
        let started = Instant::now();
        bell.doze(LONG, || true);
        assert!(started.elapsed() < LONG / 2);
    }
}
