//! The loops that run on worker threads: producers, processors (a pool of long-lived
//! threads, or a thread per item) and accumulators.
//!
//! Every loop waits for input without the GIL, then attaches once per chunk and calls the
//! user's function for each item of the chunk.

use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList};

use crate::accumulate::{Batcher, Limits};
use crate::call::call_one;
use crate::channel::{Recv, MAX_CHUNK, TARGET_CHUNK_NANOS, TARGET_CHUNK_NANOS_REMOTE};
use crate::emit::{self, Channel, Emitter, EmitterSlot, Item};
use crate::gil;
use crate::item::{end_worker, handle_failure, open_worker, process_one, Stop, WorkerCall};
use crate::pool::{join_all, refused_error, spawn_named, Semaphore, WorkHandle};
use crate::scheduler::{CallMode, Failure, Kind, StageShared};
use crate::thread_state::{self, python_thread};

/// Start the threads of one stage into `threads`. On the OS's refusal, returns how many
/// of the stage's threads did not start, with the error.
pub fn start_stage(
    stage: &Arc<StageShared>,
    threads: &mut Vec<WorkHandle>,
) -> Result<(), (usize, std::io::Error)> {
    let body: fn(&Arc<StageShared>) = match stage.kind {
        Kind::Producer => |s| run_producer(s),
        Kind::Accumulator => |s| run_accumulator(s),
        Kind::Processor if stage.spec.spawn_per_item => run_spawning,
        Kind::Processor => |s| run_processor(s),
    };
    let count = stage.threads();
    for i in 0..count {
        let s = stage.clone();
        let started = spawn_named(format!("minigun:{}:{}", stage.name, i), move || {
            python_thread(|| body(&s))
        });
        match started {
            Ok(handle) => threads.push(handle),
            Err(error) => return Err((count - i, error)),
        }
    }
    Ok(())
}

/// Set up a worker's emitter and per-worker call, run `body`, then close, flush, and
/// count the worker finished.
fn with_worker(stage: &StageShared, body: impl FnOnce(&WorkerCall, &Rc<Emitter>)) {
    worker_session(stage, body, |py| stage.worker_finished(py));
}

/// One worker's life: open its call, run `body`, then end it (`end_worker`: close it, flush
/// its outboxes, `last`).
///
/// Closing, the last flush and `last` share one hold of the GIL, the thread's last, which
/// also deletes its thread state: with 32 workers ending at once, every hold is a turn the
/// others wait through (docs/performance.md, W2).
fn worker_session(
    stage: &StageShared,
    body: impl FnOnce(&WorkerCall, &Rc<Emitter>),
    last: impl FnOnce(Python<'_>),
) {
    let slot = EmitterSlot::default();
    let _slot = emit::use_slot(&slot);
    let (emitter, worker) = open_worker(stage, &slot);
    let bound = slot.bind(&emitter);
    if let Some(worker) = &worker {
        body(worker, &emitter);
    }
    thread_state::attach_last(|py| {
        end_worker(py, stage, worker.as_ref(), &emitter, last);
        // The worker's call, and the inline stages its emitter opened with theirs, are
        // released here, under the GIL.
        drop(bound);
        drop((worker, emitter));
    });
}

fn run_producer(stage: &StageShared) {
    stage.stats.started();
    if !stage.wait_for_trigger() {
        thread_state::attach_last(|py| stage.end_unopened_workers(py, 1));
        return;
    }
    with_worker(stage, |worker, emitter| {
        // Busy time is added as the producer goes, so the live view sees it.
        let mut since = Instant::now();
        thread_state::attach(|py| {
            let Some(call) = worker.call(stage) else {
                return;
            };
            let produced = (|| -> PyResult<()> {
                let result = call.bind(py).call0()?;
                if result.is_none() {
                    return Ok(());
                }
                for (n, value) in result.try_iter()?.enumerate() {
                    if stage.run.shutdown.is_set() {
                        break;
                    }
                    emitter.emit_default(py, value?.unbind());
                    if n % MAX_CHUNK == MAX_CHUNK - 1 {
                        stage.run.tick(py);
                        stage.stats.add_busy(since.elapsed());
                        since = Instant::now();
                    }
                }
                Ok(())
            })();
            if let Err(error) = produced {
                if !stage.run.shutdown.is_set() {
                    stage.stats.add_error();
                    let _ = handle_failure(py, stage, error, None);
                }
            }
        });
        stage.stats.add_busy(since.elapsed());
    });
}

/// Wait (without the GIL) for the stage's next chunk; None at the end of the stream or
/// when the run stops.
fn next_chunk(stage: &StageShared, input: &Channel) -> Option<Vec<Item>> {
    loop {
        match input.recv(&stage.run.shutdown, None) {
            Recv::Chunk(items) => {
                stage.stats.started();
                return Some(merge_queued(input, items));
            }
            Recv::Timeout => continue,
            Recv::Closed | Recv::Shutdown => return None,
        }
    }
}

/// The next chunk if one is queued now, without waiting.
fn queued_chunk(input: &Channel) -> Option<Vec<Item>> {
    input.try_recv().map(|items| merge_queued(input, items))
}

/// Small chunks already queued behind `items` are merged in, up to the stage's preferred
/// size: senders that chunked before the stage's cost was known (or flushed early) do not
/// make it pay the per-chunk cost for each of them.
fn merge_queued(input: &Channel, mut items: Vec<Item>) -> Vec<Item> {
    while items.len() < input.preferred_chunk() {
        match input.try_recv() {
            Some(more) => items.extend(more),
            None => break,
        }
    }
    items
}

fn run_processor(stage: &StageShared) {
    let input = stage.input().expect("processors have an input").clone();
    with_worker(stage, |worker, emitter| {
        let Some(call) = worker.call(stage) else {
            return;
        };
        let target = if stage.mode == CallMode::Chunk {
            TARGET_CHUNK_NANOS_REMOTE
        } else {
            TARGET_CHUNK_NANOS
        };
        while let Some(items) = next_chunk(stage, &input) {
            // The GIL is kept from chunk to chunk while input is queued: giving it up costs
            // two context switches (more than a chunk of cheap items), and the interpreter
            // still hands it to the other threads every switch interval. It is given up
            // only to wait, after the buffered output is flushed.
            let stop = thread_state::attach(|py| {
                let call = call.bind(py);
                let mut items = items;
                loop {
                    let n = items.len();
                    let started = Instant::now();
                    let result = if stage.mode == CallMode::Chunk {
                        // Work done elsewhere, waited for with the GIL let go inside the
                        // call: not a hold for the other workers to poll on (gil.rs).
                        gil::uncounted(py, || run_chunk(py, stage, call, items))
                    } else {
                        run_items(py, stage, call, emitter, &input, items)
                    };
                    let spent = started.elapsed();
                    stage.stats.add_busy(spent);
                    input.observe_cost(n, spent.as_nanos() as u64, target);
                    stage.run.tick(py);
                    if result.is_err() || stage.run.shutdown.is_set() {
                        return true;
                    }
                    match queued_chunk(&input) {
                        Some(more) => items = more,
                        None => {
                            emitter.flush(py);
                            return false;
                        }
                    }
                }
            });
            if stop {
                break;
            }
        }
        // What no sender took back before the stream ended.
        let left = input.take_handed_back();
        if !left.is_empty() {
            thread_state::attach(|_py| drop(left));
        }
    });
}

/// A chunk's items are timed one in `n / 4` (at least four per chunk), and at most one in
/// this many: reading the clock costs as much as a trivial stage function (at one in 16,
/// the reads were 2% of W1's time in `perf`).
const LATENCY_SAMPLE: usize = 64;

fn run_items(
    py: Python<'_>,
    stage: &StageShared,
    call: &Bound<'_, PyAny>,
    emitter: &Emitter,
    input: &Channel,
    items: Vec<Item>,
) -> Result<(), Stop> {
    let n = items.len();
    stage.stats.add_in(n as u64);
    // Free-threaded builds: the items go back to the senders, which release them.
    let mut spent = input.hands_back().then(|| Vec::with_capacity(n));
    let every = (n / 4).clamp(1, LATENCY_SAMPLE);
    // Counted down rather than `k % every`: without a division per item, W1 ran about
    // 1.5% faster.
    let mut until_timed = 0;
    for (k, item) in items.into_iter().enumerate() {
        if stage.run.shutdown.is_set() {
            return Err(Stop);
        }
        let timer = (until_timed == 0).then(|| {
            until_timed = every;
            Instant::now()
        });
        until_timed -= 1;
        let item = item.into_bound(py);
        process_one(py, stage, call, emitter, &item)?;
        if let Some(spent) = spent.as_mut() {
            spent.push(item.unbind());
        }
        if let Some(t) = timer {
            stage
                .stats
                .record_latency_n(t.elapsed(), every.min(n - k) as u64);
        }
    }
    if let Some(spent) = spent {
        drop(input.hand_back(spent));
    }
    Ok(())
}

/// Chunk mode: the call takes the whole chunk as a list, emits through `emit()`, runs its
/// own retries, and returns None or `(retries, [(item, exception), ...])` for the items
/// that failed after their retries; those go to `on_error` here, one by one. A third
/// element, `[seconds, ...]`, gives each item's own latency (items of an async chunk
/// overlap, so the chunk's time divided by its items would be no item's latency).
fn run_chunk(
    py: Python<'_>,
    stage: &StageShared,
    call: &Bound<'_, PyAny>,
    items: Vec<Item>,
) -> Result<(), Stop> {
    let n = items.len() as u64;
    stage.stats.add_in(n);
    let t = Instant::now();
    let list = PyList::new(py, items).map_err(|_| Stop)?;
    let report = call.call1((&list,)).and_then(|report| {
        if report.is_none() {
            return Ok((0, Vec::new(), None));
        }
        if let Ok((retries, failures, latencies)) =
            report.extract::<(u64, Vec<(Item, Item)>, Vec<f64>)>()
        {
            return Ok((retries, failures, Some(latencies)));
        }
        report
            .extract::<(u64, Vec<(Item, Item)>)>()
            .map(|(r, f)| (r, f, None))
    });
    match &report {
        Ok((_, _, Some(latencies))) => {
            for &seconds in latencies {
                stage.stats.record_latency(
                    Duration::try_from_secs_f64(seconds.max(0.0)).unwrap_or(Duration::MAX),
                );
            }
        }
        _ => stage
            .stats
            .record_latency_n(t.elapsed() / (n.max(1) as u32), n),
    }
    match report {
        Ok((retries, failures, _)) => {
            for _ in 0..retries {
                stage.stats.add_retry();
            }
            for (item, error) in failures {
                stage.stats.add_error();
                handle_failure(
                    py,
                    stage,
                    PyErr::from_value(error.into_bound(py)),
                    Some(item.bind(py)),
                )?;
            }
            Ok(())
        }
        // The chunk as a whole failed (the run is stopping, or the call itself broke).
        Err(error) => {
            if stage.run.shutdown.is_set() {
                return Err(Stop);
            }
            stage.stats.add_error();
            handle_failure(py, stage, error, Some(list.as_any()))
        }
    }
}

/// `spawn_thread`: a new thread per input item, at most `workers` alive at once.
fn run_spawning(stage: &Arc<StageShared>) {
    let input = stage.input().expect("processors have an input").clone();
    let limit = stage.spec.workers.max(1);
    let slots = Arc::new(Semaphore::new(limit));
    // This thread only hands items out: each spawned thread is a worker of its own.
    {
        let mut children: Vec<WorkHandle> = Vec::new();
        while let Some(items) = next_chunk(stage, &input) {
            stage.stats.add_in(items.len() as u64);
            for item in items {
                if !slots.acquire(&stage.run.shutdown) {
                    thread_state::attach(|_py| drop(item));
                    continue;
                }
                let (worker_stage, worker_slots) = (stage.clone(), slots.clone());
                let spawned = spawn_named(format!("minigun:{}:spawned", stage.name), move || {
                    python_thread(|| run_spawned(&worker_stage, item));
                    worker_slots.release();
                });
                match spawned {
                    Ok(handle) => children.push(handle),
                    Err(error) => {
                        // The item went with the closure the OS refused to run.
                        slots.release();
                        stage.run.fail(Failure {
                            stage: stage.name.clone(),
                            error: refused_error(&stage.name, &error),
                            item: None,
                        });
                        break;
                    }
                }
                if children.len() > 4 * limit {
                    // Join finished threads now and then so the handle list stays short.
                    let (done, running): (Vec<_>, Vec<_>) =
                        children.drain(..).partition(|h| h.is_finished());
                    join_all(done);
                    children = running;
                }
            }
        }
        // Every spawned thread sends through its own outboxes: they must all be done
        // before this stage reports the end of its stream downstream.
        join_all(children);
    }
    thread_state::attach_last(|py| stage.worker_finished(py));
}

/// One spawned thread: a worker with a single item (a custom Stage is opened and closed
/// around it, in this thread).
fn run_spawned(stage: &StageShared, item: Item) {
    let serve = |worker: &WorkerCall, emitter: &Rc<Emitter>| {
        thread_state::attach(|py| {
            let item = item.into_bound(py);
            let Some(call) = worker.call(stage) else {
                return;
            };
            let t = Instant::now();
            if process_one(py, stage, call.bind(py), emitter, &item).is_ok() {
                stage.stats.record_latency(t.elapsed());
            }
            stage.stats.add_busy(t.elapsed());
        });
    };
    worker_session(stage, serve, |_py| {});
}

/// The batch slot of an item's key. Keys live in a Python dict, so Python's hash and
/// equality decide which keys are the same; a key seen for the first time gets a new slot.
fn key_slot(
    slots: &Bound<'_, PyDict>,
    key_fn: &Bound<'_, PyAny>,
    item: &Bound<'_, PyAny>,
    next_slot: &mut u64,
) -> PyResult<(u64, Item)> {
    let key = call_one(key_fn, item)?;
    if let Some(slot) = slots.get_item(&key)? {
        return Ok((slot.extract()?, key.unbind()));
    }
    *next_slot += 1;
    slots.set_item(&key, *next_slot)?;
    Ok((*next_slot, key.unbind()))
}

fn run_accumulator(stage: &StageShared) {
    let input = stage.input().expect("accumulators have an input").clone();
    let spec = &stage.spec;
    let mut batcher: Batcher<Option<Item>, Item> = Batcher::new(Limits {
        max_size: spec.max_size,
        max_all: spec.max_all,
        check_interval: spec.check_interval,
        max_wait: spec.max_wait.map(Duration::from_secs_f64),
    });
    let mut next_slot = 0u64;
    let slots: Option<Py<PyDict>> = spec
        .key
        .as_ref()
        .map(|_| thread_state::attach(|py| PyDict::new(py).unbind()));
    with_worker(stage, |worker, emitter| {
        let body = worker.call(stage);
        let flush = |py: Python<'_>,
                     batches: Vec<crate::accumulate::Batch<Option<Item>, Item>>|
         -> Result<(), Stop> {
            for batch in batches {
                // A stopping run starts no more batch bodies (a drain may hold many).
                if stage.run.shutdown.is_set() {
                    return Err(Stop);
                }
                if let (Some(slots), Some(key)) = (&slots, &batch.key) {
                    let _ = slots.bind(py).del_item(key.bind(py));
                }
                let list = PyList::new(py, batch.items).map_err(|_| Stop)?;
                let t = Instant::now();
                match body {
                    Some(body) => process_one(py, stage, body.bind(py), emitter, list.as_any())?,
                    None => emitter.emit_default(py, list.into_any().unbind()),
                }
                stage.stats.record_latency(t.elapsed());
            }
            Ok(())
        };
        // The slots and key function of a keyed accumulator.
        let keyed = slots.as_ref().zip(spec.key.as_ref());
        // Batches handed to the emitter since it was last flushed.
        let mut unflushed = false;
        loop {
            let step = match input.recv(&stage.run.shutdown, batcher.next_deadline()) {
                Recv::Chunk(items) => {
                    let started = Instant::now();
                    // Items taken in this step: the chunk, and what queued up behind it.
                    let mut n = items.len();
                    stage.stats.started();
                    stage.stats.add_in(n as u64);
                    // The chunk's arrival time opens its batches: one clock read per chunk
                    // (a read per item costs as much as the push), and a batch that waits
                    // is flushed at most a chunk's time early.
                    let batched = match keyed {
                        // Unkeyed items are batched without the GIL: a push only moves a
                        // reference. The GIL is taken once a batch is due (once per
                        // `max_size` items), not per chunk, and the stage batches while the
                        // threads feeding it run Python.
                        None => {
                            let mut due = Vec::new();
                            for item in items {
                                due.extend(batcher.push(0, || None, item, started));
                            }
                            if due.is_empty() && !(unflushed && input.is_empty()) {
                                Ok(())
                            } else {
                                thread_state::attach(|py| {
                                    // What queued up while this waited for the GIL is taken
                                    // first: that makes room for the senders, which then
                                    // wake while this stage makes its batches, not after
                                    // (W4 about 1.08x faster). What is queued now, and the
                                    // chunk a sender waiting for room sends once this makes
                                    // some, but no more: on a free-threaded build senders go
                                    // on sending meanwhile, and many of them could keep this
                                    // loop, and its due batches, growing.
                                    let mut due = due;
                                    let mut budget = input.queued_items() + MAX_CHUNK;
                                    while budget > 0 {
                                        let Some(more) = input.try_recv() else {
                                            break;
                                        };
                                        budget = budget.saturating_sub(more.len());
                                        n += more.len();
                                        stage.stats.add_in(more.len() as u64);
                                        for item in more {
                                            due.extend(batcher.push(0, || None, item, started));
                                        }
                                    }
                                    unflushed |= !due.is_empty();
                                    flush(py, due)?;
                                    stage.run.tick(py);
                                    if input.is_empty() {
                                        emitter.flush(py);
                                        unflushed = false;
                                    }
                                    Ok(())
                                })
                            }
                        }
                        Some((slots, key_fn)) => thread_state::attach(|py| {
                            let (slots, key_fn) = (slots.bind(py), key_fn.bind(py));
                            for item in items {
                                if stage.run.shutdown.is_set() {
                                    return Err(Stop);
                                }
                                let found = key_slot(slots, key_fn, item.bind(py), &mut next_slot);
                                let (slot, key) = match found {
                                    Ok(found) => found,
                                    Err(error) => {
                                        stage.stats.add_error();
                                        handle_failure(py, stage, error, Some(item.bind(py)))?;
                                        continue;
                                    }
                                };
                                flush(py, batcher.push(slot, || Some(key), item, started))?;
                            }
                            stage.run.tick(py);
                            if input.is_empty() {
                                emitter.flush(py);
                            }
                            Ok(())
                        }),
                    };
                    let spent = started.elapsed();
                    stage.stats.add_busy(spent);
                    input.observe_cost(n, spent.as_nanos() as u64, TARGET_CHUNK_NANOS);
                    batched.map(|()| false)
                }
                Recv::Timeout => thread_state::attach(|py| {
                    let started = Instant::now();
                    flush(py, batcher.expired(Instant::now()))?;
                    stage.stats.add_busy(started.elapsed());
                    emitter.flush(py);
                    unflushed = false;
                    Ok(false)
                }),
                Recv::Closed => {
                    thread_state::attach(|py| flush(py, batcher.drain()).map(|()| true))
                }
                Recv::Shutdown => Ok(true),
            };
            if !matches!(step, Ok(false)) {
                break;
            }
        }
        thread_state::attach(|_py| {
            drop(batcher.drain());
            drop(slots);
        });
    });
}
