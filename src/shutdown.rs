//! One shared stop signal for a whole run.
//!
//! A flag for cheap polling in hot loops, a channel that never carries a message but
//! disconnects when the signal is set, so every blocking `select!` wakes at once, and
//! listeners called once when it is set, for waits that cannot `select!` on a channel (a
//! condition variable, a `poll` on file descriptors: see children.rs).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use crossbeam_channel::{Receiver, Sender};

#[derive(Clone)]
pub struct Shutdown {
    inner: Arc<Inner>,
}

/// Called once, on the thread that sets the signal; it must not block.
pub type Listener = Box<dyn FnOnce() + Send>;

struct Inner {
    flag: AtomicBool,
    tx: Mutex<Option<Sender<()>>>,
    rx: Receiver<()>,
    /// `None` once the signal is set (listeners added later run at once).
    listeners: Mutex<Option<Vec<Listener>>>,
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
                listeners: Mutex::new(Some(Vec::new())),
            }),
        }
    }

    pub fn set(&self) {
        self.inner.flag.store(true, Ordering::Release);
        self.inner.tx.lock().unwrap().take();
        let listeners = self.inner.listeners.lock().unwrap().take();
        for listener in listeners.into_iter().flatten() {
            listener();
        }
    }

    /// Call `listener` once when the signal is set (now, if it already is).
    pub fn on_set(&self, listener: Listener) {
        let mut slot = self.inner.listeners.lock().unwrap();
        match slot.as_mut() {
            Some(listeners) => listeners.push(listener),
            None => {
                drop(slot);
                listener();
            }
        }
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

    #[test]
    fn listeners_run_once_also_when_added_late() {
        use std::sync::atomic::AtomicUsize;
        use std::sync::Arc;
        let s = Shutdown::new();
        let calls = Arc::new(AtomicUsize::new(0));
        let c = calls.clone();
        s.on_set(Box::new(move || {
            c.fetch_add(1, Ordering::SeqCst);
        }));
        assert_eq!(calls.load(Ordering::SeqCst), 0);
        s.set();
        s.set();
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        let c = calls.clone();
        s.on_set(Box::new(move || {
            c.fetch_add(10, Ordering::SeqCst);
        }));
        assert_eq!(calls.load(Ordering::SeqCst), 11);
    }
}
