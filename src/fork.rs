//! What makes a fork safe in a process full of runtime threads, and the process calls
//! the parent needs: the fork gate (no thread state is born or dies during a fork), the
//! registry of the parent's file descriptors that every new child closes, reaping (with a
//! pidfd where the kernel has them), peeking whether a child ended, and terminating it
//! (SIGTERM, a grace period, then SIGKILL).
//!
//! The fork itself is not here: `minigun.fork_safety` calls `os.fork()` from the worker
//! thread that runs the stage (see docs/forking.md for why that is safe), and the child
//! runs pure Python only. These functions are for the parent; a child never calls into
//! this module. The per-run table of children is `children.rs`.

use std::io;
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use std::os::fd::RawFd;

use pyo3::prelude::*;

/// Collect `pid`'s exit status if it has ended (`waitpid(WNOHANG)`); `None` while it runs.
pub fn try_reap(pid: i32) -> io::Result<Option<i32>> {
    let mut status: libc::c_int = 0;
    loop {
        // SAFETY: waitpid only writes the status integer we own.
        let r = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
        if r == pid {
            return Ok(Some(status));
        }
        if r == 0 {
            return Ok(None);
        }
        let err = io::Error::last_os_error();
        if err.kind() != io::ErrorKind::Interrupted {
            return Err(err);
        }
    }
}

/// Whether `pid` has ended, without reaping it (`waitid(WNOWAIT)`): its status stays
/// available to [`try_reap`]. An unknown pid (already reaped) counts as ended.
pub fn has_exited(pid: i32) -> bool {
    loop {
        // SAFETY: a zeroed siginfo_t is a valid out-parameter for waitid.
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        let flags = libc::WEXITED | libc::WNOHANG | libc::WNOWAIT;
        // SAFETY: waitid writes only into `info`.
        let r = unsafe { libc::waitid(libc::P_PID, pid as libc::id_t, &mut info, flags) };
        if r == 0 {
            // SAFETY: waitid filled `info` (si_pid stays 0 when nothing has ended).
            return unsafe { info.si_pid() } != 0;
        }
        if io::Error::last_os_error().kind() != io::ErrorKind::Interrupted {
            return true;
        }
    }
}

/// A pidfd for `pid`, if the kernel has them (Linux 5.3+).
pub fn pidfd(pid: i32) -> Option<libc::c_int> {
    // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    (fd >= 0).then_some(fd as libc::c_int)
}

/// Wait up to `timeout` (forever if `None`) for `pid` to end, and reap it.
/// `Ok(None)`: still running at the timeout.
pub fn reap_within(pid: i32, timeout: Option<Duration>) -> io::Result<Option<i32>> {
    if let Some(status) = try_reap(pid)? {
        return Ok(Some(status));
    }
    let deadline = timeout.map(|t| Instant::now() + t);
    let fd = pidfd(pid);
    let mut pause = Duration::from_micros(50);
    let result = loop {
        let left = match deadline {
            Some(d) => {
                let now = Instant::now();
                if now >= d {
                    break Ok(None);
                }
                Some(d - now)
            }
            None => None,
        };
        match fd {
            Some(fd) => {
                // Wake when the child ends, or at least every 100 ms (a pidfd that never
                // becomes readable would otherwise block an untimed wait forever).
                let slice = left
                    .unwrap_or(Duration::from_millis(100))
                    .min(Duration::from_millis(100));
                let mut pfd = libc::pollfd {
                    fd,
                    events: libc::POLLIN,
                    revents: 0,
                };
                let ms = slice.as_millis().clamp(1, i32::MAX as u128) as libc::c_int;
                // SAFETY: one valid pollfd.
                unsafe { libc::poll(&mut pfd, 1, ms) };
            }
            None => {
                std::thread::sleep(left.map_or(pause, |l| l.min(pause)));
                pause = (pause * 2).min(Duration::from_millis(5));
            }
        }
        match try_reap(pid) {
            Ok(None) => continue,
            other => break other,
        }
    };
    if let Some(fd) = fd {
        // SAFETY: we own this fd.
        unsafe { libc::close(fd) };
    }
    result
}

/// Send `signal` to `pid`; a child that is already gone is not an error.
pub fn signal(pid: i32, signal: i32) -> io::Result<()> {
    // SAFETY: kill has no memory effects.
    if unsafe { libc::kill(pid, signal) } == 0 {
        return Ok(());
    }
    let err = io::Error::last_os_error();
    if err.raw_os_error() == Some(libc::ESRCH) {
        return Ok(());
    }
    Err(err)
}

/// End `pid` for good: SIGTERM, up to `grace` to exit, then SIGKILL; reap it either way.
pub fn terminate_child(pid: i32, grace: Duration) -> io::Result<i32> {
    if let Some(status) = try_reap(pid)? {
        return Ok(status);
    }
    signal(pid, libc::SIGTERM)?;
    if let Some(status) = reap_within(pid, Some(grace))? {
        return Ok(status);
    }
    signal(pid, libc::SIGKILL)?;
    Ok(reap_within(pid, None)?.expect("an untimed wait returns a status"))
}

// -- the fork gate ---------------------------------------------------------------------

/// One process-wide gate between forks and the births and deaths of minigun's thread
/// states.
///
/// Attaching a thread that has no Python thread state creates one, and detaching it the
/// last time deletes it, both under CPython's runtime-wide `HEAD_LOCK`; creation happens
/// before the thread takes the GIL. CPython 3.11 and 3.12 do not hold `HEAD_LOCK` across
/// `fork()`, so a child forked at that instant deadlocks in `PyOS_AfterFork_Child`. Every
/// thread minigun starts therefore creates and deletes its thread state inside the gate
/// (`thread_state.rs`), and every fork happens with the gate closed
/// ([`fork_gate_close`] / [`fork_gate_open`]): no fork can meet a half-made thread state,
/// whatever the timing. A waiting fork has priority over threads about to pass, so a
/// stream of new threads (spawn_thread) cannot starve it.
struct ForkGate {
    state: Mutex<GateState>,
    changed: Condvar,
}

struct GateState {
    /// Threads creating or deleting their thread state right now.
    passing: usize,
    /// Forks waiting for the gate, and whether one holds it closed.
    waiting: usize,
    closed: bool,
}

static GATE: ForkGate = ForkGate {
    state: Mutex::new(GateState {
        passing: 0,
        waiting: 0,
        closed: false,
    }),
    changed: Condvar::new(),
};

impl ForkGate {
    fn lock(&self) -> MutexGuard<'_, GateState> {
        // The state stays consistent whatever panicked while holding it.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn enter(&self) {
        let mut state = self.lock();
        while state.closed || state.waiting > 0 {
            state = self.changed.wait(state).unwrap_or_else(|e| e.into_inner());
        }
        state.passing += 1;
    }

    fn leave(&self) {
        let mut state = self.lock();
        state.passing -= 1;
        if state.passing == 0 {
            self.changed.notify_all();
        }
    }

    fn close(&self) {
        let mut state = self.lock();
        state.waiting += 1;
        while state.closed || state.passing > 0 {
            state = self.changed.wait(state).unwrap_or_else(|e| e.into_inner());
        }
        state.waiting -= 1;
        state.closed = true;
    }

    fn open(&self) {
        let mut state = self.lock();
        state.closed = false;
        self.changed.notify_all();
    }

    /// Pass now if no fork holds or waits for the gate; false (not passed) otherwise.
    fn try_enter(&self) -> bool {
        let mut state = self.lock();
        if state.closed || state.waiting > 0 {
            return false;
        }
        state.passing += 1;
        true
    }
}

/// The parent's file descriptors that a new child must close: the pipes and pidfds of
/// every live child and the wake-up fds of the runs' child tables. A child closes what
/// [`fork_gate_close`] listed at its fork; an fd is closed only through [`close_fds`],
/// which passes the gate, so no fd on that list can be closed (and its number reused by
/// anything else) between the listing and the fork.
static PARENT_FDS: Mutex<Vec<RawFd>> = Mutex::new(Vec::new());

fn parent_fds() -> MutexGuard<'static, Vec<RawFd>> {
    PARENT_FDS.lock().unwrap_or_else(|e| e.into_inner())
}

/// Put `fds` on the list every new child closes.
pub fn register_fds(fds: &[RawFd]) {
    parent_fds().extend_from_slice(fds);
}

/// Close registered fds. Passes the fork gate, so it may wait for a fork in progress:
/// call it only while detached from Python (a fork waits for the gate without the GIL,
/// then attaches), never from a forked child.
pub fn close_fds(fds: &[RawFd]) {
    GATE.enter();
    close_listed(fds);
    GATE.leave();
}

/// Like [`close_fds`] if the gate is open now; false (nothing closed) if a fork holds it.
/// For destructors, which may run attached and so must not wait for the gate.
pub fn try_close_fds(fds: &[RawFd]) -> bool {
    if !GATE.try_enter() {
        return false;
    }
    close_listed(fds);
    GATE.leave();
    true
}

fn close_listed(fds: &[RawFd]) {
    let mut listed = parent_fds();
    for &fd in fds {
        if let Some(at) = listed.iter().position(|&f| f == fd) {
            listed.swap_remove(at);
            // SAFETY: a registered fd is owned by the runtime and closed only here.
            unsafe { libc::close(fd) };
        }
    }
}

/// Pass the gate to make or delete a thread state (`thread_state.rs`): waits while a fork
/// holds or waits for it, so call it only detached.
pub fn enter_gate() {
    GATE.enter();
}

/// Pass the gate now if no fork holds or waits for it (false: not passed). For a thread
/// that holds the GIL, which must not wait for the gate.
pub fn try_enter_gate() -> bool {
    GATE.try_enter()
}

/// Done making or deleting a thread state.
pub fn leave_gate() {
    GATE.leave();
}

/// `fork_gate_close() -> list[int]`: wait (without the GIL) until no minigun thread is
/// creating or deleting its thread state (or closing a registered fd), and keep them from
/// starting to until `fork_gate_open()`. Returns the parent's registered fds, which the
/// child about to be forked must close. Called by `minigun.fork_safety` just before
/// `os.fork()`; the child never opens it (a forked child runs no Rust code).
#[pyfunction]
pub fn fork_gate_close(py: Python<'_>) -> Vec<RawFd> {
    py.detach(|| {
        GATE.close();
        parent_fds().clone()
    })
}

/// `fork_gate_open()`: the parent's side of a fork is done.
#[pyfunction]
pub fn fork_gate_open() {
    GATE.open();
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Fork a child that runs `body` (async-signal-safe calls only) and then `_exit`s.
    fn spawn(body: fn() -> i32) -> i32 {
        // SAFETY: the child only calls async-signal-safe functions before _exit.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0, "fork failed");
        if pid == 0 {
            let code = body();
            // SAFETY: leaving the child without running anything of the parent's.
            unsafe { libc::_exit(code) };
        }
        pid
    }

    fn sleep_long() -> i32 {
        // SAFETY: sleep is async-signal-safe.
        unsafe { libc::sleep(30) };
        0
    }

    #[test]
    fn reaps_the_exit_code() {
        let pid = spawn(|| 7);
        let status = reap_within(pid, Some(Duration::from_secs(5)))
            .unwrap()
            .unwrap();
        assert!(libc::WIFEXITED(status));
        assert_eq!(libc::WEXITSTATUS(status), 7);
        // Reaped: a second wait knows no such child.
        assert_eq!(
            try_reap(pid).unwrap_err().raw_os_error(),
            Some(libc::ECHILD)
        );
    }

    #[test]
    fn times_out_while_running_then_terminates() {
        let pid = spawn(sleep_long);
        let t = Instant::now();
        assert_eq!(
            reap_within(pid, Some(Duration::from_millis(30))).unwrap(),
            None
        );
        assert!(t.elapsed() >= Duration::from_millis(30));
        assert!(!has_exited(pid));
        let status = terminate_child(pid, Duration::from_secs(5)).unwrap();
        assert!(libc::WIFSIGNALED(status));
        assert_eq!(libc::WTERMSIG(status), libc::SIGTERM);
    }

    #[test]
    fn kills_a_child_that_ignores_sigterm() {
        // The child inherits a mask that blocks SIGTERM, so SIGTERM never ends it.
        // SAFETY: sigset manipulation on locals; the mask is restored in this thread.
        let pid = unsafe {
            let mut set: libc::sigset_t = std::mem::zeroed();
            let mut old: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            libc::sigaddset(&mut set, libc::SIGTERM);
            libc::pthread_sigmask(libc::SIG_BLOCK, &set, &mut old);
            let pid = spawn(sleep_long);
            libc::pthread_sigmask(libc::SIG_SETMASK, &old, std::ptr::null_mut());
            pid
        };
        let t = Instant::now();
        let status = terminate_child(pid, Duration::from_millis(50)).unwrap();
        assert!(libc::WIFSIGNALED(status));
        assert_eq!(libc::WTERMSIG(status), libc::SIGKILL);
        assert!(t.elapsed() >= Duration::from_millis(50) && t.elapsed() < Duration::from_secs(5));
    }

    #[test]
    fn peeking_does_not_reap() {
        let pid = spawn(|| 3);
        let t = Instant::now();
        while !has_exited(pid) {
            assert!(t.elapsed() < Duration::from_secs(5));
            std::thread::sleep(Duration::from_millis(1));
        }
        assert!(has_exited(pid)); // still there to reap
        let status = try_reap(pid).unwrap().unwrap();
        assert_eq!(libc::WEXITSTATUS(status), 3);
    }

    #[test]
    fn signalling_a_gone_child_is_fine() {
        let pid = spawn(|| 0);
        reap_within(pid, None).unwrap().unwrap();
        // The pid is free now; ESRCH is not an error (a reused pid is not our concern
        // here: minigun never signals a pid it has reaped).
        let _ = signal(pid, 0);
    }
}
