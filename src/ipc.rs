//! Length-prefixed frames on raw pipe fds, read and written without the GIL.
//!
//! A frame is an 8-byte little-endian payload length followed by the payload (for minigun,
//! a pickle). The parent side of the fork strategies reads and writes frames through the
//! child handles of children.rs; forked children write the same format in pure Python
//! (`struct.pack("<Q")`), because a child must never call into this extension (see
//! docs/forking.md).
//!
//! Waiting is the caller's [`Wait`]: it blocks until the pipe may be ready, and ends the
//! transfer when the run stops or notices that the process at the other end has exited
//! (a grandchild may still hold the pipe's other end open).

use std::io;
use std::os::fd::RawFd;

/// Bytes of the length prefix.
pub const HEADER_LEN: usize = 8;
/// Frames longer than this are a corrupted stream, not data (1 TiB).
pub const MAX_FRAME: u64 = 1 << 40;
/// Payloads up to this size are written with their header in one `write`.
const SMALL: usize = 64 * 1024;

/// Why a transfer ended early.
#[derive(Debug)]
pub enum Interrupted {
    Io(io::Error),
    /// The run is stopping.
    Stopping,
}

impl From<io::Error> for Interrupted {
    fn from(err: io::Error) -> Self {
        Interrupted::Io(err)
    }
}

/// How a transfer waits for a non-blocking fd.
pub trait Wait {
    /// Called after every transfer that made progress: may end it (`Stopping`).
    fn check(&mut self) -> Result<(), Interrupted>;
    /// Block until `fd` may be ready for `events` (or something else needs attention).
    fn wait(&mut self, fd: RawFd, events: libc::c_short) -> Result<(), Interrupted>;
    /// The process at the other end has exited: a drained pipe counts as closed.
    fn peer_gone(&self) -> bool;
}

/// `poll` on `fds`, retried on EINTR; `timeout` in ms (-1: forever).
pub fn poll_fds(fds: &mut [libc::pollfd], timeout: libc::c_int) -> io::Result<()> {
    // SAFETY: a valid slice of pollfds.
    let r = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout) };
    if r < 0 {
        let err = io::Error::last_os_error();
        if err.kind() != io::ErrorKind::Interrupted {
            return Err(err);
        }
    }
    Ok(())
}

/// Make `fd` non-blocking (the waits rely on it).
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

/// Read until `buf` is full or the stream ends; returns how many bytes were read (fewer
/// than `buf.len()` only at the end of the stream). `fd` must be non-blocking.
pub fn read_full(fd: RawFd, buf: &mut [u8], waiter: &mut impl Wait) -> Result<usize, Interrupted> {
    let mut got = 0;
    while got < buf.len() {
        let rest = &mut buf[got..];
        // SAFETY: reading into the unfilled tail of a buffer we own.
        let r = unsafe { libc::read(fd, rest.as_mut_ptr().cast(), rest.len()) };
        if r > 0 {
            got += r as usize;
            waiter.check()?;
            continue;
        }
        if r == 0 {
            break; // every write end is closed
        }
        let err = io::Error::last_os_error();
        match err.kind() {
            io::ErrorKind::Interrupted => continue,
            io::ErrorKind::WouldBlock => {
                if waiter.peer_gone() {
                    break; // the writer exited and the pipe is drained
                }
                waiter.wait(fd, libc::POLLIN)?;
            }
            _ => return Err(err.into()),
        }
    }
    Ok(got)
}

/// Write all of `data`. `fd` must be non-blocking. A closed reader is `BrokenPipe`.
pub fn write_full(fd: RawFd, data: &[u8], waiter: &mut impl Wait) -> Result<(), Interrupted> {
    let mut sent = 0;
    while sent < data.len() {
        let rest = &data[sent..];
        // SAFETY: writing from a slice we borrow.
        let r = unsafe { libc::write(fd, rest.as_ptr().cast(), rest.len()) };
        if r >= 0 {
            sent += r as usize;
            waiter.check()?;
            continue;
        }
        let err = io::Error::last_os_error();
        match err.kind() {
            io::ErrorKind::Interrupted => continue,
            io::ErrorKind::WouldBlock => {
                if waiter.peer_gone() {
                    return Err(io::Error::from(io::ErrorKind::BrokenPipe).into());
                }
                waiter.wait(fd, libc::POLLOUT)?;
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
pub fn read_header(fd: RawFd, waiter: &mut impl Wait) -> Result<Option<u64>, Interrupted> {
    let mut head = [0u8; HEADER_LEN];
    let got = read_full(fd, &mut head, waiter)?;
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
pub fn write_frame_to(
    fd: RawFd,
    payload: &[u8],
    waiter: &mut impl Wait,
) -> Result<(), Interrupted> {
    if payload.len() <= SMALL {
        let mut all = Vec::with_capacity(HEADER_LEN + payload.len());
        all.extend_from_slice(&header(payload.len()));
        all.extend_from_slice(payload);
        return write_full(fd, &all, waiter);
    }
    write_full(fd, &header(payload.len()), waiter)?;
    write_full(fd, payload, waiter)
}

/// Read one frame into a new Vec: `Ok(None)` at a clean end of stream.
pub fn read_frame_vec(fd: RawFd, waiter: &mut impl Wait) -> Result<Option<Vec<u8>>, Interrupted> {
    let Some(len) = read_header(fd, waiter)? else {
        return Ok(None);
    };
    let mut buf = vec![0u8; len as usize];
    if read_full(fd, &mut buf, waiter)? < buf.len() {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "the pipe closed inside a frame",
        )
        .into());
    }
    Ok(Some(buf))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    /// Waits on the fd alone; stops after `stop_after` waits (if given); `gone` reports
    /// the peer exited.
    struct TestWait {
        waits: usize,
        stop_after: Option<usize>,
        gone: bool,
    }

    fn never_idle() -> TestWait {
        TestWait {
            waits: 0,
            stop_after: None,
            gone: false,
        }
    }

    impl Wait for TestWait {
        fn check(&mut self) -> Result<(), Interrupted> {
            Ok(())
        }
        fn wait(&mut self, fd: RawFd, events: libc::c_short) -> Result<(), Interrupted> {
            self.waits += 1;
            if self.stop_after.is_some_and(|n| self.waits >= n) {
                return Err(Interrupted::Stopping);
            }
            let mut pfd = [libc::pollfd {
                fd,
                events,
                revents: 0,
            }];
            poll_fds(&mut pfd, 20)?;
            Ok(())
        }
        fn peer_gone(&self) -> bool {
            self.gone
        }
    }

    fn kind(err: Interrupted) -> io::ErrorKind {
        match err {
            Interrupted::Io(e) => e.kind(),
            Interrupted::Stopping => panic!("stopped"),
        }
    }

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

    #[test]
    fn frames_round_trip_and_end_cleanly() {
        let (r, w) = pipe();
        let writer = std::thread::spawn(move || {
            for payload in [&b""[..], b"one", &vec![7u8; 3 * SMALL + 5]] {
                write_frame_to(w, payload, &mut never_idle()).unwrap();
            }
            close(w);
        });
        let mut wait = never_idle();
        assert_eq!(read_frame_vec(r, &mut wait).unwrap().unwrap(), b"");
        assert_eq!(read_frame_vec(r, &mut wait).unwrap().unwrap(), b"one");
        let big = read_frame_vec(r, &mut wait).unwrap().unwrap();
        assert_eq!(big.len(), 3 * SMALL + 5);
        assert!(big.iter().all(|&b| b == 7));
        assert_eq!(read_frame_vec(r, &mut wait).unwrap(), None);
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
            write_frame_to(w, &data, &mut never_idle()).unwrap();
            close(w);
        });
        let got = read_frame_vec(r, &mut never_idle()).unwrap().unwrap();
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
        write_full(w, &partial, &mut never_idle()).unwrap();
        close(w);
        let err = read_frame_vec(r, &mut never_idle()).unwrap_err();
        assert_eq!(kind(err), io::ErrorKind::UnexpectedEof);
        close(r);

        let (r, w) = pipe();
        write_full(w, &[1, 2, 3], &mut never_idle()).unwrap();
        close(w);
        let err = read_header(r, &mut never_idle()).unwrap_err();
        assert_eq!(kind(err), io::ErrorKind::UnexpectedEof);
        close(r);
    }

    #[test]
    fn the_waiter_can_stop_a_wait() {
        let (r, w) = pipe();
        let mut wait = TestWait {
            waits: 0,
            stop_after: Some(3),
            gone: false,
        };
        let err = read_frame_vec(r, &mut wait).unwrap_err();
        assert!(matches!(err, Interrupted::Stopping));
        assert_eq!(wait.waits, 3);
        close(r);
        close(w);
    }

    #[test]
    fn a_gone_peer_ends_the_stream_once_drained() {
        // The write end stays open (as when a grandchild inherited it), but the peer is
        // reported gone: buffered frames are still delivered, then the stream ends.
        let (r, w) = pipe();
        write_frame_to(w, b"last words", &mut never_idle()).unwrap();
        let mut gone = TestWait {
            waits: 0,
            stop_after: None,
            gone: true,
        };
        assert_eq!(
            read_frame_vec(r, &mut gone).unwrap().unwrap(),
            b"last words"
        );
        let started = Instant::now();
        assert_eq!(read_frame_vec(r, &mut gone).unwrap(), None);
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
        let err = write_frame_to(w, b"hello", &mut never_idle()).unwrap_err();
        assert_eq!(kind(err), io::ErrorKind::BrokenPipe);
        close(w);
    }
}
