//! One shared stop signal for a whole run.
//!
//! A flag for cheap polling in hot loops, and a channel that never carries a message but
//! disconnects when the signal is set, so every blocking `select!` wakes at once.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use crossbeam_channel::{Receiver, Sender};

#[derive(Clone)]
pub struct Shutdown {
    inner: Arc<Inner>,
}

struct Inner {
    flag: AtomicBool,
    tx: Mutex<Option<Sender<()>>>,
    rx: Receiver<()>,
}

impl Shutdown {
    /// An identity of this run's shutdown signal (so of the run) while it is alive.
    pub fn id(&self) -> usize {
        Arc::as_ptr(&self.inner) as usize
    }

    pub fn new() -> Self {
        let (tx, rx) = crossbeam_channel::bounded(0);
        Shutdown {
            inner: Arc::new(Inner {
                flag: AtomicBool::new(false),
                tx: Mutex::new(Some(tx)),
                rx,
            }),
        }
    }

    pub fn set(&self) {
        self.inner.flag.store(true, Ordering::Release);
        self.inner.tx.lock().unwrap().take();
    }

    pub fn is_set(&self) -> bool {
        self.inner.flag.load(Ordering::Acquire)
    }

    /// Becomes ready (disconnected) once the signal is set.
    pub fn receiver(&self) -> &Receiver<()> {
        &self.inner.rx
    }

    /// Sleep up to `dur`, returning early (with `true`) if the signal is set.
    pub fn sleep(&self, dur: std::time::Duration) -> bool {
        crossbeam_channel::select! {
            recv(self.inner.rx) -> _ => true,
            default(dur) => self.is_set(),
        }
    }
}

impl Default for Shutdown {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    #[test]
    fn set_wakes_sleepers() {
        let s = Shutdown::new();
        let s2 = s.clone();
        let t = std::thread::spawn(move || {
            let start = Instant::now();
            assert!(s2.sleep(Duration::from_secs(10)));
            start.elapsed()
        });
        std::thread::sleep(Duration::from_millis(20));
        s.set();
        assert!(t.join().unwrap() < Duration::from_secs(2));
        assert!(s.is_set());
    }
}
