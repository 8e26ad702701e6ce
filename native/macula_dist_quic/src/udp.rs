//! The UDP socket under quinn, shared by the relay's and the node's
//! wrappers (`macula_dist_relay::relay_socket`, `macula_dist_node::node_socket`): quinn-udp's
//! batched I/O (GSO/GRO) on a tokio socket, as quinn's own tokio runtime
//! does, plus helpers to walk the datagrams of a GRO batch.

use std::fmt;
use std::io::{self, IoSliceMut};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use anyhow::Context as _;
use quinn::udp::{RecvMeta, Transmit, UdpSocketState};
use quinn::UdpPoller;
use tokio::io::Interest;

/// Socket buffers as large as the system allows, so bursts are not dropped
/// before they are read.
pub const SOCKET_BUFFER: usize = 4 << 20;

/// A UDP socket with quinn-udp's batched I/O, for an `AsyncUdpSocket` to wrap.
pub struct UdpIo {
    io: tokio::net::UdpSocket,
    state: UdpSocketState,
}

impl fmt::Debug for UdpIo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UdpIo").field("io", &self.io).finish()
    }
}

impl UdpIo {
    /// Binds `addr` (inside a tokio runtime).
    pub fn bind(addr: SocketAddr) -> anyhow::Result<Self> {
        let socket =
            std::net::UdpSocket::bind(addr).with_context(|| format!("binding UDP {addr}"))?;
        let sock = socket2::SockRef::from(&socket);
        let _ = sock.set_recv_buffer_size(SOCKET_BUFFER);
        let _ = sock.set_send_buffer_size(SOCKET_BUFFER);
        let state = UdpSocketState::new((&socket).into())?;
        socket.set_nonblocking(true)?;
        Ok(UdpIo {
            io: tokio::net::UdpSocket::from_std(socket)?,
            state,
        })
    }

    /// The address the socket is bound to.
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.io.local_addr()
    }

    /// Sends now or fails with `WouldBlock`.
    pub fn try_send(&self, transmit: &Transmit) -> io::Result<()> {
        self.io.try_io(Interest::WRITABLE, || {
            self.state.send((&self.io).into(), transmit)
        })
    }

    /// Receives a batch of datagrams (GRO), or registers the waker.
    pub fn poll_recv(
        &self,
        cx: &mut Context,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> Poll<io::Result<usize>> {
        loop {
            ready!(self.io.poll_recv_ready(cx))?;
            if let Ok(n) = self.io.try_io(Interest::READABLE, || {
                self.state.recv((&self.io).into(), bufs, meta)
            }) {
                return Poll::Ready(Ok(n));
            }
        }
    }

    /// Datagrams one GSO send may carry.
    pub fn max_transmit_segments(&self) -> usize {
        self.state.max_gso_segments()
    }

    /// Datagrams one GRO receive may carry.
    pub fn max_receive_segments(&self) -> usize {
        self.state.gro_segments()
    }

    /// Whether sent datagrams may be fragmented (no DF bit).
    pub fn may_fragment(&self) -> bool {
        self.state.may_fragment()
    }
}

/// quinn's "wait until the socket can send".
#[derive(Debug)]
pub struct Writable(pub Arc<UdpIo>);

impl UdpPoller for Writable {
    fn poll_writable(self: Pin<&mut Self>, cx: &mut Context) -> Poll<io::Result<()>> {
        self.0.io.poll_send_ready(cx)
    }
}

/// The datagrams of a received batch: `(offset, len)` of each, every
/// `stride` bytes (GRO), the last one possibly shorter.
pub fn segments(len: usize, stride: usize) -> impl Iterator<Item = (usize, usize)> {
    let stride = if stride == 0 { len.max(1) } else { stride };
    (0..len)
        .step_by(stride)
        .map(move |off| (off, stride.min(len - off)))
}

/// Moves the filled slots of a batch to the front (empty ones have
/// `len == 0`), copying data between slots only when one was emptied.
/// Returns how many slots are filled.
pub fn compact_slots(bufs: &mut [IoSliceMut<'_>], meta: &mut [RecvMeta], n: usize) -> usize {
    let mut w = 0;
    for r in 0..n {
        if meta[r].len == 0 {
            continue;
        }
        if w != r {
            let (front, back) = bufs.split_at_mut(r);
            let len = meta[r].len;
            front[w][..len].copy_from_slice(&back[0][..len]);
            meta[w] = meta[r];
        }
        w += 1;
    }
    w
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segments_of_a_batch() {
        assert_eq!(
            segments(10, 4).collect::<Vec<_>>(),
            vec![(0, 4), (4, 4), (8, 2)]
        );
        assert_eq!(segments(8, 8).collect::<Vec<_>>(), vec![(0, 8)]);
        assert_eq!(segments(5, 0).collect::<Vec<_>>(), vec![(0, 5)]);
        assert_eq!(segments(0, 0).count(), 0);
    }
}
