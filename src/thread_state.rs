//! A runtime thread's Python thread state: made in the thread's first hold of the GIL,
//! kept between its holds, and deleted in its last.
//!
//! On a build with a GIL every hold is a turn: when 34 threads of a run want the GIL,
//! each waits for the others' turns, and a thread that made its thread state in a hold of
//! its own, opened its stage in a second, and deleted the state in a last one after its
//! final flush took three turns besides its work (docs/performance.md, W2 and W5). Here a
//! thread state is made inside the first hold that has work to do, and deleted inside the
//! hold that ends the thread's work ([`attach_last`]); a thread that never needs Python
//! never makes one.
//!
//! One thread state for the thread's whole life, not one per hold: on free-threaded
//! builds every new thread state brings a new allocator heap, and every deleted one
//! abandons it for the other threads to sweep.
//!
//! Making and deleting a thread state happen inside the fork gate (`fork.rs`): entered
//! without the GIL before the first hold, and at the end entered in the last hold only if
//! it is open; if a fork holds it, the thread state lives on until [`python_thread`]'s end
//! has waited for the gate, detached. So a thread never waits for the gate while holding
//! the GIL, and a fork (which closes the gate without the GIL, then attaches) never waits
//! for a thread that waits for it.
//!
//! How the state is kept: PyO3 attaches with `PyGILState_Ensure` and lets go with
//! `PyGILState_Release`; the first makes a thread state when the thread has none, the
//! second deletes it when its count drops to zero. The first hold calls `Ensure` once
//! more, so the count stays above zero between holds, and the last hold calls the
//! matching `Release`, so PyO3's own `Release` at the end of that hold deletes it.

use std::cell::Cell;

use pyo3::ffi;
use pyo3::prelude::*;

use crate::fork;
use crate::gil;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Life {
    /// Not a runtime worker thread (a thread of the user's, a test's): holds are
    /// `gil::attach`'s, nothing kept.
    Foreign,
    /// A worker thread with no thread state now.
    Unmade,
    /// A worker thread keeping its thread state between holds.
    Kept,
}

thread_local! {
    static LIFE: Cell<Life> = const { Cell::new(Life::Foreign) };
}

/// Run `f` (which attaches with [`attach`] as it needs) as a runtime worker thread, and
/// delete the thread state it kept, if its last hold could not.
pub fn python_thread(f: impl FnOnce()) {
    LIFE.set(Life::Unmade);
    f();
    if LIFE.get() == Life::Kept {
        fork::enter_gate();
        gil::attach(|_py| forget_kept());
        fork::leave_gate();
    }
    LIFE.set(Life::Foreign);
}

/// `gil::attach`, first making this worker thread's thread state if it has none.
pub fn attach<R>(f: impl FnOnce(Python<'_>) -> R) -> R {
    if LIFE.get() != Life::Unmade {
        return gil::attach(f);
    }
    fork::enter_gate();
    gil::attach(|py| {
        fork::leave_gate();
        // SAFETY: this thread is attached (PyO3's own Ensure made its thread state); the
        // matching Release is `forget_kept`'s, in this thread's last hold.
        let state = unsafe { ffi::PyGILState_Ensure() };
        debug_assert!(state == ffi::PyGILState_STATE::PyGILState_LOCKED);
        LIFE.set(Life::Kept);
        f(py)
    })
}

/// [`attach`] for a worker thread's last hold: its thread state is deleted as the hold
/// ends, if no fork holds the gate (else at the end of [`python_thread`]). Should the
/// thread attach again, it makes a new one.
pub fn attach_last<R>(f: impl FnOnce(Python<'_>) -> R) -> R {
    let mut passing = false;
    let result = attach(|py| {
        let result = f(py);
        if LIFE.get() == Life::Kept && fork::try_enter_gate() {
            forget_kept();
            passing = true;
        }
        result
    });
    if passing {
        fork::leave_gate();
    }
    result
}

/// Give back the extra count of the kept thread state (attached): the hold's own end
/// then deletes it.
fn forget_kept() {
    // SAFETY: attached, with the count `attach` took still held (Life::Kept): this is its
    // matching Release, and it leaves PyO3's own for the end of the hold.
    unsafe { ffi::PyGILState_Release(ffi::PyGILState_STATE::PyGILState_LOCKED) };
    LIFE.set(Life::Unmade);
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{mpsc, Mutex};
    use std::thread;

    use pyo3::types::PyDict;

    /// The tests of this module one at a time: one holds the fork gate closed, which would
    /// defer the other's deletion.
    static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

    /// A namespace whose `ref` is a weak reference to an object the calling thread keeps
    /// in the namespace's `threading.local`: the object dies when that thread's thread
    /// state is deleted.
    fn keep_thread_local(py: Python<'_>) -> Py<PyDict> {
        let scope = PyDict::new(py);
        py.run(
            c"import threading, weakref\n\
              class Thing: pass\n\
              local = threading.local()\n\
              local.thing = Thing()\n\
              ref = weakref.ref(local.thing)\n",
            None,
            Some(&scope),
        )
        .unwrap();
        scope.unbind()
    }

    fn alive(scope: &Py<PyDict>) -> bool {
        gil::attach(|py| {
            let weak = scope.bind(py).get_item("ref").unwrap().unwrap();
            !weak.call0().unwrap().is_none()
        })
    }

    /// A worker thread that keeps an object in a thread-local in its first hold, then, at
    /// each `step`, runs `holds` and reports it `done`, and ends.
    struct Worker {
        kept: Py<PyDict>,
        step: mpsc::Sender<()>,
        done: mpsc::Receiver<()>,
        thread: thread::JoinHandle<()>,
    }

    impl Worker {
        fn start(holds: fn()) -> Self {
            Python::initialize();
            let (made, got_made) = mpsc::channel();
            let (step, wait_step) = mpsc::channel();
            let (report_done, done) = mpsc::channel();
            let thread = thread::spawn(move || {
                python_thread(|| {
                    made.send(attach(keep_thread_local)).unwrap();
                    wait_step.recv().unwrap();
                    holds();
                    report_done.send(()).unwrap();
                    wait_step.recv().unwrap();
                });
            });
            let kept = got_made.recv().unwrap();
            Worker {
                kept,
                step,
                done,
                thread,
            }
        }

        /// Let it run its holds and wait for them.
        fn run_holds(&self) {
            self.step.send(()).unwrap();
            self.done.recv().unwrap();
        }

        /// Let it end, join it, and give back what it kept.
        fn end(self) -> Py<PyDict> {
            self.step.send(()).unwrap();
            self.thread.join().unwrap();
            self.kept
        }
    }

    /// The fork gate held closed, as a fork holds it, until dropped (also when a test
    /// fails, so the next test does not wait for it).
    struct ForkUnderWay;

    impl ForkUnderWay {
        fn start() -> Self {
            gil::attach(crate::fork::fork_gate_close);
            ForkUnderWay
        }
    }

    impl Drop for ForkUnderWay {
        fn drop(&mut self) {
            crate::fork::fork_gate_open();
        }
    }

    #[test]
    fn a_thread_state_lives_from_the_first_hold_to_the_end_of_the_last() {
        let _alone = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
        let worker = Worker::start(|| {
            attach(|_py| ()); // a hold between: the state is kept across it
            attach_last(|_py| ());
        });
        assert!(alive(&worker.kept), "kept between holds");
        worker.run_holds();
        let deleted = !alive(&worker.kept);
        assert!(
            deleted,
            "deleted as the last hold ended, before the thread's end"
        );
        worker.end();
    }

    #[test]
    fn a_last_hold_that_meets_a_fork_leaves_the_deletion_to_the_threads_end() {
        let _alone = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
        let worker = Worker::start(|| attach_last(|_py| ()));
        // What a fork does first: it waits for the gate and holds it closed.
        let fork = ForkUnderWay::start();
        worker.run_holds();
        let kept_during_the_fork = alive(&worker.kept);
        drop(fork);
        assert!(
            kept_during_the_fork,
            "not deleted while a fork holds the gate"
        );
        let kept = worker.end();
        assert!(
            !alive(&kept),
            "deleted at the thread's end, once the gate opened"
        );
    }
}
