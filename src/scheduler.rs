//! The run: builds channels and stages from the graph the Python layer compiled, starts
//! every worker, tracks which stages finished, records the first failure and tears down.

use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock, Weak};
use std::time::{Duration, Instant};

use pyo3::exceptions::{PyRuntimeError, PyValueError};
use pyo3::prelude::*;
use pyo3::pyclass::{PyTraverseError, PyVisit};
use pyo3::types::PyDict;

use crate::emit::{Channel, Edge, EmitterSlot, FlusherBell, Item, Outbox, Routes};
use crate::gil;
use crate::inline::InlineStage;
use crate::pool::{join_all, refused_error, spawn_named, WorkHandle};
use crate::shutdown::Shutdown;
pub use crate::spec::{CallMode, Kind, StageSpec};
use crate::stats::StageStats;
use crate::worker;

/// The first error that stopped the run.
pub struct Failure {
    pub stage: String,
    pub error: PyErr,
    pub item: Option<Item>,
}

/// State shared by every thread of one run.
pub struct RunShared {
    pub shutdown: Shutdown,
    pub channels: Vec<Option<Arc<Channel>>>,
    failure: Mutex<Option<Failure>>,
    outboxes: Mutex<Vec<Weak<Outbox>>>,
    /// Wakes the flusher from a doze (see `flusher`).
    flusher_bell: Arc<FlusherBell>,
    stages_left: Mutex<usize>,
    all_done: Condvar,
    /// Free-threaded builds only: a Python no-op each worker runs now and then. There a
    /// thread owns the reference counts of the objects it made; other threads hand their
    /// decrements back to it, and it merges them only when it runs bytecode. A worker that
    /// runs none (a body-less accumulator, a C function as stage) would keep those objects
    /// alive, so every worker loop ticks.
    pub merge_tick: Option<Item>,
    /// GIL builds: an accumulator passes the batches its downstream hands back on to its
    /// own senders (see [`hand_back_plan`]).
    pass_back_batches: bool,
}

impl RunShared {
    /// Run the merge tick (free-threaded builds): see `merge_tick`.
    pub fn tick(&self, py: Python<'_>) {
        if let Some(tick) = &self.merge_tick {
            let _ = tick.bind(py).call0();
        }
    }

    /// Record `failure` unless an earlier one is already recorded, and stop the run.
    pub fn fail(&self, failure: Failure) {
        {
            let mut slot = self.failure.lock().unwrap();
            if slot.is_none() {
                *slot = Some(failure);
            }
        }
        self.stop();
    }

    pub fn stop(&self) {
        self.shutdown.set();
        for channel in self.channels.iter().flatten() {
            channel.wake_senders();
        }
        self.flusher_bell.ring();
    }

    pub fn register_outbox(&self, outbox: &Arc<Outbox>) {
        let mut all = self.outboxes.lock().unwrap();
        if all.len() > 64 && all.len().is_power_of_two() {
            all.retain(|w| w.strong_count() > 0);
        }
        all.push(Arc::downgrade(outbox));
    }

    fn stage_finished(&self) {
        let mut left = self.stages_left.lock().unwrap();
        *left -= 1;
        if *left == 0 {
            self.all_done.notify_all();
        }
    }

    /// Wait until every stage has finished (true) or `deadline` passes (false).
    fn wait_done(&self, deadline: Option<Instant>) -> bool {
        let mut left = self.stages_left.lock().unwrap();
        while *left > 0 {
            match deadline {
                None => left = self.all_done.wait(left).unwrap(),
                Some(d) => {
                    let now = Instant::now();
                    if now >= d {
                        return false;
                    }
                    left = self.all_done.wait_timeout(left, d - now).unwrap().0;
                }
            }
        }
        true
    }

    fn is_done(&self) -> bool {
        *self.stages_left.lock().unwrap() == 0
    }

    /// The outboxes of workers still running (listed without holding the list's lock).
    fn live_outboxes(&self) -> Vec<Arc<Outbox>> {
        let all = self.outboxes.lock().unwrap();
        all.iter().filter_map(Weak::upgrade).collect()
    }

    /// Send on what waited in an outbox for over `FLUSH_MAX_AGE` (see [`flusher`]); whether
    /// items are still buffered somewhere.
    fn flush_stale(&self) -> bool {
        let mut buffered = false;
        for outbox in self.live_outboxes() {
            buffered |= outbox.flush_stale(FLUSH_MAX_AGE);
        }
        buffered
    }

    fn outboxes_empty(&self) -> bool {
        self.live_outboxes().iter().all(|outbox| outbox.is_empty())
    }
}

const TRIGGER_WAITING: u8 = 0;
const TRIGGER_FIRED: u8 = 1;
const TRIGGER_NONE: u8 = 2;

/// One stage of a run, shared by its workers.
pub struct StageShared {
    pub index: usize,
    pub name: String,
    pub kind: Kind,
    pub mode: CallMode,
    pub spec: StageSpec,
    pub routes: Arc<Routes>,
    pub stats: Arc<StageStats>,
    pub run: Arc<RunShared>,
    /// An `inline` stage that runs on its sender's thread (`inline.rs`): no input queue, no
    /// thread of its own.
    pub on_senders_thread: bool,
    /// Per downstream edge, the receiving stage where it runs on this stage's thread.
    inline_targets: OnceLock<Vec<Option<Arc<StageShared>>>>,
    workers_left: AtomicUsize,
    trigger: AtomicU8,
    trigger_lock: Mutex<()>,
    triggered: Condvar,
}

impl StageShared {
    pub fn input(&self) -> Option<&Arc<Channel>> {
        self.run.channels[self.index].as_ref()
    }

    /// How many runtime threads the stage starts (none for an `inline` stage that runs on
    /// its sender's).
    pub fn threads(&self) -> usize {
        if self.on_senders_thread {
            0
        } else {
            self.spec.thread_count()
        }
    }

    /// Per downstream edge, the receiving stage where it runs on this stage's thread.
    fn inline_targets(&self) -> &[Option<Arc<StageShared>>] {
        self.inline_targets.get().expect("set when the run is made")
    }

    /// A new worker's downstream edges, one per edge: an outbox, or the receiving
    /// `inline` stage itself, opened on this thread (whose emitter slot is `slot`).
    pub fn edges(&self, slot: &EmitterSlot) -> Vec<Edge> {
        self.spec
            .downstream
            .iter()
            .zip(self.inline_targets())
            .map(|(&target, inline)| match inline {
                Some(stage) => Edge::Inline(InlineStage::open(stage.clone(), slot)),
                None => Edge::Queue(self.outbox_to(target)),
            })
            .collect()
    }

    fn outbox_to(&self, target: usize) -> Arc<Outbox> {
        let channel = self.run.channels[target]
            .clone()
            .expect("downstream stages have an input");
        let pass_back = match self.kind {
            Kind::Accumulator if self.run.pass_back_batches => self.input().cloned(),
            _ => None,
        };
        let outbox = Outbox::new(
            channel,
            pass_back,
            self.stats.clone(),
            self.run.flusher_bell.clone(),
        );
        self.run.register_outbox(&outbox);
        outbox
    }

    /// `n` workers of this stage end without having been opened (their thread was not
    /// started, or a producer was never triggered): count them finished, and with the
    /// last, the `inline` stages that would have run on its thread.
    pub fn end_unopened_workers(&self, py: Python<'_>, n: usize) {
        for _ in 0..n {
            self.worker_finished(py);
        }
        if n == 0 {
            return;
        }
        for stage in self.inline_targets().iter().flatten() {
            stage.end_unopened_workers(py, 1);
        }
    }

    /// Producers with `auto_start=False` wait here until triggered or the run stops.
    pub fn wait_for_trigger(&self) -> bool {
        let mut guard = self.trigger_lock.lock().unwrap();
        while self.trigger.load(Ordering::Acquire) == TRIGGER_WAITING {
            if self.run.shutdown.is_set() {
                return false;
            }
            guard = self
                .triggered
                .wait_timeout(guard, Duration::from_millis(50))
                .unwrap()
                .0;
        }
        true
    }

    /// A worker is done. The last one runs the `after` hook and closes the downstream edges.
    pub fn worker_finished(&self, py: Python<'_>) {
        if self.workers_left.fetch_sub(1, Ordering::AcqRel) != 1 {
            return;
        }
        if let Some(hook) = &self.spec.on_finish {
            if !self.run.shutdown.is_set() {
                if let Err(error) = hook.bind(py).call0() {
                    self.run.fail(Failure {
                        stage: self.name.clone(),
                        error,
                        item: None,
                    });
                }
            }
        }
        self.stats.finished();
        for &target in &self.spec.downstream {
            if let Some(channel) = &self.run.channels[target] {
                channel.upstream_finished();
            }
        }
        self.run.stage_finished();
    }
}

/// A pipeline run inside the Rust runtime.
#[pyclass(frozen, module = "minigun._minigun")]
pub struct Runtime {
    run: Arc<RunShared>,
    stages: Vec<Arc<StageShared>>,
    threads: Mutex<Vec<WorkHandle>>,
    /// When the run was started (None: not yet).
    started: Mutex<Option<Instant>>,
    /// Whether the run's flusher has a thread of its own yet (see `wait_until`).
    flusher_thread: Mutex<bool>,
    owner_pid: u32,
}

impl Runtime {
    /// The run's stop signal (the child table of a run with fork stages watches it).
    pub fn shutdown(&self) -> &Shutdown {
        &self.run.shutdown
    }

    /// Wait without the GIL until every stage has finished (true) or `deadline` passes
    /// (false).
    ///
    /// For the run's first `FLUSHER_THREAD_AFTER`, the waiting thread is also its flusher,
    /// looking at the outboxes every `FLUSH_TICK`. A run still going after that, or when
    /// this returns early (the caller then runs Python code, hooks included, for as long
    /// as it takes), gets a flusher thread of its own. Most one-item runs end before: a
    /// thread started and joined per run made W5 15% slower.
    fn wait_until(&self, deadline: Option<Instant>) -> bool {
        let Some(started) = *self.started.lock().unwrap() else {
            return self.run.wait_done(deadline);
        };
        if !*self.flusher_thread.lock().unwrap() {
            let thread_at = started + FLUSHER_THREAD_AFTER;
            loop {
                let now = Instant::now();
                if now >= thread_at || deadline.is_some_and(|d| now >= d) {
                    break;
                }
                let tick = (now + FLUSH_TICK).min(thread_at);
                if self
                    .run
                    .wait_done(Some(deadline.map_or(tick, |d| d.min(tick))))
                {
                    return true;
                }
                self.run.flush_stale();
            }
            self.start_flusher_thread();
        }
        self.run.wait_done(deadline)
    }

    /// Give the run's flusher a thread of its own, once, unless every stage has finished.
    /// If the OS refuses the thread, the run fails with that error.
    fn start_flusher_thread(&self) {
        let mut threads = self.threads.lock().unwrap();
        let mut flusher_thread = self.flusher_thread.lock().unwrap();
        if *flusher_thread || self.run.is_done() {
            return;
        }
        *flusher_thread = true;
        let run = self.run.clone();
        match spawn_named("minigun-flusher".into(), move || flusher(run)) {
            Ok(handle) => threads.push(handle),
            Err(error) => self.run.fail(Failure {
                stage: "minigun-flusher".into(),
                error: refused_error("minigun-flusher", &error),
                item: None,
            }),
        }
    }

    fn check_process(&self) -> PyResult<()> {
        if std::process::id() != self.owner_pid {
            return Err(PyRuntimeError::new_err(
                "this minigun run belongs to the parent process: a forked child cannot use, \
                 wait for or cancel it (start a new run in the child instead)",
            ));
        }
        Ok(())
    }
}

/// Whether this CPython is a free-threaded build: "t" in `sys.abiflags` says so where
/// there are ABI flags (POSIX). Only where there are none does `sysconfig` answer: importing
/// it made a process's first run 0.8 ms slower.
fn free_threaded_build(py: Python<'_>) -> PyResult<bool> {
    match py.import("sys")?.getattr("abiflags") {
        Ok(flags) => Ok(flags.extract::<String>()?.contains('t')),
        Err(_) => py
            .import("sysconfig")?
            .call_method1("get_config_var", ("Py_GIL_DISABLED",))?
            .is_truthy(),
    }
}

/// Which stages run on their sender's thread (`inline.rs`): an `inline` processor whose
/// only input is one edge from a stage with one runtime thread that calls its code per item
/// (not a pool, not a thread per item, not a stage whose chunks go to processes, actors or
/// an event loop). `senders` lists, per stage, the sender of each edge into it.
fn on_senders_thread_plan(specs: &[StageSpec], senders: &[Vec<usize>]) -> Vec<bool> {
    let one_thread = |spec: &StageSpec| {
        spec.thread_count() == 1 && !spec.spawn_per_item && spec.mode != CallMode::Chunk
    };
    specs
        .iter()
        .zip(senders)
        .map(|(spec, edges_in)| {
            spec.inline
                && spec.kind == Kind::Processor
                && one_thread(spec)
                && matches!(edges_in[..], [sender] if one_thread(&specs[sender]))
        })
        .collect()
}

/// Which stages' inputs hand the items their receiver is done with back to the senders, to
/// be released by the thread that made them (see [`ItemChannel::hand_back`]).
///
/// * Free-threaded builds: every one. There an object's reference count belongs to the
///   thread that made it, and a release by any other thread is queued to it.
/// * With the GIL: where it costs a hand-back per batch, not per item, and saves a release
///   per record. That is a stage fed only by accumulators (its items are batches), and an
///   accumulator's own input: an accumulator passes on what its downstream hands back
///   (`Outbox::new`'s `pass_back`), so the records are released by the thread that made
///   them, from memory still in its core's cache, just before it makes the next ones (W4
///   went from 0.92x to 1.02x the plain loop). Per item (W1) it costs more than it saves
///   (docs/performance.md).
///
/// An accumulator makes its batch lists, so on a free-threaded build a list is released
/// where it was made whoever drops it last: there nothing is passed on.
fn hand_back_plan(specs: &[StageSpec], free_threaded: bool) -> Vec<bool> {
    let mut fed_by_batches = vec![true; specs.len()];
    for spec in specs {
        if spec.kind != Kind::Accumulator {
            for &target in &spec.downstream {
                fed_by_batches[target] = false;
            }
        }
    }
    specs
        .iter()
        .zip(fed_by_batches)
        .map(|(spec, batches)| free_threaded || spec.kind == Kind::Accumulator || batches)
        .collect()
}

#[pymethods]
impl Runtime {
    #[new]
    fn new(py: Python<'_>, specs: Vec<Bound<'_, PyDict>>) -> PyResult<Self> {
        let specs = specs
            .iter()
            .map(StageSpec::from_dict)
            .collect::<PyResult<Vec<_>>>()?;
        let free_threaded = free_threaded_build(py)?;
        gil::configure(free_threaded);
        let n = specs.len();
        // Per stage, the sender of each edge into it, in the senders' order.
        let mut senders: Vec<Vec<usize>> = vec![Vec::new(); n];
        for (index, spec) in specs.iter().enumerate() {
            for &t in &spec.downstream {
                let Some(edges_in) = senders.get_mut(t) else {
                    return Err(PyValueError::new_err(format!(
                        "stage {:?} sends to unknown index {t}",
                        spec.name
                    )));
                };
                edges_in.push(index);
            }
        }
        // A channel counts its upstream stages, not their edges to it.
        let upstreams: Vec<usize> = senders
            .iter()
            .map(|edges_in| {
                let mut stages = edges_in.clone();
                stages.dedup();
                stages.len()
            })
            .collect();
        let hands_back = hand_back_plan(&specs, free_threaded);
        let on_senders_thread = on_senders_thread_plan(&specs, &senders);
        let channels = specs
            .iter()
            .enumerate()
            .map(|(i, spec)| {
                (spec.kind != Kind::Producer && !on_senders_thread[i]).then(|| {
                    Arc::new(Channel::for_receiver(
                        spec.queue_size,
                        upstreams[i],
                        spec.thread_count(),
                        spec.min_chunk,
                        hands_back[i],
                    ))
                })
            })
            .collect();
        let run = Arc::new(RunShared {
            shutdown: Shutdown::new(),
            channels,
            failure: Mutex::new(None),
            outboxes: Mutex::new(Vec::new()),
            flusher_bell: Arc::new(FlusherBell::new()),
            stages_left: Mutex::new(n),
            all_done: Condvar::new(),
            merge_tick: if free_threaded {
                Some(
                    py.import("minigun.context")?
                        .getattr("merge_tick")?
                        .unbind(),
                )
            } else {
                None
            },
            pass_back_batches: !free_threaded,
        });
        let mut stages = Vec::with_capacity(n);
        for (index, spec) in specs.into_iter().enumerate() {
            let (kind, mode, routing) = (spec.kind, spec.mode, spec.routing);
            let routes = Arc::new(Routes {
                stage_name: spec.name.clone(),
                routing,
                by_name: spec.route_names.clone(),
                route_error: spec.route_error.clone_ref(py),
            });
            let workers = spec.thread_count();
            let trigger = if kind == Kind::Producer && !spec.auto_start {
                TRIGGER_WAITING
            } else {
                TRIGGER_NONE
            };
            stages.push(Arc::new(StageShared {
                index,
                name: spec.name.clone(),
                kind,
                mode,
                spec,
                routes,
                stats: Arc::new(StageStats::new()),
                run: run.clone(),
                on_senders_thread: on_senders_thread[index],
                inline_targets: OnceLock::new(),
                workers_left: AtomicUsize::new(workers),
                trigger: AtomicU8::new(trigger),
                trigger_lock: Mutex::new(()),
                triggered: Condvar::new(),
            }));
        }
        for stage in &stages {
            let inline_targets = stage
                .spec
                .downstream
                .iter()
                .map(|&target| on_senders_thread[target].then(|| stages[target].clone()))
                .collect();
            let _ = stage.inline_targets.set(inline_targets);
        }
        Ok(Runtime {
            run,
            stages,
            threads: Mutex::new(Vec::new()),
            started: Mutex::new(None),
            flusher_thread: Mutex::new(false),
            owner_pid: std::process::id(),
        })
    }

    /// The stage specs hold callbacks into the Run that owns this runtime (a reference
    /// cycle through a Rust object): showing them to the garbage collector lets it free a
    /// finished run, its graph and its Task.
    fn __traverse__(&self, visit: PyVisit<'_>) -> Result<(), PyTraverseError> {
        for stage in &self.stages {
            stage.spec.traverse(&visit)?;
            visit.call(&stage.routes.route_error)?;
        }
        visit.call(&self.run.merge_tick)
    }

    /// Start every worker thread (the flusher starts with the first wait, `wait_until`).
    /// If the OS refuses a thread, the run fails with that error: the workers not started
    /// count as finished, so the threads that did start see the shutdown and end.
    fn start(&self, py: Python<'_>) -> PyResult<()> {
        self.check_process()?;
        let mut started = self.started.lock().unwrap();
        if started.is_some() {
            return Err(PyRuntimeError::new_err("this run was already started"));
        }
        *started = Some(Instant::now());
        let mut threads = self.threads.lock().unwrap();
        if self.stages.is_empty() {
            return Ok(());
        }
        for (index, stage) in self.stages.iter().enumerate() {
            if let Err((missing, error)) = worker::start_stage(stage, &mut threads) {
                self.run.fail(Failure {
                    stage: stage.name.clone(),
                    error: refused_error(&stage.name, &error),
                    item: None,
                });
                // An inline stage on a sender's thread ends with that sender's worker.
                stage.end_unopened_workers(py, missing);
                for later in &self.stages[index + 1..] {
                    later.end_unopened_workers(py, later.threads());
                }
                return Ok(());
            }
        }
        Ok(())
    }

    /// Wait up to `timeout` seconds (forever if None) without holding the GIL. True when
    /// every stage has finished.
    #[pyo3(signature = (timeout=None))]
    fn wait(&self, py: Python<'_>, timeout: Option<f64>) -> PyResult<bool> {
        self.check_process()?;
        let deadline = timeout.map(|t| Instant::now() + Duration::from_secs_f64(t));
        Ok(py.detach(|| self.wait_until(deadline)))
    }

    /// Join the threads of a finished (or cancelled) run and drop what is still queued.
    fn join(&self, py: Python<'_>) -> PyResult<()> {
        self.check_process()?;
        if self.started.lock().unwrap().is_none() {
            // Never started (a before-hook failed): nothing runs, nothing to wait for.
            *self.run.stages_left.lock().unwrap() = 0;
            self.run.stop();
            return Ok(());
        }
        py.detach(|| {
            // Normally every stage has finished by now; if not, nothing flushes but a
            // flusher thread.
            self.start_flusher_thread();
            self.run.wait_done(None);
            // Ends the flusher.
            self.run.stop();
            // Taken once every stage finished: no flusher thread can start after this.
            let handles = std::mem::take(&mut *self.threads.lock().unwrap());
            join_all(handles);
        });
        for channel in self.run.channels.iter().flatten() {
            drop(channel.drain());
        }
        Ok(())
    }

    /// Stop the run: workers finish the item in hand and exit.
    fn cancel(&self) -> PyResult<()> {
        self.check_process()?;
        self.run.stop();
        Ok(())
    }

    #[getter]
    fn finished(&self) -> bool {
        self.run.is_done()
    }

    #[getter]
    fn stopping(&self) -> bool {
        self.run.shutdown.is_set()
    }

    /// Whether items wait in the input queue of stage `index`: an async stage's window
    /// hands control back to take them while its other items are still in flight.
    fn input_waiting(&self, index: usize) -> bool {
        self.stages
            .get(index)
            .and_then(|stage| stage.input())
            .is_some_and(|input| !input.is_empty())
    }

    /// This run's id, as `current_run_id()` reports it on the run's worker threads.
    #[getter]
    fn run_id(&self) -> usize {
        self.run.shutdown.id()
    }

    /// Start a waiting `auto_start=False` producer. "ok", "not_producer" or "already".
    fn trigger(&self, index: usize) -> PyResult<&'static str> {
        self.check_process()?;
        let stage = self
            .stages
            .get(index)
            .ok_or_else(|| PyValueError::new_err("no such stage"))?;
        if stage.kind != Kind::Producer {
            return Ok("not_producer");
        }
        let _guard = stage.trigger_lock.lock().unwrap();
        match stage.trigger.compare_exchange(
            TRIGGER_WAITING,
            TRIGGER_FIRED,
            Ordering::AcqRel,
            Ordering::Acquire,
        ) {
            Ok(_) => {
                stage.triggered.notify_all();
                Ok("ok")
            }
            Err(_) => Ok("already"),
        }
    }

    /// `{stage name: {counter: value}}` at this moment.
    fn stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let out = PyDict::new(py);
        for stage in &self.stages {
            let s = stage.stats.snapshot();
            let d = PyDict::new(py);
            d.set_item("items_in", s.items_in)?;
            d.set_item("items_out", s.items_out)?;
            d.set_item("errors", s.errors)?;
            d.set_item("retries", s.retries)?;
            d.set_item("chunks_in", s.chunks_in)?;
            d.set_item("latency_p50", s.latency_p50)?;
            d.set_item("latency_p99", s.latency_p99)?;
            d.set_item("throughput", s.throughput)?;
            d.set_item("active_seconds", s.active_seconds)?;
            d.set_item("busy_seconds", s.busy_seconds)?;
            d.set_item(
                "queued",
                stage.input().map(|c| c.queued_items()).unwrap_or(0),
            )?;
            d.set_item(
                "chunk_size",
                stage.input().map(|c| c.preferred_chunk()).unwrap_or(0),
            )?;
            // False for producers, and for inline stages on their sender's thread.
            d.set_item("has_input_queue", stage.input().is_some())?;
            out.set_item(&stage.name, d)?;
        }
        Ok(out)
    }

    /// The error that stopped the run, as `(stage, exception, item)`, or None.
    fn failure(&self, py: Python<'_>) -> Option<(String, Py<PyAny>, Option<Item>)> {
        let slot = self.run.failure.lock().unwrap();
        slot.as_ref().map(|f| {
            (
                f.stage.clone(),
                f.error.value(py).clone().into_any().unbind(),
                f.item.as_ref().map(|i| i.clone_ref(py)),
            )
        })
    }
}

/// How often the flusher looks at the outboxes while items are buffered, and how long an
/// item may wait in one before the flusher sends it on.
const FLUSH_TICK: Duration = Duration::from_micros(500);
const FLUSH_MAX_AGE: Duration = Duration::from_millis(1);
/// How long a run's waiting thread is its flusher before the flusher gets a thread.
const FLUSHER_THREAD_AFTER: Duration = Duration::from_millis(2);

/// Ships items that waited in an outbox for over a millisecond, so slow user code between
/// two emits never holds finished items back from the next stage. The thread waiting for
/// the run does this for its first moments (`Runtime::wait_until`), then this thread.
///
/// It looks every half millisecond while items are buffered somewhere. Once every outbox
/// has been empty for `DOZE_AFTER` looks in a row, it dozes until an empty outbox takes an
/// item (`FlusherBell`), the run stops, or `DOZE_LIMIT` passes: an idle pipeline, or one
/// whose stages take long per item, then costs no wake-ups.
///
/// Two empty looks (1 ms) are enough: a stream dense enough to keep the flusher busy never
/// leaves every outbox empty that long, and around a slow stage each item it sends costs
/// the bell and about five looks instead of some twenty-five (W3 `fork_ipc`'s parent: 530
/// context switches a run with twenty looks, 190 with two).
fn flusher(run: Arc<RunShared>) {
    const DOZE_AFTER: u32 = 2;
    const DOZE_LIMIT: Duration = Duration::from_secs(1);
    let mut empty_looks = 0;
    while !run.shutdown.sleep(FLUSH_TICK) {
        let buffered = run.flush_stale();
        if run.is_done() {
            break;
        }
        empty_looks = if buffered { 0 } else { empty_looks + 1 };
        if empty_looks >= DOZE_AFTER {
            // The outboxes are listed again once the bell knows it dozes: one made since
            // the last look is in the list before it can take an item.
            run.flusher_bell.doze(DOZE_LIMIT, || run.outboxes_empty());
            empty_looks = 0;
        }
    }
}
