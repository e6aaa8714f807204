//! minigun's Rust runtime, exposed to Python as `minigun._minigun`.
//!
//! One module per runtime concern: `channel` (bounded chunked queues), `emit` (outboxes
//! and the per-thread emitter), `pool` (runtime threads, parked between works, and a
//! semaphore), `item` (the item contract every worker keeps), `worker` (the loops that
//! call user code on runtime threads), `inline` (inline stages, run on their sender's
//! thread), `call` (one-argument calls without an argument tuple), `accumulate` (keyed
//! batching), `stats` (counters and latency), `spec` (the typed stage spec the Python
//! layer hands over), `scheduler` (a whole run), `shutdown` (the stop signal), `fork`
//! (the fork gate, the parent's fds every child closes, reaping and terminating a
//! process), `gil` (workers taking and giving up the GIL, handing it on without a
//! sleep), `children` (a run's process budget and table of children, waiting on them)
//! and `ipc` (length-prefixed frames on pipes).

pub mod accumulate;
pub mod call;
pub mod channel;
pub mod children;
pub mod emit;
pub mod fork;
pub mod gil;
pub mod inline;
pub mod ipc;
pub mod item;
pub mod pool;
pub mod scheduler;
pub mod shutdown;
pub mod spec;
pub mod stats;
pub mod thread_state;
pub mod worker;

use pyo3::prelude::*;

#[pymodule(gil_used = false)]
fn _minigun(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<scheduler::Runtime>()?;
    m.add_function(wrap_pyfunction!(emit::emit, m)?)?;
    m.add_function(wrap_pyfunction!(emit::current_run_id, m)?)?;
    m.add("MAX_CHUNK", channel::MAX_CHUNK)?;
    m.add_class::<children::ChildTable>()?;
    m.add_class::<children::Child>()?;
    m.add("RunStopping", m.py().get_type::<children::RunStopping>())?;
    m.add_function(wrap_pyfunction!(fork::fork_gate_close, m)?)?;
    m.add_function(wrap_pyfunction!(fork::fork_gate_open, m)?)?;
    Ok(())
}
