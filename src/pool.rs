//! Worker threads: named OS threads, joined at the end of a run, and a counting semaphore
//! that bounds how many per-item threads a `spawn_thread` stage has alive.

use std::sync::{Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use crate::shutdown::Shutdown;

/// How late the kernel may wake a runtime thread from a timed wait, in nanoseconds: a
/// stage's `time.sleep`, a socket timeout, an async stage's event loop, the flusher's
/// period. Linux's default, 50 µs, lets it gather wake-ups; a stage sleeping 2 ms per
/// item then takes about 2.5% longer than it asked (docs/performance.md, W2). A child a
/// worker forks inherits it.
#[cfg(target_os = "linux")]
const TIMER_SLACK_NS: libc::c_ulong = 1_000;

/// Start a named runtime thread. The OS may refuse (a thread or memory limit): callers
/// turn that into the run's failure instead of a panic.
pub fn spawn_named(
    name: String,
    f: impl FnOnce() + Send + 'static,
) -> std::io::Result<JoinHandle<()>> {
    std::thread::Builder::new().name(name).spawn(move || {
        tighten_timer_slack();
        f()
    })
}

#[cfg(target_os = "linux")]
fn tighten_timer_slack() {
    // SAFETY: PR_SET_TIMERSLACK changes the calling thread's slack and nothing else; it
    // cannot fail for a value this small, and a failure would only leave the default.
    unsafe { libc::prctl(libc::PR_SET_TIMERSLACK, TIMER_SLACK_NS, 0, 0, 0) };
}

#[cfg(not(target_os = "linux"))]
fn tighten_timer_slack() {}

/// The error a run fails with when the OS refuses `stage` a thread.
pub fn refused_error(stage: &str, error: &std::io::Error) -> pyo3::PyErr {
    pyo3::exceptions::PyRuntimeError::new_err(format!(
        "the operating system refused to start a thread for stage {stage:?} ({error}); \
         lower its threads= (or the pipeline's max_threads), or raise the process's thread \
         or memory limits"
    ))
}

/// Join every handle, ignoring panics (they were already reported as the run's failure).
pub fn join_all(handles: Vec<JoinHandle<()>>) {
    for handle in handles {
        let _ = handle.join();
    }
}

pub struct Semaphore {
    available: Mutex<usize>,
    changed: Condvar,
}

impl Semaphore {
    pub fn new(permits: usize) -> Self {
        Semaphore {
            available: Mutex::new(permits),
            changed: Condvar::new(),
        }
    }

    /// Take a permit, or give up with `false` when the run shuts down.
    pub fn acquire(&self, shutdown: &Shutdown) -> bool {
        let mut available = self.available.lock().unwrap();
        while *available == 0 {
            if shutdown.is_set() {
                return false;
            }
            available = self
                .changed
                .wait_timeout(available, Duration::from_millis(50))
                .unwrap()
                .0;
        }
        *available -= 1;
        true
    }

    pub fn release(&self) {
        *self.available.lock().unwrap() += 1;
        self.changed.notify_all();
    }

    /// Wait until `permits` permits are free again (every holder released).
    pub fn wait_for(&self, permits: usize) {
        let mut available = self.available.lock().unwrap();
        while *available < permits {
            available = self.changed.wait(available).unwrap();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    #[test]
    fn semaphore_bounds_concurrency() {
        let sem = Arc::new(Semaphore::new(3));
        let alive = Arc::new(AtomicUsize::new(0));
        let peak = Arc::new(AtomicUsize::new(0));
        let shutdown = Shutdown::new();
        let mut handles = Vec::new();
        for i in 0..20 {
            assert!(sem.acquire(&shutdown));
            let (sem, alive, peak) = (sem.clone(), alive.clone(), peak.clone());
            handles.push(
                spawn_named(format!("t{i}"), move || {
                    let now = alive.fetch_add(1, Ordering::SeqCst) + 1;
                    peak.fetch_max(now, Ordering::SeqCst);
                    std::thread::sleep(Duration::from_millis(2));
                    alive.fetch_sub(1, Ordering::SeqCst);
                    sem.release();
                })
                .unwrap(),
            );
        }
        sem.wait_for(3);
        join_all(handles);
        assert!(peak.load(Ordering::SeqCst) <= 3);
    }

    #[test]
    fn acquire_gives_up_on_shutdown() {
        let sem = Semaphore::new(0);
        let shutdown = Shutdown::new();
        shutdown.set();
        assert!(!sem.acquire(&shutdown));
    }
}
