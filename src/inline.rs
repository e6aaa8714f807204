//! `inline` stages that run on their sender's thread: "the scheduler itself, one item at a
//! time" (API.md).
//!
//! An `inline` processor or consumer whose only input is one edge from a stage running on
//! one runtime thread (a producer, an accumulator, a one-thread `threads` stage, another
//! such `inline` stage) has no queue and no thread of its own: its sender's emitter calls
//! it for each item it sends, on the sender's thread, under the hold of the GIL the sender
//! already has (`Edge::Inline`). Where that does not hold (several senders, a sender with
//! several threads, a pool of processes or an event loop) it keeps a thread of its own
//! and takes one item at a time from its queue.
//!
//! The item contract is the one every worker keeps (`item.rs`): retries whose failed
//! attempts deliver nothing, `on_error` offered the item, one worker opened and closed.
//! The worker is opened when the sender's worker starts, and closed after the sender's
//! worker finished, in the order a stage with a thread of its own would see: its input
//! ends, it closes, it finishes.

use std::cell::Cell;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use pyo3::prelude::*;

use crate::emit::{Emitter, EmitterSlot, InlineTarget, Item};
use crate::item::{end_worker, open_worker, process_one, WorkerCall};
use crate::scheduler::StageShared;

/// A fast stage times one item in this many: a clock read costs about as much as a trivial
/// stage function. A stage whose timed item took longer than `TIME_EVERY_ITEM_OVER` times
/// every item.
const TIME_ONE_IN: u64 = 64;
const TIME_EVERY_ITEM_OVER: Duration = Duration::from_micros(20);

pub struct InlineStage {
    stage: Arc<StageShared>,
    emitter: Rc<Emitter>,
    /// Its sender's thread's emitter slot: `emit()` reaches this stage while it runs.
    slot: EmitterSlot,
    /// None: opening it failed (the run is failing), and items are dropped.
    worker: Option<WorkerCall>,
    started: Cell<bool>,
    /// Items taken since the stage's stats were last told.
    untold: Cell<u64>,
    /// Items to take before the next one is timed.
    until_timed: Cell<u64>,
    /// The last timed item's latency: it stands for the items not timed.
    last_latency: Cell<Duration>,
}

impl InlineStage {
    /// Open `stage`'s one worker, on its sender's thread, as its sender's worker starts.
    pub fn open(stage: Arc<StageShared>, slot: &EmitterSlot) -> Box<dyn InlineTarget> {
        let (emitter, worker) = open_worker(&stage, slot);
        Box::new(InlineStage {
            stage,
            emitter,
            slot: slot.clone(),
            worker,
            started: Cell::new(false),
            untold: Cell::new(0),
            until_timed: Cell::new(0),
            last_latency: Cell::new(Duration::ZERO),
        })
    }

    /// Tell the stats about the items taken since last time: the last timed latency
    /// stands for each of them, and for their busy time.
    fn tell_stats(&self) {
        let n = self.untold.replace(0);
        if n == 0 {
            return;
        }
        let stats = &self.stage.stats;
        // One item at a time: each is a chunk of its own.
        stats.add_items(n, n);
        let latency = self.last_latency.get();
        stats.record_latency_n(latency, n);
        stats.add_busy(latency * n as u32);
    }
}

impl InlineTarget for InlineStage {
    fn take(&self, py: Python<'_>, item: Item) {
        let stage = &*self.stage;
        let Some(call) = self.worker.as_ref().and_then(|w| w.call(stage)) else {
            return; // dropped here, under the GIL
        };
        if stage.run.shutdown.is_set() {
            return;
        }
        if !self.started.replace(true) {
            stage.stats.started();
        }
        self.untold.set(self.untold.get() + 1);
        let until_timed = self.until_timed.get();
        let timer = (until_timed == 0).then(Instant::now);
        self.until_timed.set(until_timed.saturating_sub(1));
        let _bound = self.slot.bind(&self.emitter);
        let item = item.into_bound(py);
        // A failure is recorded by the run (or taken by `on_error`): the sender sees the
        // run stopping before its next item.
        let _ = process_one(py, stage, call.bind(py), &self.emitter, &item);
        if let Some(t) = timer {
            let latency = t.elapsed();
            self.last_latency.set(latency);
            let every = if latency > TIME_EVERY_ITEM_OVER {
                1
            } else {
                TIME_ONE_IN
            };
            self.until_timed.set(every - 1);
            self.tell_stats();
        }
    }

    fn flush(&self, py: Python<'_>) {
        self.tell_stats();
        self.emitter.flush(py);
    }

    fn finish(&self, py: Python<'_>) {
        self.tell_stats();
        let stage = &*self.stage;
        let _bound = self.slot.bind(&self.emitter);
        end_worker(py, stage, self.worker.as_ref(), &self.emitter, |py| {
            stage.worker_finished(py)
        });
    }
}
