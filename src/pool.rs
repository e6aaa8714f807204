//! Runtime threads: OS threads that a run hands its workers to, named after the worker
//! they run, kept parked for a moment once their work is done so that the next run (or
//! the next spawned worker) takes them instead of starting a thread; and a counting
//! semaphore that bounds how many per-item threads a `spawn_thread` stage has alive.
//!
//! Why park them: on this project's VMs starting an OS thread and joining it costs about
//! 20 µs of the starting thread's time and as much again of the thread's own, and a
//! one-item run starts three (W5, a service that runs a pipeline per call: 0.51 ms per
//! run with a thread started per worker, 0.40 ms with parked threads). A thread whose
//! work is done waits up to [`LINGER`] for more, then ends: a program that runs
//! pipelines back to back starts its threads once, and a program whose last run has
//! ended has no thread of minigun's a moment later.
//!
//! A parked thread holds nothing of Python: its work ran inside `python_thread`, whose end
//! deleted the thread state it made (so a `threading.local` of the work is released with
//! it, as when the thread ended).
//!
//! After a fork the parked threads are the parent's: the child has none of them, and the
//! parent's list of them may have been locked at that moment. So each process keeps a list
//! of its own ([`parked`]).

use std::ptr;
use std::sync::atomic::{AtomicPtr, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use crate::shutdown::Shutdown;

/// How long a thread whose work is done waits for more before it ends.
pub const LINGER: Duration = Duration::from_millis(5);
/// The most threads parked at once: a thread done while this many wait ends at once
/// (a `spawn_thread` stage may have run hundreds).
const MAX_PARKED: usize = 64;

/// How late the kernel may wake a runtime thread from a timed wait, in nanoseconds: a
/// stage's `time.sleep`, a socket timeout, an async stage's event loop, the flusher's
/// period. Linux's default, 50 µs, lets it gather wake-ups; a stage sleeping 2 ms per
/// item then takes about 2.5% longer than it asked (docs/performance.md, W2). A child a
/// worker forks inherits it.
#[cfg(target_os = "linux")]
const TIMER_SLACK_NS: libc::c_ulong = 1_000;

/// One worker's work for a runtime thread.
struct Work {
    /// What the thread is called while it runs this work (debuggers, `top -H`).
    name: String,
    run: Box<dyn FnOnce() + Send>,
    done: Arc<Done>,
}

/// Whether a piece of work has ended: what joining it waits for.
#[derive(Default)]
struct Done {
    ended: Mutex<bool>,
    changed: Condvar,
}

impl Done {
    fn set(&self) {
        *self.ended.lock().unwrap() = true;
        self.changed.notify_all();
    }
}

/// Sets `Done` when dropped: when the work returned, and when it panicked.
struct SetDoneOnDrop(Arc<Done>);

impl Drop for SetDoneOnDrop {
    fn drop(&mut self) {
        self.0.set();
    }
}

/// The work a runtime thread was given, to wait for at the end of the run.
pub struct WorkHandle {
    done: Arc<Done>,
}

impl WorkHandle {
    /// Wait until the work has ended (returned or panicked).
    pub fn join(self) {
        let mut ended = self.done.ended.lock().unwrap();
        while !*ended {
            ended = self.done.changed.wait(ended).unwrap();
        }
    }

    pub fn is_finished(&self) -> bool {
        *self.done.ended.lock().unwrap()
    }
}

/// Where a parked thread waits for its next work. Waiting on a condition variable puts
/// the thread to sleep at once; a channel's receive first spins and yields, and a thread
/// that parks on the core of the worker that woke it took turns with that worker.
#[derive(Default)]
struct Slot {
    work: Mutex<Option<Work>>,
    arrived: Condvar,
}

/// The parked threads of one process, the latest parked last.
struct Parked {
    pid: u32,
    threads: Mutex<Vec<Arc<Slot>>>,
}

static PARKED: AtomicPtr<Parked> = AtomicPtr::new(ptr::null_mut());

/// This process's parked threads. A forked child makes a list of its own and leaves the
/// parent's alone (it is never freed: a few bytes, once per forked child that starts a
/// runtime thread).
fn parked() -> &'static Parked {
    let pid = std::process::id();
    let current = PARKED.load(Ordering::Acquire);
    // SAFETY: a non-null pointer in PARKED came from `Box::into_raw` below and is never
    // freed.
    if let Some(list) = unsafe { current.as_ref() } {
        if list.pid == pid {
            return list;
        }
    }
    let fresh = Box::into_raw(Box::new(Parked {
        pid,
        threads: Mutex::new(Vec::new()),
    }));
    match PARKED.compare_exchange(current, fresh, Ordering::AcqRel, Ordering::Acquire) {
        // SAFETY: just made, and now in PARKED for good.
        Ok(_) => unsafe { &*fresh },
        Err(made_first) => {
            // Another thread of this process made this process's list first.
            // SAFETY: `fresh` was never shared; `made_first` is never freed.
            drop(unsafe { Box::from_raw(fresh) });
            unsafe { &*made_first }
        }
    }
}

/// Run `f` on a runtime thread named `name`: a parked one if there is one, else a new
/// one. The OS may refuse a new thread (a thread or memory limit): callers turn that into
/// the run's failure instead of a panic.
pub fn spawn_named(name: String, f: impl FnOnce() + Send + 'static) -> std::io::Result<WorkHandle> {
    let done = Arc::new(Done::default());
    let work = Work {
        name,
        run: Box::new(f),
        done: done.clone(),
    };
    let taken = parked().threads.lock().unwrap().pop();
    match taken {
        Some(slot) => {
            *slot.work.lock().unwrap() = Some(work);
            slot.arrived.notify_one();
        }
        None => {
            std::thread::Builder::new().spawn(move || serve(work))?;
        }
    }
    Ok(WorkHandle { done })
}

/// A runtime thread's life: run its work, park, run the next work it is given, until
/// none comes within [`LINGER`]. Work that panics ends the thread (its handle is set done).
fn serve(first: Work) {
    tighten_timer_slack();
    let slot = Arc::new(Slot::default());
    let mut work = first;
    loop {
        name_this_thread(&work.name);
        let done = SetDoneOnDrop(work.done);
        (work.run)();
        // Parked before the work counts as done, so a run that starts right after the
        // one that waited for this work finds the thread parked.
        let parked = park(&slot);
        drop(done);
        if !parked {
            return;
        }
        match next_work(&slot) {
            Some(next) => work = next,
            None => return,
        }
    }
}

/// Offer this thread to the next `spawn_named`; false when enough threads wait already.
fn park(slot: &Arc<Slot>) -> bool {
    let mut threads = parked().threads.lock().unwrap();
    if threads.len() >= MAX_PARKED {
        return false;
    }
    threads.push(slot.clone());
    true
}

/// The next work for this parked thread, or None when none came within [`LINGER`] (the
/// thread is then no longer parked).
fn next_work(slot: &Arc<Slot>) -> Option<Work> {
    let waited = slot.work.lock().unwrap();
    let (mut work, _) = slot
        .arrived
        .wait_timeout_while(waited, LINGER, |work| work.is_none())
        .unwrap();
    if let Some(work) = work.take() {
        return Some(work);
    }
    drop(work);
    let mut threads = parked().threads.lock().unwrap();
    if let Some(i) = threads.iter().position(|parked| Arc::ptr_eq(parked, slot)) {
        threads.remove(i);
        return None;
    }
    drop(threads);
    // Taken just as the wait ran out: its work is on the way.
    let waited = slot.work.lock().unwrap();
    let mut work = slot
        .arrived
        .wait_while(waited, |work| work.is_none())
        .unwrap();
    work.take()
}

#[cfg(target_os = "linux")]
fn tighten_timer_slack() {
    // SAFETY: PR_SET_TIMERSLACK changes the calling thread's slack and nothing else; it
    // cannot fail for a value this small, and a failure would only leave the default.
    unsafe { libc::prctl(libc::PR_SET_TIMERSLACK, TIMER_SLACK_NS, 0, 0, 0) };
}

#[cfg(not(target_os = "linux"))]
fn tighten_timer_slack() {}

/// Name the calling thread for the OS (the kernel keeps its first 15 bytes).
#[cfg(target_os = "linux")]
fn name_this_thread(name: &str) {
    if let Ok(name) = std::ffi::CString::new(name) {
        // SAFETY: PR_SET_NAME reads a NUL-terminated string, which `name` is, and
        // renames the calling thread only.
        unsafe { libc::prctl(libc::PR_SET_NAME, name.as_ptr(), 0, 0, 0) };
    }
}

#[cfg(not(target_os = "linux"))]
fn name_this_thread(_name: &str) {}

/// The error a run fails with when the OS refuses `stage` a thread.
pub fn refused_error(stage: &str, error: &std::io::Error) -> pyo3::PyErr {
    pyo3::exceptions::PyRuntimeError::new_err(format!(
        "the operating system refused to start a thread for stage {stage:?} ({error}); \
         lower its threads= (or the pipeline's max_threads), or raise the process's thread \
         or memory limits"
    ))
}

/// Wait for every handle's work to end (a panic was already reported as the run's
/// failure).
pub fn join_all(handles: Vec<WorkHandle>) {
    for handle in handles {
        handle.join();
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
    use std::time::Instant;

    /// These tests one at a time: each looks at which threads are parked.
    static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

    fn one_at_a_time() -> std::sync::MutexGuard<'static, ()> {
        ONE_AT_A_TIME
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The OS id of the thread that runs a piece of work (named `name`), and that
    /// thread's name as the kernel has it.
    fn run_and_report(name: &str) -> (i32, String) {
        let (tx, rx) = std::sync::mpsc::channel();
        let handle = spawn_named(name.into(), move || {
            // SAFETY: gettid has no preconditions.
            let tid = unsafe { libc::gettid() };
            let comm = std::fs::read_to_string("/proc/thread-self/comm").unwrap();
            tx.send((tid, comm.trim_end().to_string())).unwrap();
        })
        .unwrap();
        handle.join();
        rx.recv().unwrap()
    }

    /// Run `check` right after a piece of work has ended, with that work's thread id:
    /// `check` may count on the thread being parked only if it starts well within
    /// [`LINGER`] of that. Tried again (up to ten times) when this process was held up
    /// for longer, as a loaded machine may hold it.
    fn right_after_work<R>(mut check: impl FnMut(i32) -> R) -> R {
        for _ in 0..10 {
            let (tid, _) = run_and_report("minigun:first:0");
            let ended = Instant::now();
            let result = check(tid);
            if ended.elapsed() < LINGER / 2 {
                return result;
            }
        }
        panic!("held up past the linger ten times in a row");
    }

    fn thread_exists(tid: i32) -> bool {
        std::path::Path::new(&format!("/proc/self/task/{tid}")).exists()
    }

    #[test]
    fn a_thread_whose_work_is_done_runs_the_next_work_under_its_name() {
        let _serial = one_at_a_time();
        let (_, first_name) = run_and_report("minigun:first:0");
        assert_eq!(first_name, "minigun:first:0");
        let (first, (second, second_name)) =
            right_after_work(|first| (first, run_and_report("minigun:second:0")));
        assert_eq!(first, second, "the second work started a thread");
        assert_eq!(second_name, "minigun:second:");
    }

    #[test]
    fn a_parked_thread_ends_when_no_work_comes() {
        let _serial = one_at_a_time();
        let (tid, parked) = right_after_work(|tid| (tid, thread_exists(tid)));
        assert!(parked, "ended at once instead of parking");
        let deadline = Instant::now() + LINGER * 20;
        while thread_exists(tid) && Instant::now() < deadline {
            std::thread::sleep(LINGER / 10);
        }
        assert!(
            !thread_exists(tid),
            "still parked {:?} after its work",
            LINGER * 20
        );
    }

    #[test]
    fn work_that_panics_is_done_and_the_next_work_still_runs() {
        let _serial = one_at_a_time();
        let panicked = spawn_named("minigun:panics:0".into(), || panic!("a bug")).unwrap();
        panicked.join();
        let (tx, rx) = std::sync::mpsc::channel();
        spawn_named("minigun:after:0".into(), move || tx.send(7).unwrap())
            .unwrap()
            .join();
        assert_eq!(rx.recv().unwrap(), 7);
    }

    #[test]
    fn a_forked_child_starts_threads_of_its_own() {
        let _serial = one_at_a_time();
        let pid = loop {
            run_and_report("minigun:parent:0");
            let parent_list = parked().threads.lock().unwrap();
            if parent_list.is_empty() {
                continue; // the thread ended already (a held-up machine): again
            }
            // Forked with a thread parked in the parent's list and the list locked, as a
            // thread parking at that moment would leave it: the child has neither that
            // thread nor a way to unlock the list.
            // SAFETY: the child runs Rust code of this crate only, then `_exit`s; glibc's
            // fork leaves malloc usable in the child.
            let pid = unsafe { libc::fork() };
            assert!(pid >= 0, "fork failed");
            if pid == 0 {
                let (tx, rx) = std::sync::mpsc::channel();
                let handle = spawn_named("minigun:child:0".into(), move || tx.send(()).unwrap());
                let ran = handle.is_ok_and(|h| {
                    h.join();
                    rx.recv().is_ok()
                });
                // SAFETY: leaving the child without running anything of the parent's.
                unsafe { libc::_exit(if ran { 0 } else { 1 }) };
            }
            break pid;
        };
        let status = crate::fork::reap_within(pid, Some(Duration::from_secs(10))).unwrap();
        if status.is_none() {
            // SAFETY: our own child, not reaped yet.
            unsafe { libc::kill(pid, libc::SIGKILL) };
            crate::fork::reap_within(pid, None).unwrap();
        }
        let status = status.expect("the child's work never ran (it went to a parent's thread)");
        assert!(libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0);
    }

    #[test]
    fn semaphore_bounds_concurrency() {
        let _serial = one_at_a_time();
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
