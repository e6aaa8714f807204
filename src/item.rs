//! The item contract, written once for every worker that runs user code in this process
//! (a runtime thread's, or an `inline` stage's on its sender's thread): a worker's call
//! opened and closed, one item through it with retries whose failed attempts deliver
//! nothing, `on_error` offered what still fails, and a worker's end.

use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use pyo3::prelude::*;

use crate::call::call_one;
use crate::emit::{Emitter, EmitterSlot, Item};
use crate::gil;
use crate::scheduler::{CallMode, Failure, StageShared};
use crate::thread_state;

/// What one worker calls: the stage function (shared by the stage's workers), or a custom
/// Stage's per-worker copy.
pub struct WorkerCall {
    /// Whether `make_worker` made this worker's own call (else it calls the stage's).
    made: bool,
    own: Option<Item>,
    close: Option<Item>,
}

impl WorkerCall {
    /// Open the worker: a custom Stage (or a stage with worker hooks) makes its copy and
    /// opens it, under the GIL; a plain function needs neither, nor the GIL.
    pub fn open(stage: &StageShared) -> PyResult<Self> {
        match &stage.spec.make_worker {
            None => Ok(WorkerCall {
                made: false,
                own: None,
                close: None,
            }),
            Some(make) => thread_state::attach(|py| {
                let made = make.bind(py).call0()?;
                // A None call keeps a body-less accumulator body-less (worker hooks wrap it).
                let (own, close): (Option<Item>, Option<Item>) = made.extract()?;
                Ok(WorkerCall {
                    made: true,
                    own,
                    close,
                })
            }),
        }
    }

    /// The function to call per item (None: a body-less accumulator).
    pub fn call<'a>(&'a self, stage: &'a StageShared) -> Option<&'a Item> {
        if self.made {
            self.own.as_ref()
        } else {
            stage.spec.call.as_ref()
        }
    }

    fn close(&self, py: Python<'_>) -> PyResult<()> {
        match &self.close {
            Some(close) => close.bind(py).call0().map(|_| ()),
            None => Ok(()),
        }
    }
}

/// A new worker of `stage` on this thread, whose emitter slot is `slot`: its emitter
/// (with the inline stages behind it opened) and its call, opened with the emitter bound.
/// The call is None where opening it failed, which fails the run.
pub fn open_worker(stage: &StageShared, slot: &EmitterSlot) -> (Rc<Emitter>, Option<WorkerCall>) {
    let emitter = Emitter::new(
        stage.routes.clone(),
        stage.stats.clone(),
        stage.edges(slot),
        stage.run.shutdown.clone(),
    );
    let _bound = slot.bind(&emitter);
    let worker = match WorkerCall::open(stage) {
        Ok(worker) => Some(worker),
        Err(error) => {
            stage.run.fail(Failure {
                stage: stage.name.clone(),
                error,
                item: None,
            });
            None
        }
    };
    (emitter, worker)
}

/// A random factor in [0, 1) for retry jitter (a shared splitmix64 sequence).
fn jitter() -> f64 {
    static SEED: AtomicU64 = AtomicU64::new(0x9E37_79B9_7F4A_7C15);
    let mut x = SEED.fetch_add(0x9E37_79B9_7F4A_7C15, Ordering::Relaxed);
    x ^= x >> 33;
    x = x.wrapping_mul(0xff51_afd7_ed55_8ccd);
    x ^= x >> 33;
    (x >> 11) as f64 / (1u64 << 53) as f64
}

/// Call the function on one input (an attempt, whose emits the emitter holds). Value mode
/// returns the function's value, to be emitted once the attempt succeeded; iterate mode
/// holds each yielded value with the attempt's other emits, so a generator that raises
/// after some yields has delivered none of them.
fn invoke(
    call: &Bound<'_, PyAny>,
    mode: CallMode,
    input: &Bound<'_, PyAny>,
    emitter: &Emitter,
) -> PyResult<Option<Item>> {
    let result = call_one(call, input)?;
    if result.is_none() {
        return Ok(None);
    }
    match mode {
        CallMode::Value => Ok(Some(result.unbind())),
        CallMode::Iterate => {
            for value in result.try_iter()? {
                emitter.hold(value?.unbind());
            }
            Ok(None)
        }
        CallMode::Chunk => unreachable!("chunk-mode stages are called by run_chunk"),
    }
}

/// Why a worker stops early.
pub struct Stop;

/// Run one input through the stage function with retries; failures go to `on_error`.
pub fn process_one(
    py: Python<'_>,
    stage: &StageShared,
    call: &Bound<'_, PyAny>,
    emitter: &Emitter,
    input: &Bound<'_, PyAny>,
) -> Result<(), Stop> {
    let spec = &stage.spec;
    let mut attempt = 0u32;
    loop {
        // Every attempt's emits are held, retried or not: an item that fails delivers
        // nothing of the attempt that failed.
        emitter.begin_attempt();
        match invoke(call, stage.mode, input, emitter) {
            Ok(value) => {
                emitter.commit(py);
                if let Some(value) = value {
                    emitter.emit_default(py, value);
                }
                return Ok(());
            }
            Err(error) => {
                emitter.rollback();
                if stage.run.shutdown.is_set() {
                    return Err(Stop);
                }
                if attempt < spec.retries && error.is_instance(py, spec.retry_on.bind(py)) {
                    attempt += 1;
                    stage.stats.add_retry();
                    let base = spec.retry_backoff * f64::from(1u32 << (attempt - 1).min(20));
                    let pause = Duration::from_secs_f64((base * (0.5 + jitter())).min(60.0));
                    let shutdown = stage.run.shutdown.clone();
                    if gil::detach(py, move || shutdown.sleep(pause)) {
                        return Err(Stop);
                    }
                    continue;
                }
                stage.stats.add_error();
                return handle_failure(py, stage, error, Some(input));
            }
        }
    }
}

/// Offer a failed item to the `on_error` handlers; stop the run if none takes it.
pub fn handle_failure(
    py: Python<'_>,
    stage: &StageShared,
    error: PyErr,
    item: Option<&Bound<'_, PyAny>>,
) -> Result<(), Stop> {
    let item_obj = item
        .map(|i| i.clone().unbind())
        .unwrap_or_else(|| py.None());
    let handled =
        stage
            .spec
            .on_failure
            .bind(py)
            .call1((error.value(py), item_obj.bind(py), &stage.name));
    match handled {
        Ok(v) if v.is_truthy().unwrap_or(false) => Ok(()),
        Ok(_) => {
            stage.run.fail(Failure {
                stage: stage.name.clone(),
                error,
                item: Some(item_obj),
            });
            Err(Stop)
        }
        Err(handler_error) => {
            stage.run.fail(Failure {
                stage: stage.name.clone(),
                error: handler_error,
                item: Some(item_obj),
            });
            Err(Stop)
        }
    }
}

/// A worker's end, in its thread's last hold of the GIL: close its call (whenever it was
/// opened, also when the run is stopping: it is where a worker releases what it opened),
/// flush and close its outboxes, count it finished (`finished`), then end the `inline`
/// stages that ran on this thread behind it, in the same order.
///
/// What `close` emits while the run is stopping is dropped with the rest of the run's
/// output, and a failure of it is not reported over the run's own failure or cancel.
pub fn end_worker(
    py: Python<'_>,
    stage: &StageShared,
    worker: Option<&WorkerCall>,
    emitter: &Emitter,
    finished: impl FnOnce(Python<'_>),
) {
    if let Some(worker) = worker {
        if let Err(error) = worker.close(py) {
            if !stage.run.shutdown.is_set() {
                stage.run.fail(Failure {
                    stage: stage.name.clone(),
                    error,
                    item: None,
                });
            }
        }
    }
    emitter.finish(py);
    finished(py);
    emitter.finish_inline(py);
}
