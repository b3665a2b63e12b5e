//! envd on AF_VSOCK: the host agent reaches the same axum app over the VM's vsock device
//! without any guest networking. tokio has no vsock type, so this is a small listener over a
//! non-blocking socket registered with the reactor ([`AsyncFd`]): `accept4` for connections
//! and `recv`/`send` for their bytes. It plugs into `axum::serve` through axum's
//! [`Listener`](axum::serve::Listener) trait.
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use nix::sys::socket::{
    AddressFamily, Backlog, MsgFlags, Shutdown, SockFlag, SockType, VsockAddr, accept4, bind,
    getpeername, getsockname, listen, recv, send, shutdown, socket,
};
use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Registers an owned socket with the reactor.
fn register(fd: OwnedFd) -> io::Result<AsyncFd<OwnedFd>> {
    // SAFETY: an `OwnedFd` is an open descriptor that it alone closes, on drop, so it stays
    // open and the same for as long as the `AsyncFd` that owns it lives.
    Ok(unsafe { AsyncFd::register(fd) }?)
}

/// A vsock endpoint: context id and port (zeros when the socket is not a vsock one).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VsockAddress {
    /// The context id (2 for the host, the guest's own otherwise).
    pub cid: u32,
    /// The port.
    pub port: u32,
}

impl From<VsockAddr> for VsockAddress {
    fn from(address: VsockAddr) -> Self {
        Self {
            cid: address.cid(),
            port: address.port(),
        }
    }
}

/// A listening stream socket served by tokio: AF_VSOCK from [`VsockListener::bind`], or any
/// listening stream socket (tests use AF_UNIX) from [`VsockListener::from_listening`].
#[derive(Debug)]
pub struct VsockListener {
    fd: AsyncFd<OwnedFd>,
}

impl VsockListener {
    /// Listens on `port` of any context id (the guest's). Fails when the kernel has no vsock.
    /// Must run inside a tokio runtime.
    pub fn bind(port: u32) -> io::Result<Self> {
        let fd = socket(
            AddressFamily::Vsock,
            SockType::Stream,
            SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
            None,
        )?;
        bind(fd.as_raw_fd(), &VsockAddr::new(libc::VMADDR_CID_ANY, port))?;
        listen(&fd, Backlog::new(128)?)?;
        Self::from_listening(fd)
    }

    /// Wraps a listening, non-blocking stream socket.
    pub fn from_listening(fd: OwnedFd) -> io::Result<Self> {
        Ok(Self { fd: register(fd)? })
    }

    /// The next connection.
    pub async fn accept(&self) -> io::Result<(VsockStream, VsockAddress)> {
        loop {
            let mut guard = self.fd.readable().await?;
            let accepted = guard.try_io(|inner| {
                accept4(
                    inner.get_ref(),
                    SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
                )
                .map_err(io::Error::from)
            });
            match accepted {
                Ok(Ok(fd)) => {
                    let peer = getpeername::<VsockAddr>(fd.as_raw_fd())
                        .map(VsockAddress::from)
                        .unwrap_or(VsockAddress { cid: 0, port: 0 });
                    return Ok((VsockStream::new(fd)?, peer));
                }
                Ok(Err(error)) => return Err(error),
                Err(_would_block) => {}
            }
        }
    }

    /// The address listened on.
    pub fn local_address(&self) -> io::Result<VsockAddress> {
        Ok(getsockname::<VsockAddr>(self.fd.get_ref().as_raw_fd())?.into())
    }
}

impl axum::serve::Listener for VsockListener {
    type Io = VsockStream;
    type Addr = VsockAddress;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            match VsockListener::accept(self).await {
                Ok(connection) => return connection,
                Err(error) => {
                    // Out of descriptors or memory: wait rather than spin (as axum does for TCP).
                    tracing::warn!(%error, "vsock accept failed");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        }
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        self.local_address()
    }
}

/// One accepted connection.
#[derive(Debug)]
pub struct VsockStream {
    fd: AsyncFd<OwnedFd>,
}

impl VsockStream {
    /// Wraps a connected, non-blocking stream socket.
    pub fn new(fd: OwnedFd) -> io::Result<Self> {
        Ok(Self { fd: register(fd)? })
    }
}

impl AsyncRead for VsockStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        loop {
            let mut guard = ready!(self.fd.poll_read_ready(cx))?;
            let unfilled = buf.initialize_unfilled();
            let read = guard.try_io(|inner| {
                recv(inner.get_ref().as_raw_fd(), unfilled, MsgFlags::empty())
                    .map_err(io::Error::from)
            });
            match read {
                Ok(Ok(count)) => {
                    buf.advance(count);
                    return Poll::Ready(Ok(()));
                }
                Ok(Err(error)) => return Poll::Ready(Err(error)),
                Err(_would_block) => {}
            }
        }
    }
}

impl AsyncWrite for VsockStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        loop {
            let mut guard = ready!(self.fd.poll_write_ready(cx))?;
            let written = guard.try_io(|inner| {
                send(inner.get_ref().as_raw_fd(), data, MsgFlags::MSG_NOSIGNAL)
                    .map_err(io::Error::from)
            });
            match written {
                Ok(result) => return Poll::Ready(result),
                Err(_would_block) => {}
            }
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(
            shutdown(self.fd.get_ref().as_raw_fd(), Shutdown::Write).map_err(io::Error::from),
        )
    }
}

/// Serves `app` on vsock `port` in the background; logs and returns when the kernel has no
/// vsock or the port is taken.
pub fn spawn(port: u32, app: axum::Router) {
    match VsockListener::bind(port) {
        Ok(listener) => {
            tracing::info!(port, "envd listening on vsock");
            tokio::spawn(async move {
                if let Err(error) = axum::serve(listener, app).await {
                    tracing::error!(%error, "vsock server stopped");
                }
            });
        }
        Err(error) => tracing::warn!(port, %error, "not serving on vsock"),
    }
}

#[cfg(test)]
mod tests {
    use nix::sys::socket::UnixAddr;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    use super::*;

    /// The listener and stream code is family-agnostic: serve the app over an AF_UNIX socket
    /// through the same accept4/AsyncFd path and speak HTTP to it.
    #[tokio::test]
    async fn test_listener_serves_axum_over_a_stream_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("envd.sock");
        let fd = socket(
            AddressFamily::Unix,
            SockType::Stream,
            SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
            None,
        )
        .unwrap();
        bind(fd.as_raw_fd(), &UnixAddr::new(&path).unwrap()).unwrap();
        listen(&fd, Backlog::new(8).unwrap()).unwrap();
        let listener = VsockListener::from_listening(fd).unwrap();
        // Not a vsock socket: the address reads as an error, not garbage.
        assert!(listener.local_address().is_err());
        let app = axum::Router::new().route(
            "/echo",
            axum::routing::post(|body: String| async move { body.to_uppercase() }),
        );
        tokio::spawn(async move { axum::serve(listener, app).await });

        for _ in 0..2 {
            let mut client = tokio::net::UnixStream::connect(&path).await.unwrap();
            let body = "x".repeat(100_000);
            let request = format!(
                "POST /echo HTTP/1.1\r\nhost: a\r\nconnection: close\r\ncontent-length: {}\r\n\r\n{body}",
                body.len()
            );
            client.write_all(request.as_bytes()).await.unwrap();
            let mut reply = String::new();
            client.read_to_string(&mut reply).await.unwrap();
            assert!(
                reply.starts_with("HTTP/1.1 200"),
                "{}",
                &reply[..100.min(reply.len())]
            );
            assert!(reply.ends_with(&"X".repeat(100_000)));
        }
    }

    #[tokio::test]
    async fn test_bind_vsock_reports_its_port_or_fails_cleanly() {
        // Hosts without vsock fail with an error (envd logs it and goes on); with vsock the
        // listener reports the port. Port numbers above 2^31 are unlikely to be in use.
        match VsockListener::bind(3_000_000_000) {
            Ok(listener) => {
                let address = listener.local_address().unwrap();
                assert_eq!(address.port, 3_000_000_000);
            }
            Err(error) => eprintln!("no vsock here: {error}"),
        }
    }
}
