//! Handing the GIL from one worker to the next without a sleep, on builds with a GIL.
//!
//! A thread that asks for the GIL while another holds it sleeps on the GIL's condition
//! variable and is woken when the holder lets go. On this project's VMs that wake-up
//! takes 10 to 20 µs, and in that time no thread runs Python: W1, three cheap stages
//! taking turns, hands the GIL over about 3,000 times per million items, and those gaps
//! were a quarter of its time.
//!
//! So workers count their holds of the GIL ([`attach`], [`detach`]), and a worker about to
//! ask for it while exactly one other worker holds it first waits, awake, for that count
//! to drop: it polls and yields its core between polls (so a waiter that shares a core
//! with the holder gives the core back), then asks for the GIL just after it is released
//! and gets it without sleeping. The wait is bounded ([`POLL_LIMIT`]), at most
//! [`MAX_POLLERS`] workers wait this way at once, and a wait that runs out (the holder
//! runs long user code, or let the GIL go inside it, which the count cannot see) turns
//! polling off for [`QUIET_AFTER_TIMEOUT`]. Free-threaded builds have no GIL to hand
//! over, and on a single core a poller would only take the holder's time: there nobody
//! polls.
//!
//! The count is a hint, never a lock: a wrong count costs a poll, not a result.
//!
//! A chunk-mode call (an async, process, subinterpreter or Ray stage) is not counted
//! ([`uncounted`]): it spends its time waiting for work done elsewhere, often with the GIL
//! let go inside Python (an event loop's `epoll`, a `select` on a pipe), where the count
//! cannot see it. Counted, it made every other worker that wanted the GIL poll to the
//! limit and then quiet polling for everyone.

use std::cell::Cell;
use std::sync::atomic::{AtomicBool, AtomicIsize, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Once, OnceLock};
use std::time::{Duration, Instant};

use pyo3::prelude::*;

/// The longest a worker polls for the GIL's release before it asks for it anyway. A turn
/// of a cheap stage (a queue's worth of items) takes 100 to 300 µs; W4's accumulator,
/// which wants the GIL once per batch, waits for the producer to fill its queue. W4 ran
/// 7% faster with 500 µs than with 200, W1 the same.
pub const POLL_LIMIT: Duration = Duration::from_micros(500);
/// Workers polling at once: the next holder and the one after it. More would only burn
/// cores while one thread runs Python.
pub const MAX_POLLERS: usize = 2;
/// After a poll ran out, nobody polls for this long.
pub const QUIET_AFTER_TIMEOUT: Duration = Duration::from_millis(10);
/// Polls between two yields of the core.
const SPINS_PER_YIELD: u32 = 16;

/// The hand-off state of one process (the GIL is one per process).
pub struct Handoff {
    /// Whether waiting workers poll (set once: GIL build, more than one core).
    polling: AtomicBool,
    /// Worker sections holding the GIL now.
    holders: AtomicIsize,
    /// Workers polling now.
    pollers: AtomicUsize,
    /// No poll starts before this, in nanoseconds since `epoch` (0: none).
    quiet_until: AtomicU64,
    epoch: Instant,
    /// The longest poll, and how long polling stays off after one ran out.
    limit: Duration,
    quiet_after_timeout: Duration,
}

/// How a wait for the GIL's release ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Wait {
    /// Nobody polled: polling is off, quiet, full, or the count was not exactly one.
    Skipped,
    /// The holder let go while polled.
    Released,
    /// The holder kept it past the limit.
    TimedOut,
}

impl Handoff {
    /// Polling off until `set_polling(true)`.
    pub fn new(limit: Duration, quiet_after_timeout: Duration) -> Self {
        Handoff {
            polling: AtomicBool::new(false),
            holders: AtomicIsize::new(0),
            pollers: AtomicUsize::new(0),
            quiet_until: AtomicU64::new(0),
            epoch: Instant::now(),
            limit,
            quiet_after_timeout,
        }
    }

    pub fn set_polling(&self, on: bool) {
        self.polling.store(on, Ordering::Relaxed);
    }

    fn now_nanos(&self) -> u64 {
        self.epoch.elapsed().as_nanos() as u64
    }

    /// Counted whether anybody polls or not, so the count stays right whenever polling is
    /// turned on: it is one atomic add per chunk a worker takes, not per item.
    pub fn held(&self) {
        self.holders.fetch_add(1, Ordering::Relaxed);
    }

    pub fn released(&self) {
        self.holders.fetch_sub(1, Ordering::Relaxed);
    }

    /// Before asking for the GIL: if exactly one worker holds it, wait awake (up to the
    /// limit) until it lets go.
    pub fn await_release(&self) -> Wait {
        if !self.polling.load(Ordering::Relaxed) || self.holders.load(Ordering::Relaxed) != 1 {
            return Wait::Skipped;
        }
        let quiet_until = self.quiet_until.load(Ordering::Relaxed);
        if quiet_until != 0 && self.now_nanos() < quiet_until {
            return Wait::Skipped;
        }
        if self.pollers.fetch_add(1, Ordering::Relaxed) >= MAX_POLLERS {
            self.pollers.fetch_sub(1, Ordering::Relaxed);
            return Wait::Skipped;
        }
        let started = Instant::now();
        let mut until_yield = SPINS_PER_YIELD;
        let outcome = loop {
            if self.holders.load(Ordering::Relaxed) != 1 {
                break Wait::Released;
            }
            until_yield -= 1;
            if until_yield == 0 {
                until_yield = SPINS_PER_YIELD;
                std::thread::yield_now();
                if started.elapsed() > self.limit {
                    let quiet = self.now_nanos() + self.quiet_after_timeout.as_nanos() as u64;
                    self.quiet_until.store(quiet, Ordering::Relaxed);
                    break Wait::TimedOut;
                }
            } else {
                std::hint::spin_loop();
            }
        };
        self.pollers.fetch_sub(1, Ordering::Relaxed);
        outcome
    }

    /// `f` with this thread's hold of the GIL, if it is counted, not counted.
    fn uncounted<R>(&self, f: impl FnOnce() -> R) -> R {
        let counted = COUNTED.replace(false);
        if counted {
            self.released();
        }
        let result = f();
        if counted {
            self.held();
        }
        COUNTED.set(counted);
        result
    }
}

static HANDOFF: OnceLock<Handoff> = OnceLock::new();

thread_local! {
    /// Whether this thread's hold of the GIL is counted (inside [`attach`], outside
    /// [`uncounted`]): [`detach`] uncounts and recounts only a counted hold.
    static COUNTED: Cell<bool> = const { Cell::new(false) };
}

fn handoff() -> &'static Handoff {
    HANDOFF.get_or_init(|| Handoff::new(POLL_LIMIT, QUIET_AFTER_TIMEOUT))
}

/// Turn polling on for this process where it helps: a build with a GIL, on more than one
/// core. Called by every new run, decided by the first: the answer never changes within a
/// process, and counting the cores reads the cgroup files (W5, a run per call, was 10%
/// slower when every run counted them).
pub fn configure(free_threaded: bool) {
    static CONFIGURED: Once = Once::new();
    CONFIGURED.call_once(|| {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        handoff().set_polling(!free_threaded && cores > 1);
    });
}

/// `Python::attach` for a worker: waits awake for another worker's hold to end first, and
/// counts this hold.
pub fn attach<R>(f: impl FnOnce(Python<'_>) -> R) -> R {
    let handoff = handoff();
    handoff.await_release();
    let result = Python::attach(|py| {
        handoff.held();
        let outer = COUNTED.replace(true);
        let result = f(py);
        COUNTED.set(outer);
        result
    });
    // Counted after the GIL is released, so a poller that sees the count drop finds it free.
    handoff.released();
    result
}

/// Inside a worker's hold: `f` runs with the hold uncounted, for code that waits with
/// the GIL let go where [`detach`] cannot see it (the module docs say why).
pub fn uncounted<R>(_py: Python<'_>, f: impl FnOnce() -> R) -> R {
    handoff().uncounted(f)
}

/// `py.detach` for a worker: the wait does not count as a hold, and getting the GIL back
/// afterwards waits awake as [`attach`] does.
pub fn detach<R: Send>(py: Python<'_>, f: impl FnOnce() -> R + Send) -> R {
    let handoff = handoff();
    py.detach(|| {
        handoff.uncounted(|| {
            let result = f();
            handoff.await_release();
            result
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::thread;

    const LONG: Duration = Duration::from_secs(10);

    fn polling(limit: Duration) -> Arc<Handoff> {
        let handoff = Arc::new(Handoff::new(limit, LONG));
        handoff.set_polling(true);
        handoff
    }

    #[test]
    fn a_waiter_goes_on_as_soon_as_the_holder_lets_go() {
        let handoff = polling(LONG);
        handoff.held();
        let holder = {
            let handoff = handoff.clone();
            thread::spawn(move || {
                thread::sleep(Duration::from_millis(20));
                handoff.released();
            })
        };
        let started = Instant::now();
        assert_eq!(handoff.await_release(), Wait::Released);
        assert!(started.elapsed() < LONG / 2);
        holder.join().unwrap();
    }

    #[test]
    fn a_wait_is_bounded_and_quiets_the_next_ones() {
        let limit = Duration::from_millis(5);
        let handoff = polling(limit);
        handoff.held();
        let started = Instant::now();
        assert_eq!(handoff.await_release(), Wait::TimedOut);
        let waited = started.elapsed();
        assert!(waited >= limit && waited < LONG / 2);
        assert_eq!(handoff.await_release(), Wait::Skipped);
    }

    #[test]
    fn nobody_polls_when_polling_is_off_or_the_count_is_not_one() {
        let handoff = Arc::new(Handoff::new(LONG, LONG));
        handoff.held();
        assert_eq!(handoff.await_release(), Wait::Skipped);
        handoff.set_polling(true);
        handoff.released();
        assert_eq!(handoff.await_release(), Wait::Skipped);
        // Two holders: one of them let the GIL go inside user code, which this cannot see.
        handoff.held();
        handoff.held();
        assert_eq!(handoff.await_release(), Wait::Skipped);
    }

    #[test]
    fn an_uncounted_stretch_of_a_counted_hold_is_not_polled_on() {
        let handoff = polling(LONG);
        handoff.held();
        COUNTED.set(true);
        let polled = handoff.uncounted(|| {
            // A detach inside the call leaves the count alone.
            assert_eq!(
                handoff.uncounted(|| handoff.holders.load(Ordering::Relaxed)),
                0
            );
            let waiter = handoff.clone();
            thread::spawn(move || waiter.await_release())
                .join()
                .unwrap()
        });
        assert_eq!(polled, Wait::Skipped);
        assert_eq!(handoff.holders.load(Ordering::Relaxed), 1);
        assert!(COUNTED.get());
        COUNTED.set(false);
        // Outside a counted hold, nothing is uncounted.
        handoff.uncounted(|| assert_eq!(handoff.holders.load(Ordering::Relaxed), 1));
    }

    #[test]
    fn at_most_max_pollers_wait_at_once() {
        let handoff = polling(LONG);
        handoff.held();
        let waiters: Vec<_> = (0..MAX_POLLERS)
            .map(|_| {
                let handoff = handoff.clone();
                thread::spawn(move || handoff.await_release())
            })
            .collect();
        while handoff.pollers.load(Ordering::Relaxed) < MAX_POLLERS {
            thread::yield_now();
        }
        assert_eq!(handoff.await_release(), Wait::Skipped);
        handoff.released();
        for waiter in waiters {
            assert_eq!(waiter.join().unwrap(), Wait::Released);
        }
    }
}
