//! Pseudo-terminals for `Start` requests with a `pty`: the master side stays in envd (read
//! through tokio's reactor, never blocking a worker), the slave becomes the child's stdin,
//! stdout, stderr and controlling terminal.
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};

use nix::errno::Errno;
use nix::fcntl::{FcntlArg, OFlag, fcntl};
use nix::pty::{Winsize, grantpt, posix_openpt, ptsname_r, unlockpt};
use nix::sys::stat::Mode;
use tokio::io::unix::AsyncFd;

/// The master side of a pseudo-terminal.
#[derive(Debug)]
pub struct Pty {
    master: AsyncFd<OwnedFd>,
}

impl Pty {
    /// A new terminal of `cols` x `rows` (80x24 when either is zero), and its slave side for
    /// the child. Both descriptors are close-on-exec, so other children never inherit them
    /// (the child gets the slave through dup2, which clears the flag).
    pub fn open(cols: u32, rows: u32) -> io::Result<(Self, OwnedFd)> {
        let master = posix_openpt(OFlag::O_RDWR | OFlag::O_NOCTTY | OFlag::O_CLOEXEC)?;
        grantpt(&master)?;
        unlockpt(&master)?;
        let slave_path = ptsname_r(&master)?;
        let slave = nix::fcntl::open(
            slave_path.as_str(),
            OFlag::O_RDWR | OFlag::O_NOCTTY | OFlag::O_CLOEXEC,
            Mode::empty(),
        )?;
        let master = OwnedFd::from(master);
        let flags = OFlag::from_bits_truncate(fcntl(&master, FcntlArg::F_GETFL)?);
        fcntl(&master, FcntlArg::F_SETFL(flags | OFlag::O_NONBLOCK))?;
        // SAFETY: `master` is an open descriptor owned by the OwnedFd that moves into the
        // AsyncFd; it stays open, and `as_raw_fd` keeps returning it, until the AsyncFd drops.
        let master = unsafe { AsyncFd::register(master) }.map_err(|e| e.into_parts().1)?;
        let pty = Self { master };
        pty.resize(cols, rows)?;
        Ok((pty, slave))
    }

    /// Reads what the child wrote; `Ok(0)` once every slave descriptor is closed (Linux
    /// reports that as `EIO` on the master).
    pub async fn read(&self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            let mut guard = self.master.readable().await?;
            match guard.try_io(|fd| nix::unistd::read(fd.get_ref(), buf).map_err(io::Error::from)) {
                Ok(Ok(n)) => return Ok(n),
                Ok(Err(error)) if error.raw_os_error() == Some(Errno::EIO as i32) => return Ok(0),
                Ok(Err(error)) => return Err(error),
                Err(_would_block) => {}
            }
        }
    }

    /// The master's descriptor (non-blocking).
    pub fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        std::os::fd::AsFd::as_fd(self.master.get_ref())
    }

    /// Writes all of `data` to the terminal (the child reads it as typed input).
    pub async fn write_all(&self, mut data: &[u8]) -> io::Result<()> {
        while !data.is_empty() {
            let mut guard = self.master.writable().await?;
            match guard.try_io(|fd| nix::unistd::write(fd.get_ref(), data).map_err(io::Error::from))
            {
                Ok(Ok(0)) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(Ok(n)) => data = &data[n..],
                Ok(Err(error)) => return Err(error),
                Err(_would_block) => {}
            }
        }
        Ok(())
    }

    /// Sets the terminal size; the kernel sends SIGWINCH to the foreground process group.
    pub fn resize(&self, cols: u32, rows: u32) -> io::Result<()> {
        let (cols, rows) = if cols == 0 || rows == 0 {
            (80, 24)
        } else {
            (cols, rows)
        };
        let size = Winsize {
            ws_row: u16::try_from(rows).unwrap_or(u16::MAX),
            ws_col: u16::try_from(cols).unwrap_or(u16::MAX),
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        // SAFETY: the descriptor is our open pty master; TIOCSWINSZ reads one `winsize` from
        // the pointer, which points at a live, initialised local for the whole call.
        let result = unsafe {
            libc::ioctl(
                self.master.get_ref().as_raw_fd(),
                libc::TIOCSWINSZ,
                &raw const size,
            )
        };
        Errno::result(result).map(drop).map_err(io::Error::from)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn test_pty_echoes_written_input() {
        let (pty, slave) = Pty::open(100, 30).unwrap();
        // Canonical mode with echo: what we type comes back on the master.
        pty.write_all(b"hi\n").await.unwrap();
        let mut buf = [0u8; 64];
        let n = pty.read(&mut buf).await.unwrap();
        assert!(buf[..n].starts_with(b"hi"), "{:?}", &buf[..n]);
        let mut size = Winsize {
            ws_row: 0,
            ws_col: 0,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        // SAFETY: `slave` is an open terminal; TIOCGWINSZ writes one `winsize` into `size`.
        let result = unsafe { libc::ioctl(slave.as_raw_fd(), libc::TIOCGWINSZ, &raw mut size) };
        assert_eq!(result, 0);
        assert_eq!((size.ws_col, size.ws_row), (100, 30));
        drop(slave);
        // With every slave closed the master reads as end of file.
        let mut rest = [0u8; 64];
        loop {
            let n = pty.read(&mut rest).await.unwrap();
            if n == 0 {
                break;
            }
        }
    }
}
