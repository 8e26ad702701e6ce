//! Tun mode: a WAN between two network namespaces, for every IP packet
//! (TCP too, not only UDP).
//!
//! It opens two point-to-point tun devices, `a` and `b` (move each into
//! its namespace and give it an address once they exist, see
//! `bench/wan.sh`). What the kernel routes into `a` comes out of `b`
//! after the `up` impairments, what goes into `b` comes out of `a` after
//! the `down` ones: delay, jitter (order kept), loss, a rate limit with a
//! drop-tail queue, black-holing, each direction on its own and changeable
//! over the control port. The decisions are [`crate::link`]'s; this is the
//! I/O around them.

use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::Arc;
use std::time::Instant;

use tokio::io::unix::AsyncFd;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use crate::controls::{Controls, Direction};
use crate::link::{Link, Params, DEFAULT_QUEUE_LIMIT};
use crate::rng::Rng;

/// Largest packet read from a tun device.
const MAX_PACKET: usize = 65_535;
/// `ioctl(TUNSETIFF)` and its flags (linux/if_tun.h).
const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const IFF_TUN: libc::c_short = 0x0001;
const IFF_NO_PI: libc::c_short = 0x1000;

/// What tun mode needs.
#[derive(Clone, Debug)]
pub struct TunConfig {
    /// The device `up` traffic enters (and `down` traffic leaves).
    pub a: String,
    /// The device `up` traffic leaves (and `down` traffic enters).
    pub b: String,
    /// Loopback TCP address of the control port, if any.
    pub control: Option<SocketAddr>,
    /// Impairments a to b.
    pub up: Params,
    /// Impairments b to a.
    pub down: Params,
    /// Fixes every random decision.
    pub seed: u64,
}

/// One tun device, non-blocking.
struct Tun {
    fd: AsyncFd<OwnedFd>,
}

impl Tun {
    /// Creates (or attaches to) the tun device `name`, without packet
    /// information headers: each read is one IP packet.
    fn open(name: &str) -> io::Result<Tun> {
        if name.is_empty() || name.len() >= libc::IFNAMSIZ {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("tun device name {name:?} must have 1 to 15 bytes"),
            ));
        }
        // SAFETY: a C string literal; the result is checked.
        let raw = unsafe {
            libc::open(
                c"/dev/net/tun".as_ptr(),
                libc::O_RDWR | libc::O_NONBLOCK | libc::O_CLOEXEC,
            )
        };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `raw` is a file descriptor we just opened and own.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        // SAFETY: an all-zero ifreq is valid; we set its name and flags.
        let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
        for (dst, src) in req.ifr_name.iter_mut().zip(name.bytes()) {
            *dst = src as libc::c_char;
        }
        req.ifr_ifru.ifru_flags = IFF_TUN | IFF_NO_PI;
        // SAFETY: TUNSETIFF takes a pointer to an ifreq, which lives here.
        if unsafe { libc::ioctl(fd.as_raw_fd(), TUNSETIFF as _, &mut req) } < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is an open descriptor the AsyncFd owns from here
        // on, so it stays open and the same for the AsyncFd's lifetime.
        let fd = unsafe { AsyncFd::register(fd) }.map_err(|e| e.into_parts().1)?;
        Ok(Tun { fd })
    }

    /// Reads one packet, waiting for one.
    async fn read(&self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            let mut guard = self.fd.readable().await?;
            let fd = guard.get_inner().as_raw_fd();
            // SAFETY: `buf` is valid for `buf.len()` bytes.
            let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
            if n >= 0 {
                return Ok(n as usize);
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::WouldBlock {
                return Err(e);
            }
            guard.clear_ready();
        }
    }

    /// Writes one packet; a full device drops it (as a full link would).
    fn write(&self, packet: &[u8]) {
        let fd = self.fd.get_ref().as_raw_fd();
        // SAFETY: `packet` is valid for `packet.len()` bytes.
        let _ = unsafe { libc::write(fd, packet.as_ptr().cast(), packet.len()) };
    }
}

/// A running tun-mode emulator; stopped when dropped.
pub struct TunHandle {
    controls: Controls,
    control_addr: Option<SocketAddr>,
    tasks: Vec<JoinHandle<()>>,
}

impl TunHandle {
    /// The control port's address, if there is one.
    pub fn control_addr(&self) -> Option<SocketAddr> {
        self.control_addr
    }

    /// The live impairments and counters.
    pub fn controls(&self) -> Controls {
        self.controls.clone()
    }
}

impl Drop for TunHandle {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// Opens both devices and starts forwarding on the current tokio runtime.
pub async fn start(config: TunConfig) -> io::Result<TunHandle> {
    if let Some(addr) = config.control {
        if !addr.ip().is_loopback() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("control address {addr} is not loopback (the control port has no authentication)"),
            ));
        }
    }
    let a = Arc::new(Tun::open(&config.a)?);
    let b = Arc::new(Tun::open(&config.b)?);
    let controls = Controls::new(config.up, config.down);
    let mut tasks = Vec::new();
    let control_addr = match config.control {
        Some(addr) => {
            let listener = TcpListener::bind(addr).await?;
            let addr = listener.local_addr()?;
            tasks.push(tokio::spawn(crate::control::serve(
                listener,
                controls.clone(),
            )));
            Some(addr)
        }
        None => None,
    };
    for (n, (from, to, direction)) in [
        (a.clone(), b.clone(), Direction::Up),
        (b, a, Direction::Down),
    ]
    .into_iter()
    .enumerate()
    {
        let rng = Rng::derive(config.seed, n as u64);
        let link = Link::with_rng(rng, DEFAULT_QUEUE_LIMIT).keep_order();
        tasks.push(tokio::spawn(forward(
            from,
            to,
            direction,
            link,
            controls.clone(),
        )));
    }
    Ok(TunHandle {
        controls,
        control_addr,
        tasks,
    })
}

/// One direction: packets read from `from` go through `link`, then out
/// of `to` when due.
async fn forward(
    from: Arc<Tun>,
    to: Arc<Tun>,
    direction: Direction,
    mut link: Link<Vec<u8>>,
    controls: Controls,
) {
    let mut buf = vec![0u8; MAX_PACKET];
    loop {
        let next = link.next_deadline();
        let sleep = async {
            match next {
                Some(at) => tokio::time::sleep_until(at.into()).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            read = from.read(&mut buf) => {
                let Ok(n) = read else { return };
                let now = Instant::now();
                let mut st = controls.lock();
                let params = st.params[direction.index()];
                let counters = &mut st.counters[direction.index()];
                link.push_sized(&params, counters, now, buf[..n].to_vec(), n);
            }
            _ = sleep => {}
        }
        let now = Instant::now();
        let mut due = Vec::new();
        {
            let mut st = controls.lock();
            let params = st.params[direction.index()];
            let counters = &mut st.counters[direction.index()];
            while let Some(packet) = link.poll(&params, counters, now) {
                due.push(packet);
            }
        }
        for packet in due {
            to.write(&packet);
        }
    }
}
