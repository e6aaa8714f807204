//! The child processes of one run, as the parent keeps them: the process budget of every
//! pipeline scope (`max_processes`, shared by the fork stages below it), the table of live
//! children (for clean-up), and each child's pipes and exit.
//!
//! Every wait here happens without the GIL and wakes on the run's shutdown signal: a
//! `spawn_fork` stage waiting for room waits on a condition variable that the signal's
//! listener notifies; a parent waiting for a child's next frame, for its pipe to drain or
//! for it to exit polls the pipe together with the child's pidfd (its exit) and the
//! table's eventfd (written when the run stops). So a cancelled run stops waiting at once,
//! not at the next poll slice.
//!
//! Planning (which stage reserves how many processes) is the Python layer's
//! (`minigun.fork_budget`); this module keeps the books with the numbers it is handed.

use std::collections::HashMap;
use std::io;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicI64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock, Weak};
use std::time::{Duration, Instant};

use pyo3::exceptions::{PyEOFError, PyValueError};
use pyo3::prelude::*;
use pyo3::pybacked::PyBackedBytes;
use pyo3::types::PyByteArray;

use crate::fork;
use crate::gil;
use crate::ipc::{self, Interrupted, Wait};
use crate::scheduler::Runtime;
use crate::shutdown::Shutdown;

pyo3::create_exception!(
    _minigun,
    RunStopping,
    pyo3::exceptions::PyException,
    "The run is stopping: a wait for a child process, or for room in the process budget, \
     gave up."
);

/// Where no pidfd tells a waiter that a child exited, it looks this often.
const NO_PIDFD_SLICE_MS: libc::c_int = 50;

fn locked<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // The books stay consistent whatever panicked while holding them.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The process budget: per scope, the limit, the standing reservations, and the extra
/// children `spawn_fork` stages run beyond their reserved one.
struct Budget {
    limit: HashMap<usize, usize>,
    reserved: HashMap<usize, usize>,
    extra: HashMap<usize, usize>,
    /// Children alive per spawn_fork stage.
    alive: HashMap<String, usize>,
}

impl Budget {
    fn room(&self, stage: &str, scopes: &[usize]) -> bool {
        if self.alive.get(stage).copied().unwrap_or(0) == 0 {
            return true; // the stage's own reserved process
        }
        scopes.iter().all(|s| {
            let used = self.extra.get(s).copied().unwrap_or(0)
                + self.reserved.get(s).copied().unwrap_or(0);
            used < self.limit.get(s).copied().unwrap_or(0)
        })
    }

    fn take(&mut self, stage: &str, scopes: &[usize]) {
        let alive = self.alive.entry(stage.to_owned()).or_insert(0);
        *alive += 1;
        if *alive > 1 {
            for &s in scopes {
                *self.extra.entry(s).or_insert(0) += 1;
            }
        }
    }

    fn give_back(&mut self, stage: &str, scopes: &[usize]) {
        let Some(alive) = self.alive.get_mut(stage).filter(|a| **a > 0) else {
            return;
        };
        *alive -= 1;
        if *alive > 0 {
            for &s in scopes {
                if let Some(extra) = self.extra.get_mut(&s) {
                    *extra = extra.saturating_sub(1);
                }
            }
        }
    }
}

struct Table {
    budget: Mutex<Budget>,
    room: Condvar,
    children: Mutex<HashMap<i32, Arc<ChildInner>>>,
    /// The run's shutdown signal, once the table watches it.
    shutdown: OnceLock<Shutdown>,
    /// An eventfd, written when the run stops (so `poll` wakes); -1 once closed.
    wake: Mutex<RawFd>,
    owner_pid: u32,
}

impl Table {
    /// A table with per-scope `limits` (`max_processes`) and standing reservations.
    fn new(limits: HashMap<usize, usize>, reserved: HashMap<usize, usize>) -> Self {
        Table {
            budget: Mutex::new(Budget {
                limit: limits,
                reserved,
                extra: HashMap::new(),
                alive: HashMap::new(),
            }),
            room: Condvar::new(),
            children: Mutex::new(HashMap::new()),
            shutdown: OnceLock::new(),
            wake: Mutex::new(-1),
            owner_pid: std::process::id(),
        }
    }

    fn stopping(&self) -> bool {
        self.shutdown.get().is_some_and(Shutdown::is_set)
    }

    fn wake_fd(&self) -> RawFd {
        *locked(&self.wake)
    }

    /// The run stopped: wake every waiter.
    fn wake_all(&self) {
        let fd = locked(&self.wake);
        if *fd >= 0 {
            let one: u64 = 1;
            // SAFETY: writing 8 bytes to an eventfd we own; nothing to do if it fails.
            unsafe { libc::write(*fd, (&one as *const u64).cast(), 8) };
        }
        drop(fd);
        // Taking the budget's lock orders this wake after a waiter's check of the flag.
        let _budget = locked(&self.budget);
        self.room.notify_all();
    }

    /// Wake waiters when `shutdown` is set (the first signal watched is kept); makes the
    /// eventfd.
    fn watch(self: &Arc<Self>, shutdown: &Shutdown) -> io::Result<()> {
        {
            let mut wake = locked(&self.wake);
            if *wake >= 0 || self.shutdown.get().is_some() {
                return Ok(());
            }
            // SAFETY: eventfd takes an initial value and flags and returns a new fd or -1.
            let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
            if fd < 0 {
                return Err(io::Error::last_os_error());
            }
            fork::register_fds(&[fd]);
            *wake = fd;
        }
        if self.shutdown.set(shutdown.clone()).is_ok() {
            let table = Arc::downgrade(self);
            shutdown.on_set(Box::new(move || {
                if let Some(table) = table.upgrade() {
                    table.wake_all();
                }
            }));
        }
        Ok(())
    }

    /// Wait for room for one more child of `stage` and take it; false if the run stops
    /// first.
    fn acquire(&self, stage: &str, scopes: &[usize]) -> bool {
        let mut budget = locked(&self.budget);
        loop {
            if self.stopping() {
                return false;
            }
            if budget.room(stage, scopes) {
                budget.take(stage, scopes);
                return true;
            }
            budget = self.room.wait(budget).unwrap_or_else(|e| e.into_inner());
        }
    }

    fn forget(&self, pid: i32) {
        locked(&self.children).remove(&pid);
    }

    /// Close the eventfd. It leaves `wake` first, so nothing waits for the fork gate
    /// while holding the lock the shutdown listener takes.
    fn close_wake(&self, blocking: bool) {
        let fd = std::mem::replace(&mut *locked(&self.wake), -1);
        if fd < 0 {
            return;
        }
        if blocking {
            fork::close_fds(&[fd]);
        } else if !fork::try_close_fds(&[fd]) {
            *locked(&self.wake) = fd; // a fork holds the gate: leave it to a later try
        }
    }
}

impl Drop for Table {
    fn drop(&mut self) {
        // Never wait for the fork gate here (a destructor may run attached), and never
        // touch the books of a parent from a forked child.
        if std::process::id() == self.owner_pid {
            self.close_wake(false);
        }
    }
}

/// The child processes of one run: the process budget and the table of live children.
#[pyclass(frozen, module = "minigun._minigun")]
pub struct ChildTable {
    table: Arc<Table>,
}

fn stopping_error(stage: &str) -> PyErr {
    RunStopping::new_err(format!("stage {stage:?}: the run is stopping"))
}

fn io_to_py(err: io::Error) -> PyErr {
    match err.kind() {
        io::ErrorKind::UnexpectedEof => PyEOFError::new_err(err.to_string()),
        io::ErrorKind::InvalidData => PyValueError::new_err(err.to_string()),
        _ => PyErr::from(err),
    }
}

fn interrupted_to_py(stage: &str, err: Interrupted) -> PyErr {
    match err {
        Interrupted::Io(err) => io_to_py(err),
        Interrupted::Stopping => stopping_error(stage),
    }
}

#[pymethods]
impl ChildTable {
    /// `ChildTable(limits, reserved)`: per scope id, its `max_processes` and the processes
    /// its fork stages hold in standing reservations.
    #[new]
    fn new(limits: HashMap<usize, usize>, reserved: HashMap<usize, usize>) -> Self {
        ChildTable {
            table: Arc::new(Table::new(limits, reserved)),
        }
    }

    /// Wake this table's waiters when `runtime`'s run stops (idempotent; the first
    /// runtime is the one watched). Makes the table's eventfd, which `close()` closes.
    fn watch(&self, runtime: PyRef<'_, Runtime>) -> PyResult<()> {
        self.table.watch(runtime.shutdown()).map_err(PyErr::from)
    }

    /// True once the watched run is stopping.
    #[getter]
    fn stopping(&self) -> bool {
        self.table.stopping()
    }

    /// Wait (without the GIL) for room for one more child of the spawn_fork stage `stage`,
    /// whose scopes (innermost pipeline outward) are `scopes`, and take it. Raises
    /// RunStopping when the run stops first (checked even when there is room: a child
    /// killed because the run stops frees room that no new child may take).
    fn acquire(&self, py: Python<'_>, stage: String, scopes: Vec<usize>) -> PyResult<()> {
        let table = self.table.clone();
        let took = gil::detach(py, || table.acquire(&stage, &scopes));
        if took {
            Ok(())
        } else {
            Err(stopping_error(&stage))
        }
    }

    /// Give back what `acquire` took.
    fn release(&self, stage: &str, scopes: Vec<usize>) {
        locked(&self.table.budget).give_back(stage, &scopes);
        self.table.room.notify_all();
    }

    /// Sleep `seconds` without the GIL (a retry's back-off); RunStopping if the run stops.
    fn pause(&self, py: Python<'_>, stage: &str, seconds: f64) -> PyResult<()> {
        let pause = Duration::try_from_secs_f64(seconds.max(0.0)).unwrap_or(Duration::MAX);
        let shutdown = self.table.shutdown.get().cloned();
        let stopped = gil::detach(py, move || match shutdown {
            Some(shutdown) => shutdown.sleep(pause),
            None => {
                std::thread::sleep(pause);
                false
            }
        });
        if stopped {
            Err(stopping_error(stage))
        } else {
            Ok(())
        }
    }

    /// Take charge of a child just forked: `pid`, the parent's end of its result pipe
    /// (`rfd`) and, for a long-lived worker, of its input pipe (`wfd`). The table owns the
    /// fds from now on (they are closed when the child is reaped, and every later child
    /// closes them).
    #[pyo3(signature = (pid, rfd, wfd, stage, items=0))]
    fn add(
        &self,
        pid: i32,
        rfd: RawFd,
        wfd: Option<RawFd>,
        stage: String,
        items: usize,
    ) -> PyResult<Child> {
        let pidfd = fork::pidfd(pid);
        let mut owned = vec![rfd];
        owned.extend(wfd);
        owned.extend(pidfd);
        fork::register_fds(&owned);
        let inner = Arc::new(ChildInner {
            pid,
            stage,
            rfd,
            wfd,
            pidfd,
            started: Instant::now(),
            items: AtomicUsize::new(items),
            status: AtomicI64::new(NOT_REAPED),
            reaping: Mutex::new(()),
            table: Arc::downgrade(&self.table),
        });
        locked(&self.table.children).insert(pid, inner.clone());
        for fd in [Some(rfd), wfd].into_iter().flatten() {
            ipc::set_nonblocking(fd).map_err(io_to_py)?;
        }
        Ok(Child { inner })
    }

    /// The children not reaped yet.
    fn live(&self) -> Vec<Child> {
        locked(&self.table.children)
            .values()
            .map(|inner| Child {
                inner: inner.clone(),
            })
            .collect()
    }

    /// Close the table's own fd. Call once no thread can wait on the table any more.
    fn close(&self, py: Python<'_>) {
        let table = self.table.clone();
        gil::detach(py, move || table.close_wake(true));
    }
}

struct ChildInner {
    pid: i32,
    stage: String,
    rfd: RawFd,
    wfd: Option<RawFd>,
    pidfd: Option<RawFd>,
    started: Instant,
    items: AtomicUsize,
    /// The raw wait status once reaped, else `NOT_REAPED`: read without a lock, so a
    /// thread attached to Python never waits here for one that waits for the fork gate.
    status: AtomicI64,
    /// Held while reaping (exactly once) and terminating.
    reaping: Mutex<()>,
    table: Weak<Table>,
}

impl ChildInner {
    fn table(&self) -> Option<Arc<Table>> {
        self.table.upgrade()
    }

    fn stopping(&self) -> bool {
        self.table().is_some_and(|t| t.stopping())
    }

    fn fds(&self) -> Vec<RawFd> {
        let mut fds = vec![self.rfd];
        fds.extend(self.wfd);
        fds.extend(self.pidfd);
        fds
    }

    /// Block until the child may have exited, or the run stops.
    fn wait_for_exit_or_stop(&self) -> io::Result<()> {
        let mut fds = Vec::with_capacity(2);
        if let Some(pidfd) = self.pidfd {
            fds.push(pollin(pidfd));
        }
        let wake = self.table().map_or(-1, |t| t.wake_fd());
        if wake >= 0 {
            fds.push(pollin(wake));
        }
        let timeout = if self.pidfd.is_some() {
            -1
        } else {
            NO_PIDFD_SLICE_MS
        };
        ipc::poll_fds(&mut fds, timeout)
    }

    /// Reap the child, which is expected to exit by itself; terminate it if the run stops
    /// first.
    fn wait(&self) -> io::Result<i32> {
        loop {
            if let Some(status) = self.status() {
                return Ok(status);
            }
            if self.stopping() {
                return self.kill(GRACE);
            }
            self.wait_for_exit_or_stop()?;
            let _reaping = locked(&self.reaping);
            if self.status().is_none() {
                if let Some(reaped) = fork::try_reap(self.pid)? {
                    self.ended(reaped);
                }
            }
        }
    }

    /// End the child: close its input pipe (a long-lived worker reads the end of its
    /// input), SIGTERM it (a child interrupts its item, closes its worker and exits),
    /// give it `grace` to exit while draining what it still writes (so a full pipe cannot
    /// hold it up), then SIGKILL; reap. Idempotent.
    fn kill(&self, grace: Duration) -> io::Result<i32> {
        let _reaping = locked(&self.reaping);
        if let Some(done) = self.status() {
            return Ok(done);
        }
        if let Some(wfd) = self.wfd {
            fork::close_fds(&[wfd]);
        }
        let reaped = match fork::try_reap(self.pid)? {
            Some(reaped) => reaped,
            None => {
                fork::signal(self.pid, libc::SIGTERM)?;
                match self.drain_until_exit(grace)? {
                    Some(reaped) => reaped,
                    None => {
                        fork::signal(self.pid, libc::SIGKILL)?;
                        fork::reap_within(self.pid, None)?.expect("an untimed wait reaps")
                    }
                }
            }
        };
        self.ended(reaped);
        Ok(reaped)
    }

    /// Wait up to `grace` for the child to exit, reading and dropping what it writes.
    fn drain_until_exit(&self, grace: Duration) -> io::Result<Option<i32>> {
        let deadline = Instant::now() + grace;
        let mut last_signal = Instant::now();
        let mut scratch = vec![0u8; 64 * 1024];
        let mut pipe_open = true;
        loop {
            if let Some(reaped) = fork::try_reap(self.pid)? {
                return Ok(Some(reaped));
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(None);
            }
            let mut fds = Vec::with_capacity(2);
            if let Some(pidfd) = self.pidfd {
                fds.push(pollin(pidfd));
            }
            if pipe_open {
                fds.push(pollin(self.rfd));
            }
            let mut ms = left.as_millis().clamp(1, i32::MAX as u128) as libc::c_int;
            ms = ms.min(if self.pidfd.is_none() { 5 } else { RESIGNAL_MS });
            ipc::poll_fds(&mut fds, ms)?;
            if last_signal.elapsed() >= Duration::from_millis(RESIGNAL_MS as u64) {
                // Again: a signal that lands while the child's interpreter cannot run its
                // handler (it restarts the call it was in) is otherwise lost.
                fork::signal(self.pid, libc::SIGTERM)?;
                last_signal = Instant::now();
            }
            // A bounded number of reads per wake, so the deadline holds against a
            // child that keeps writing.
            for _ in 0..16 {
                if !pipe_open {
                    break;
                }
                // SAFETY: reading into a scratch buffer we own; the fd is non-blocking.
                let r = unsafe { libc::read(self.rfd, scratch.as_mut_ptr().cast(), scratch.len()) };
                if r == 0 {
                    pipe_open = false;
                } else if r < 0 {
                    let err = io::Error::last_os_error();
                    if err.kind() != io::ErrorKind::Interrupted {
                        pipe_open = err.kind() == io::ErrorKind::WouldBlock;
                        break;
                    }
                }
            }
        }
    }

    fn status(&self) -> Option<i32> {
        let status = self.status.load(Ordering::Acquire);
        (status != NOT_REAPED).then_some(status as i32)
    }

    /// Record the status (the caller holds `reaping`), then close the fds and leave the
    /// table.
    fn ended(&self, reaped: i32) {
        self.status.store(i64::from(reaped), Ordering::Release);
        fork::close_fds(&self.fds());
        if let Some(table) = self.table() {
            table.forget(self.pid);
        }
    }
}

impl Drop for ChildInner {
    fn drop(&mut self) {
        // A child never reaped (its run was dropped unfinished): close its fds if that
        // needs no wait for the fork gate. Never from a forked child.
        let open = self.status().is_none();
        let owner = self.table().map(|t| t.owner_pid);
        if open && owner.is_none_or(|pid| pid == std::process::id()) {
            fork::try_close_fds(&self.fds());
        }
    }
}

fn pollin(fd: RawFd) -> libc::pollfd {
    libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    }
}

/// While a terminated child has not exited, SIGTERM is sent again this often (ms).
const RESIGNAL_MS: libc::c_int = 20;

/// `ChildInner::status` before the child is reaped.
const NOT_REAPED: i64 = i64::MIN;

/// Seconds a child gets to exit after SIGTERM before SIGKILL, when the run stops.
const GRACE: Duration = Duration::from_secs(1);

/// How a transfer with one child waits: on its pipe, its pidfd (its exit) and the run's
/// stop.
struct ChildWait<'a> {
    child: &'a ChildInner,
    table: Option<Arc<Table>>,
    gone: bool,
}

impl<'a> ChildWait<'a> {
    fn new(child: &'a ChildInner) -> Self {
        ChildWait {
            child,
            table: child.table(),
            gone: false,
        }
    }
}

impl Wait for ChildWait<'_> {
    fn check(&mut self) -> Result<(), Interrupted> {
        if self.table.as_ref().is_some_and(|t| t.stopping()) {
            return Err(Interrupted::Stopping);
        }
        Ok(())
    }

    fn wait(&mut self, fd: RawFd, events: libc::c_short) -> Result<(), Interrupted> {
        self.check()?;
        let mut fds = Vec::with_capacity(3);
        fds.push(libc::pollfd {
            fd,
            events,
            revents: 0,
        });
        let wake = self.table.as_ref().map_or(-1, |t| t.wake_fd());
        if wake >= 0 {
            fds.push(pollin(wake));
        }
        if let Some(pidfd) = self.child.pidfd {
            fds.push(pollin(pidfd));
        }
        let timeout = if self.child.pidfd.is_some() {
            -1
        } else {
            NO_PIDFD_SLICE_MS
        };
        ipc::poll_fds(&mut fds, timeout)?;
        self.check()?;
        self.gone = match self.child.pidfd {
            Some(_) => fds.last().is_some_and(|p| p.revents != 0),
            None => fork::has_exited(self.child.pid),
        };
        Ok(())
    }

    fn peer_gone(&self) -> bool {
        self.gone
    }
}

/// A `&mut [u8]` that may cross into a detached closure.
struct RawSlice(*mut u8, usize);

// SAFETY: the slice points into a bytearray only this call can reach (see read_frame).
unsafe impl Send for RawSlice {}

/// A forked child as the parent sees it. Only the thread that owns it reads, writes and
/// waits; any thread may kill it.
#[pyclass(frozen, module = "minigun._minigun")]
pub struct Child {
    inner: Arc<ChildInner>,
}

#[pymethods]
impl Child {
    #[getter]
    fn pid(&self) -> i32 {
        self.inner.pid
    }

    #[getter]
    fn stage(&self) -> &str {
        &self.inner.stage
    }

    /// Items this child has run (for the exit log).
    #[getter]
    fn items(&self) -> usize {
        self.inner.items.load(Ordering::Relaxed)
    }

    #[setter]
    fn set_items(&self, items: usize) {
        self.inner.items.store(items, Ordering::Relaxed);
    }

    /// Its raw wait status once reaped, else None.
    #[getter]
    fn status(&self) -> Option<i32> {
        self.inner.status()
    }

    /// Seconds since it was forked.
    #[getter]
    fn lifetime(&self) -> f64 {
        self.inner.started.elapsed().as_secs_f64()
    }

    /// Whether it has exited (it is not reaped).
    fn exited(&self) -> bool {
        self.inner.status().is_some() || fork::has_exited(self.inner.pid)
    }

    /// `read_frame() -> bytearray | None`: the child's next frame, read without the GIL;
    /// None when its pipe ended cleanly before a new frame (also once it exited and the
    /// pipe is drained, even if a grandchild holds the pipe open). RunStopping when the
    /// run stops first; EOFError if the pipe ends inside a frame.
    fn read_frame<'py>(&self, py: Python<'py>) -> PyResult<Option<Bound<'py, PyByteArray>>> {
        let child = &*self.inner;
        let mut waiter = ChildWait::new(child);
        let len = gil::detach(py, || ipc::read_header(child.rfd, &mut waiter))
            .map_err(|e| interrupted_to_py(&child.stage, e))?;
        let Some(len) = len else { return Ok(None) };
        let len = usize::try_from(len)
            .map_err(|_| PyValueError::new_err("frame too large for this platform"))?;
        let frame = PyByteArray::new_with(py, len, |_| Ok(()))?;
        // SAFETY: the bytearray was just created and no other code holds a reference to
        // it, so nothing can resize or read it while we fill it without the GIL.
        let target = unsafe { frame.as_bytes_mut() };
        let raw = RawSlice(target.as_mut_ptr(), target.len());
        let got = gil::detach(py, || {
            let raw = raw;
            // SAFETY: see RawSlice; the bytearray outlives this call.
            let buf = unsafe { std::slice::from_raw_parts_mut(raw.0, raw.1) };
            ipc::read_full(child.rfd, buf, &mut waiter)
        })
        .map_err(|e| interrupted_to_py(&child.stage, e))?;
        if got < len {
            return Err(PyEOFError::new_err(format!(
                "the pipe closed inside a frame ({got} of {len} bytes)"
            )));
        }
        Ok(Some(frame))
    }

    /// `write_frame(data)`: send `data` as one frame to a long-lived worker, without the
    /// GIL. BrokenPipeError if it is gone; RunStopping when the run stops first.
    fn write_frame(&self, py: Python<'_>, data: PyBackedBytes) -> PyResult<()> {
        let child = &*self.inner;
        let Some(wfd) = child.wfd else {
            return Err(PyValueError::new_err("this child has no input pipe"));
        };
        let mut waiter = ChildWait::new(child);
        gil::detach(py, || ipc::write_frame_to(wfd, &data, &mut waiter))
            .map_err(|e| interrupted_to_py(&child.stage, e))
    }

    /// `wait() -> int`: reap the child, which is expected to exit by itself now (without
    /// the GIL); if the run stops first, terminate it. Its raw wait status.
    fn wait(&self, py: Python<'_>) -> PyResult<i32> {
        let child = self.inner.clone();
        gil::detach(py, move || child.wait()).map_err(io_to_py)
    }

    /// `kill(grace=1.0) -> int`: SIGTERM, SIGKILL after `grace` seconds, reap (without
    /// the GIL). Idempotent; its raw wait status.
    #[pyo3(signature = (grace=1.0))]
    fn kill(&self, py: Python<'_>, grace: f64) -> PyResult<i32> {
        let grace = Duration::try_from_secs_f64(grace.max(0.0)).unwrap_or(GRACE);
        let child = self.inner.clone();
        gil::detach(py, move || child.kill(grace)).map_err(io_to_py)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(limit: usize, reserved: usize) -> Arc<Table> {
        Arc::new(Table::new(
            HashMap::from([(1, limit)]),
            HashMap::from([(1, reserved)]),
        ))
    }

    /// Fork a child that sleeps (async-signal-safe only) until killed.
    fn sleeping_child() -> i32 {
        // SAFETY: the child only calls async-signal-safe functions before _exit.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0);
        if pid == 0 {
            // SAFETY: as above.
            unsafe {
                libc::sleep(30);
                libc::_exit(0)
            };
        }
        pid
    }

    #[test]
    fn a_wait_for_room_wakes_when_the_run_stops() {
        let t = table(1, 1);
        let shutdown = Shutdown::new();
        t.watch(&shutdown).unwrap();
        assert!(t.acquire("a", &[1]));
        let waiter = {
            let t = t.clone();
            std::thread::spawn(move || {
                let began = Instant::now();
                (t.acquire("a", &[1]), began.elapsed())
            })
        };
        std::thread::sleep(Duration::from_millis(50));
        let stopped = Instant::now();
        shutdown.set();
        let (took, _) = waiter.join().unwrap();
        assert!(!took, "no room once the run stops");
        assert!(stopped.elapsed() < Duration::from_millis(500));
        t.close_wake(true);
    }

    #[test]
    fn a_wait_for_a_frame_wakes_when_the_run_stops_and_kill_reaps() {
        let t = table(1, 1);
        let shutdown = Shutdown::new();
        t.watch(&shutdown).unwrap();
        let mut fds = [0; 2];
        // SAFETY: pipe fills two fds.
        assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
        let pid = sleeping_child();
        // SAFETY: the parent keeps the read end only.
        unsafe { libc::close(fds[1]) };
        ipc::set_nonblocking(fds[0]).unwrap();
        fork::register_fds(&[fds[0]]);
        let pidfd = fork::pidfd(pid);
        fork::register_fds(&pidfd.into_iter().collect::<Vec<_>>());
        let child = Arc::new(ChildInner {
            pid,
            stage: "s".into(),
            rfd: fds[0],
            wfd: None,
            pidfd,
            started: Instant::now(),
            items: AtomicUsize::new(0),
            status: AtomicI64::new(NOT_REAPED),
            reaping: Mutex::new(()),
            table: Arc::downgrade(&t),
        });
        let stopper = {
            let shutdown = shutdown.clone();
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(50));
                shutdown.set();
                Instant::now()
            })
        };
        let mut waiter = ChildWait::new(&child);
        let err = ipc::read_frame_vec(child.rfd, &mut waiter).unwrap_err();
        let stopped = stopper.join().unwrap();
        assert!(matches!(err, Interrupted::Stopping));
        assert!(stopped.elapsed() < Duration::from_millis(500));
        // The sleeping child (SIGTERM's default action here) ends at once.
        let status = child.kill(Duration::from_secs(5)).unwrap();
        assert!(libc::WIFSIGNALED(status));
        assert_eq!(child.status(), Some(status));
        t.close_wake(true);
    }

    #[test]
    fn the_budget_keeps_one_process_per_stage_and_shares_the_rest() {
        // One scope, limit 3; two spawn_fork stages reserve one each: one extra to share.
        let mut b = Budget {
            limit: HashMap::from([(1, 3)]),
            reserved: HashMap::from([(1, 2)]),
            extra: HashMap::new(),
            alive: HashMap::new(),
        };
        let s = [1];
        assert!(b.room("a", &s));
        b.take("a", &s);
        assert!(b.room("a", &s)); // the shared extra
        b.take("a", &s);
        assert!(!b.room("a", &s));
        assert!(b.room("b", &s)); // b's own reserved process is always there
        b.take("b", &s);
        assert!(!b.room("b", &s));
        b.give_back("a", &s);
        assert!(b.room("b", &s));
        b.give_back("a", &s);
        b.give_back("a", &s); // one too many: ignored
        assert_eq!(b.alive["a"], 0);
        assert_eq!(b.extra[&1], 0);
    }
}
