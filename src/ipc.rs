//! Length-prefixed frames on raw pipe fds, read and written without the GIL.
//!
//! A frame is an 8-byte little-endian payload length followed by the payload (for minigun,
//! a pickle). The parent side of the fork strategies reads and writes frames with these
//! functions; forked children write the same format in pure Python (`struct.pack("<Q")`),
//! because a child must never call into this extension (see docs/forking.md).
//!
//! Waits are sliced: every [`TICK`] (also while a large frame keeps streaming in) the caller
//! gets control back through an `on_idle` callback, which is how the Python layer notices
//! that the run is stopping (the callback raises) or that the child has died although the
//! pipe is still open (a grandchild may hold its write end).

use std::io;
use std::os::fd::RawFd;
use std::time::{Duration, Instant};

use pyo3::exceptions::{PyEOFError, PyValueError};
use pyo3::prelude::*;
use pyo3::pybacked::PyBackedBytes;
use pyo3::types::PyByteArray;

use crate::fork;

/// Bytes of the length prefix.
pub const HEADER_LEN: usize = 8;
/// How often a waiting read or write hands control to its `on_idle` callback.
pub const TICK: Duration = Duration::from_millis(50);
/// Frames longer than this are a corrupted stream, not data (1 TiB).
pub const MAX_FRAME: u64 = 1 << 40;
/// Payloads up to this size are written with their header in one `write`.
const SMALL: usize = 64 * 1024;

/// What the `on_idle` callback reports.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Idle {
    /// Keep waiting.
    Continue,
    /// The process at the other end has exited: once the pipe holds no more data, treat
    /// it as closed even if its write end is still open somewhere.
    PeerGone,
}

/// Wait up to `timeout` for `events` on `fd`; true when ready (or hung up / in error).
fn poll_fd(fd: RawFd, events: libc::c_short, timeout: Duration) -> io::Result<bool> {
    let mut pfd = libc::pollfd {
        fd,
        events,
        revents: 0,
    };
    let ms = timeout.as_millis().clamp(0, i32::MAX as u128) as libc::c_int;
    // SAFETY: one valid pollfd.
    let r = unsafe { libc::poll(&mut pfd, 1, ms) };
    if r < 0 {
        let err = io::Error::last_os_error();
        if err.kind() == io::ErrorKind::Interrupted {
            return Ok(false);
        }
        return Err(err);
    }
    Ok(r > 0)
}

/// Make `fd` non-blocking (the sliced waits rely on it).
pub fn set_nonblocking(fd: RawFd) -> io::Result<()> {
    // SAFETY: fcntl on an fd has no memory effects.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    if flags < 0 {
        return Err(io::Error::last_os_error());
    }
    if flags & libc::O_NONBLOCK == 0 {
        // SAFETY: as above.
        if unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Calls `on_idle` at most once per [`TICK`].
struct Ticker<F> {
    last: Instant,
    on_idle: F,
    peer_gone: bool,
}

impl<E, F: FnMut() -> Result<Idle, E>> Ticker<F> {
    fn new(on_idle: F) -> Self {
        Ticker {
            last: Instant::now(),
            on_idle,
            peer_gone: false,
        }
    }

    /// Time left before the next tick is due.
    fn left(&self) -> Duration {
        TICK.saturating_sub(self.last.elapsed())
    }

    fn tick(&mut self) -> Result<(), E> {
        self.last = Instant::now();
        if (self.on_idle)()? == Idle::PeerGone {
            self.peer_gone = true;
        }
        Ok(())
    }

    fn tick_if_due(&mut self) -> Result<(), E> {
        if self.left().is_zero() {
            self.tick()?;
        }
        Ok(())
    }
}

/// Read until `buf` is full or the stream ends; returns how many bytes were read (fewer
/// than `buf.len()` only at the end of the stream). `fd` must be non-blocking.
pub fn read_full<E: From<io::Error>>(
    fd: RawFd,
    buf: &mut [u8],
    on_idle: impl FnMut() -> Result<Idle, E>,
) -> Result<usize, E> {
    let mut ticker = Ticker::new(on_idle);
    let mut got = 0;
    while got < buf.len() {
        let rest = &mut buf[got..];
        // SAFETY: reading into the unfilled tail of a buffer we own.
        let r = unsafe { libc::read(fd, rest.as_mut_ptr().cast(), rest.len()) };
        if r > 0 {
            got += r as usize;
            ticker.tick_if_due()?;
            continue;
        }
        if r == 0 {
            break; // every write end is closed
        }
        let err = io::Error::last_os_error();
        match err.kind() {
            io::ErrorKind::Interrupted => continue,
            io::ErrorKind::WouldBlock => {
                if ticker.peer_gone {
                    break; // the writer exited and the pipe is drained
                }
                let left = ticker.left();
                if left.is_zero() || !poll_fd(fd, libc::POLLIN, left)? {
                    ticker.tick()?;
                }
            }
            _ => return Err(err.into()),
        }
    }
    Ok(got)
}

/// Write all of `data`. `fd` must be non-blocking. A closed reader is `BrokenPipe`.
pub fn write_full<E: From<io::Error>>(
    fd: RawFd,
    data: &[u8],
    on_idle: impl FnMut() -> Result<Idle, E>,
) -> Result<(), E> {
    let mut ticker = Ticker::new(on_idle);
    let mut sent = 0;
    while sent < data.len() {
        let rest = &data[sent..];
        // SAFETY: writing from a slice we borrow.
        let r = unsafe { libc::write(fd, rest.as_ptr().cast(), rest.len()) };
        if r >= 0 {
            sent += r as usize;
            ticker.tick_if_due()?;
            continue;
        }
        let err = io::Error::last_os_error();
        match err.kind() {
            io::ErrorKind::Interrupted => continue,
            io::ErrorKind::WouldBlock => {
                if ticker.peer_gone {
                    return Err(io::Error::from(io::ErrorKind::BrokenPipe).into());
                }
                let left = ticker.left();
                if left.is_zero() || !poll_fd(fd, libc::POLLOUT, left)? {
                    ticker.tick()?;
                }
            }
            _ => return Err(err.into()),
        }
    }
    Ok(())
}

/// The header of a frame of `len` bytes.
pub fn header(len: usize) -> [u8; HEADER_LEN] {
    (len as u64).to_le_bytes()
}

/// Read one frame's header: `Ok(None)` at a clean end of stream (no byte of a new frame).
pub fn read_header<E: From<io::Error>>(
    fd: RawFd,
    on_idle: impl FnMut() -> Result<Idle, E>,
) -> Result<Option<u64>, E> {
    let mut head = [0u8; HEADER_LEN];
    let got = read_full(fd, &mut head, on_idle)?;
    if got == 0 {
        return Ok(None);
    }
    if got < HEADER_LEN {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "the pipe closed inside a frame header",
        )
        .into());
    }
    let len = u64::from_le_bytes(head);
    if len > MAX_FRAME {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("frame length {len} is not plausible"),
        )
        .into());
    }
    Ok(Some(len))
}

/// Write one frame.
pub fn write_frame_to<E: From<io::Error>>(
    fd: RawFd,
    payload: &[u8],
    mut on_idle: impl FnMut() -> Result<Idle, E>,
) -> Result<(), E> {
    if payload.len() <= SMALL {
        let mut all = Vec::with_capacity(HEADER_LEN + payload.len());
        all.extend_from_slice(&header(payload.len()));
        all.extend_from_slice(payload);
        return write_full(fd, &all, on_idle);
    }
    write_full(fd, &header(payload.len()), &mut on_idle)?;
    write_full(fd, payload, on_idle)
}

/// Read one frame into a new Vec: `Ok(None)` at a clean end of stream.
pub fn read_frame_vec<E: From<io::Error>>(
    fd: RawFd,
    mut on_idle: impl FnMut() -> Result<Idle, E>,
) -> Result<Option<Vec<u8>>, E> {
    let Some(len) = read_header(fd, &mut on_idle)? else {
        return Ok(None);
    };
    let mut buf = vec![0u8; len as usize];
    if read_full(fd, &mut buf, on_idle)? < buf.len() {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "the pipe closed inside a frame",
        )
        .into());
    }
    Ok(Some(buf))
}

fn io_to_py(err: io::Error) -> PyErr {
    match err.kind() {
        io::ErrorKind::UnexpectedEof => PyEOFError::new_err(err.to_string()),
        io::ErrorKind::InvalidData => PyValueError::new_err(err.to_string()),
        _ => PyErr::from(err),
    }
}

/// Errors of a sliced wait seen from Python: an I/O error, or what the tick callback raised.
struct Failed(PyErr);

impl From<io::Error> for Failed {
    fn from(err: io::Error) -> Self {
        Failed(io_to_py(err))
    }
}

/// The `on_idle` callback the Python functions use: call `tick()` (which raises to stop
/// the wait) and, if `pid` is given, report when that process has exited.
fn python_idle<'a>(
    tick: &'a Option<Py<PyAny>>,
    pid: Option<i32>,
) -> impl FnMut() -> Result<Idle, Failed> + Send + 'a {
    move || {
        if let Some(tick) = tick {
            Python::attach(|py| tick.call0(py)).map_err(Failed)?;
        }
        if pid.is_some_and(fork::has_exited) {
            return Ok(Idle::PeerGone);
        }
        Ok(Idle::Continue)
    }
}

/// A `&mut [u8]` that may cross into a detached closure.
struct RawSlice(*mut u8, usize);

// SAFETY: the slice points into a bytearray only this call can reach (see read_frame).
unsafe impl Send for RawSlice {}

/// `read_frame(fd, tick=None, pid=None) -> bytearray | None`: read one frame from `fd`
/// without the GIL and return its payload; None when the stream ended cleanly before a
/// new frame. `tick()` is called about every 50 ms while waiting (raise from it to give
/// up); with `pid`, the stream also counts as ended once that child has exited and the
/// pipe is drained. EOFError if the stream ends inside a frame. Makes `fd` non-blocking.
#[pyfunction]
#[pyo3(signature = (fd, tick=None, pid=None))]
pub fn read_frame<'py>(
    py: Python<'py>,
    fd: RawFd,
    tick: Option<Py<PyAny>>,
    pid: Option<i32>,
) -> PyResult<Option<Bound<'py, PyByteArray>>> {
    set_nonblocking(fd).map_err(io_to_py)?;
    let len = py
        .detach(|| read_header(fd, python_idle(&tick, pid)))
        .map_err(|Failed(e)| e)?;
    let Some(len) = len else { return Ok(None) };
    let len = usize::try_from(len)
        .map_err(|_| PyValueError::new_err("frame too large for this platform"))?;
    let frame = PyByteArray::new_with(py, len, |_| Ok(()))?;
    // SAFETY: the bytearray was just created and no other code holds a reference to it, so
    // nothing can resize or read it while we fill it without the GIL.
    let target = unsafe { frame.as_bytes_mut() };
    let raw = RawSlice(target.as_mut_ptr(), target.len());
    let got = py
        .detach(|| {
            let raw = raw;
            // SAFETY: see RawSlice; the bytearray outlives this call.
            let buf = unsafe { std::slice::from_raw_parts_mut(raw.0, raw.1) };
            read_full(fd, buf, python_idle(&tick, pid))
        })
        .map_err(|Failed(e)| e)?;
    if got < len {
        return Err(PyEOFError::new_err(format!(
            "the pipe closed inside a frame ({got} of {len} bytes)"
        )));
    }
    Ok(Some(frame))
}

/// `write_frame(fd, data, tick=None)`: write `data` as one frame to `fd` without the GIL,
/// calling `tick()` about every 50 ms while the pipe is full (raise from it to give up).
/// BrokenPipeError if the reader is gone. Makes `fd` non-blocking.
#[pyfunction]
#[pyo3(signature = (fd, data, tick=None))]
pub fn write_frame(
    py: Python<'_>,
    fd: RawFd,
    data: PyBackedBytes,
    tick: Option<Py<PyAny>>,
) -> PyResult<()> {
    set_nonblocking(fd).map_err(io_to_py)?;
    py.detach(|| write_frame_to(fd, &data, python_idle(&tick, None)))
        .map_err(|Failed(e)| e)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;

    fn pipe() -> (RawFd, RawFd) {
        let mut fds = [0; 2];
        // SAFETY: pipe fills two fds.
        assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
        set_nonblocking(fds[0]).unwrap();
        set_nonblocking(fds[1]).unwrap();
        (fds[0], fds[1])
    }

    fn close(fd: RawFd) {
        // SAFETY: closing an fd the test owns.
        unsafe { libc::close(fd) };
    }

    fn never_idle() -> Result<Idle, io::Error> {
        Ok(Idle::Continue)
    }

    #[test]
    fn frames_round_trip_and_end_cleanly() {
        let (r, w) = pipe();
        let writer = std::thread::spawn(move || {
            for payload in [&b""[..], b"one", &vec![7u8; 3 * SMALL + 5]] {
                write_frame_to(w, payload, never_idle).unwrap();
            }
            close(w);
        });
        assert_eq!(read_frame_vec(r, never_idle).unwrap().unwrap(), b"");
        assert_eq!(read_frame_vec(r, never_idle).unwrap().unwrap(), b"one");
        let big = read_frame_vec(r, never_idle).unwrap().unwrap();
        assert_eq!(big.len(), 3 * SMALL + 5);
        assert!(big.iter().all(|&b| b == 7));
        assert_eq!(read_frame_vec(r, never_idle).unwrap(), None);
        writer.join().unwrap();
        close(r);
    }

    #[test]
    fn a_large_frame_streams_through_a_small_pipe() {
        // 32 MB through a 64 KB pipe: the writer blocks until the reader drains it.
        let (r, w) = pipe();
        let n = 32 << 20;
        let writer = std::thread::spawn(move || {
            let data: Vec<u8> = (0..n).map(|i| (i % 251) as u8).collect();
            write_frame_to(w, &data, never_idle).unwrap();
            close(w);
        });
        let got = read_frame_vec(r, never_idle).unwrap().unwrap();
        assert_eq!(got.len(), n);
        assert!(got.iter().enumerate().all(|(i, &b)| b == (i % 251) as u8));
        writer.join().unwrap();
        close(r);
    }

    #[test]
    fn a_truncated_frame_is_an_error() {
        let (r, w) = pipe();
        let mut partial = header(10).to_vec();
        partial.extend_from_slice(b"abc");
        write_full(w, &partial, never_idle).unwrap();
        close(w);
        let err = read_frame_vec(r, never_idle).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
        close(r);

        let (r, w) = pipe();
        write_full(w, &[1, 2, 3], never_idle).unwrap();
        close(w);
        assert_eq!(
            read_header(r, never_idle).unwrap_err().kind(),
            io::ErrorKind::UnexpectedEof
        );
        close(r);
    }

    #[test]
    fn the_idle_callback_runs_while_waiting_and_can_stop_the_wait() {
        let (r, w) = pipe();
        let calls = Cell::new(0);
        let started = Instant::now();
        let err = read_frame_vec(r, || {
            calls.set(calls.get() + 1);
            if calls.get() >= 3 {
                Err(io::Error::other("stop"))
            } else {
                Ok(Idle::Continue)
            }
        })
        .unwrap_err();
        assert_eq!(err.to_string(), "stop");
        assert_eq!(calls.get(), 3);
        let waited = started.elapsed();
        assert!(
            waited >= TICK * 2 && waited < Duration::from_secs(2),
            "{waited:?}"
        );
        close(r);
        close(w);
    }

    #[test]
    fn a_gone_peer_ends_the_stream_once_drained() {
        // The write end stays open (as when a grandchild inherited it), but the peer is
        // reported gone: buffered frames are still delivered, then the stream ends.
        let (r, w) = pipe();
        write_frame_to(w, b"last words", never_idle).unwrap();
        let gone = || Ok::<_, io::Error>(Idle::PeerGone);
        assert_eq!(read_frame_vec(r, gone).unwrap().unwrap(), b"last words");
        let started = Instant::now();
        assert_eq!(read_frame_vec(r, gone).unwrap(), None);
        assert!(started.elapsed() < Duration::from_secs(1));
        close(r);
        close(w);
    }

    #[test]
    fn writing_to_a_closed_reader_is_a_broken_pipe() {
        // SAFETY: ignore SIGPIPE in this test process so write reports EPIPE (as Python does).
        unsafe { libc::signal(libc::SIGPIPE, libc::SIG_IGN) };
        let (r, w) = pipe();
        close(r);
        let err = write_frame_to(w, b"hello", never_idle).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::BrokenPipe);
        close(w);
    }
}
