//! The async glue: sockets, one engine task, a timer. All decisions are
//! made by [`Link`]; this file only moves datagrams in and out of it.

use std::collections::HashMap;
use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::ops::Deref;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::net::{TcpListener, UdpSocket};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

use crate::controls::{Controls, Direction, State};
use crate::link::{Link, Params, DEFAULT_QUEUE_LIMIT};
use crate::rng::Rng;

/// Largest UDP payload.
const MAX_DATAGRAM: usize = 65_535;

/// What [`Impair::start`] needs.
#[derive(Clone, Debug)]
pub struct Config {
    /// UDP address clients send to.
    pub listen: SocketAddr,
    /// Where datagrams are forwarded.
    pub upstream: SocketAddr,
    /// Loopback TCP address for the line-based control port (see the crate
    /// documentation), if any.
    pub control: Option<SocketAddr>,
    /// Impairments client to upstream.
    pub up: Params,
    /// Impairments upstream to client.
    pub down: Params,
    /// Fixes every random decision (per client and direction, clients
    /// numbered in order of their first datagram).
    pub seed: u64,
    /// Most datagrams queued per client and direction.
    pub queue_limit: usize,
    /// A client silent this long (both ways, nothing queued) loses its
    /// upstream socket; its next datagram gets a new one.
    pub session_idle: Duration,
}

impl Config {
    /// No impairments, no control port, seed 0.
    pub fn new(listen: SocketAddr, upstream: SocketAddr) -> Self {
        Config {
            listen,
            upstream,
            control: None,
            up: Params::default(),
            down: Params::default(),
            seed: 0,
            queue_limit: DEFAULT_QUEUE_LIMIT,
            session_idle: Duration::from_secs(300),
        }
    }
}

/// Starts proxies.
pub struct Impair;

impl Impair {
    /// Binds the sockets and starts the proxy on the current tokio runtime.
    pub async fn start(config: Config) -> io::Result<Handle> {
        if let Some(addr) = config.control {
            if !addr.ip().is_loopback() {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("control address {addr} is not loopback (the control port has no authentication)"),
                ));
            }
        }
        let listen = Arc::new(UdpSocket::bind(config.listen).await?);
        let local_addr = listen.local_addr()?;
        let controls = Controls::new(config.up, config.down);
        let (control_addr, control_task) = match config.control {
            Some(addr) => {
                let listener = TcpListener::bind(addr).await?;
                let addr = listener.local_addr()?;
                let task = tokio::spawn(crate::control::serve(listener, controls.clone()));
                (Some(addr), Some(task))
            }
            None => (None, None),
        };
        let (tx, rx) = mpsc::channel(1024);
        let engine = Engine {
            listen,
            upstream: config.upstream,
            controls: controls.clone(),
            seed: config.seed,
            queue_limit: config.queue_limit,
            session_idle: config.session_idle,
            sessions: HashMap::new(),
            clients: HashMap::new(),
            next_id: 0,
            tx,
            rx,
        };
        let (stop_tx, stop_rx) = oneshot::channel();
        let engine = tokio::spawn(engine.run(stop_rx));
        tracing::info!(%local_addr, upstream = %config.upstream, control = ?control_addr, "impairment proxy started");
        Ok(Handle {
            controls,
            local_addr,
            control_addr,
            stop: Some(stop_tx),
            engine: Some(engine),
            control_task,
        })
    }
}

/// A running proxy. Dereferences to its [`Controls`]. Dropping it stops
/// the proxy too (abruptly); [`Handle::stop`] waits for it.
pub struct Handle {
    controls: Controls,
    local_addr: SocketAddr,
    control_addr: Option<SocketAddr>,
    stop: Option<oneshot::Sender<()>>,
    engine: Option<JoinHandle<()>>,
    control_task: Option<JoinHandle<()>>,
}

impl Handle {
    /// The address clients send to.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The control port's address, if it has one.
    pub fn control_addr(&self) -> Option<SocketAddr> {
        self.control_addr
    }

    /// A clone of the controls, to hand to another task.
    pub fn controls(&self) -> Controls {
        self.controls.clone()
    }

    /// Stops the proxy and closes its sockets (queued datagrams are lost).
    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.control_task.take() {
            task.abort();
            let _ = task.await;
        }
        if let Some(engine) = self.engine.take() {
            let _ = engine.await;
        }
    }
}

impl Deref for Handle {
    type Target = Controls;
    fn deref(&self) -> &Controls {
        &self.controls
    }
}

impl Drop for Handle {
    fn drop(&mut self) {
        if let Some(task) = self.control_task.take() {
            task.abort();
        }
        if let Some(task) = self.engine.take() {
            task.abort();
        }
    }
}

/// One client: its upstream socket and a link each way.
struct Session {
    client: SocketAddr,
    socket: Arc<UdpSocket>,
    up: Link<Vec<u8>>,
    down: Link<Vec<u8>>,
    reader: JoinHandle<()>,
    last_active: Instant,
}

impl Drop for Session {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

enum Event {
    Stop,
    FromClient(io::Result<(usize, SocketAddr)>),
    FromUpstream(u64, Vec<u8>),
    Timer,
    Sweep,
}

/// Where a datagram leaving the proxy goes.
enum Out {
    Upstream(Arc<UdpSocket>),
    Client(SocketAddr),
}

struct Engine {
    listen: Arc<UdpSocket>,
    upstream: SocketAddr,
    controls: Controls,
    seed: u64,
    queue_limit: usize,
    session_idle: Duration,
    sessions: HashMap<u64, Session>,
    clients: HashMap<SocketAddr, u64>,
    next_id: u64,
    tx: mpsc::Sender<(u64, Vec<u8>)>,
    rx: mpsc::Receiver<(u64, Vec<u8>)>,
}

impl Engine {
    async fn run(mut self, mut stop: oneshot::Receiver<()>) {
        let mut buf = vec![0u8; MAX_DATAGRAM];
        let sweep_every =
            (self.session_idle / 4).clamp(Duration::from_millis(100), Duration::from_secs(10));
        let mut sweep = tokio::time::interval(sweep_every);
        sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let deadline = self.next_deadline();
            let wake = deadline
                .map(tokio::time::Instant::from_std)
                .unwrap_or_else(|| tokio::time::Instant::now() + Duration::from_secs(3600));
            let event = tokio::select! {
                _ = &mut stop => Event::Stop,
                r = self.listen.recv_from(&mut buf) => Event::FromClient(r),
                Some((id, data)) = self.rx.recv() => Event::FromUpstream(id, data),
                _ = tokio::time::sleep_until(wake), if deadline.is_some() => Event::Timer,
                _ = sweep.tick() => Event::Sweep,
            };
            match event {
                Event::Stop => break,
                Event::FromClient(Ok((n, from))) => {
                    let data = buf[..n].to_vec();
                    self.on_client(from, data).await;
                }
                Event::FromClient(Err(e)) => {
                    tracing::debug!(error = %e, "receive from clients failed");
                }
                Event::FromUpstream(id, data) => self.on_upstream(id, data),
                Event::Timer => {}
                Event::Sweep => self.sweep(Instant::now()),
            }
            self.flush().await;
        }
        tracing::info!("impairment proxy stopped");
    }

    fn next_deadline(&self) -> Option<Instant> {
        self.sessions
            .values()
            .flat_map(|s| [s.up.next_deadline(), s.down.next_deadline()])
            .flatten()
            .min()
    }

    async fn on_client(&mut self, from: SocketAddr, data: Vec<u8>) {
        let id = match self.clients.get(&from) {
            Some(&id) => id,
            None => match self.open_session(from).await {
                Ok(id) => id,
                Err(e) => {
                    tracing::warn!(client = %from, error = %e, "cannot open an upstream socket");
                    return;
                }
            },
        };
        let now = Instant::now();
        let Some(session) = self.sessions.get_mut(&id) else {
            return;
        };
        session.last_active = now;
        let mut st = self.controls.lock();
        let params = st.params[Direction::Up.index()];
        session
            .up
            .push(&params, &mut st.counters[Direction::Up.index()], now, data);
    }

    fn on_upstream(&mut self, id: u64, data: Vec<u8>) {
        let now = Instant::now();
        let Some(session) = self.sessions.get_mut(&id) else {
            return;
        };
        session.last_active = now;
        let mut st = self.controls.lock();
        let params = st.params[Direction::Down.index()];
        session.down.push(
            &params,
            &mut st.counters[Direction::Down.index()],
            now,
            data,
        );
    }

    async fn open_session(&mut self, client: SocketAddr) -> io::Result<u64> {
        let bind: SocketAddr = match self.upstream {
            SocketAddr::V4(a) if a.ip().is_loopback() => (Ipv4Addr::LOCALHOST, 0).into(),
            SocketAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
            SocketAddr::V6(a) if a.ip().is_loopback() => (Ipv6Addr::LOCALHOST, 0).into(),
            SocketAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
        };
        let socket = UdpSocket::bind(bind).await?;
        socket.connect(self.upstream).await?;
        let socket = Arc::new(socket);
        let id = self.next_id;
        self.next_id += 1;
        let reader = tokio::spawn(read_upstream(id, socket.clone(), self.tx.clone()));
        let rng = |dir: u64| Rng::derive(self.seed, id * 2 + dir);
        tracing::debug!(%client, local = ?socket.local_addr().ok(), "new client");
        self.sessions.insert(
            id,
            Session {
                client,
                socket,
                up: Link::with_rng(rng(0), self.queue_limit),
                down: Link::with_rng(rng(1), self.queue_limit),
                reader,
                last_active: Instant::now(),
            },
        );
        self.clients.insert(client, id);
        self.controls.lock().sessions = self.sessions.len();
        Ok(id)
    }

    fn sweep(&mut self, now: Instant) {
        let idle = self.session_idle;
        let before = self.sessions.len();
        let clients = &mut self.clients;
        self.sessions.retain(|_, s| {
            let keep =
                now.duration_since(s.last_active) < idle || !s.up.is_empty() || !s.down.is_empty();
            if !keep {
                tracing::debug!(client = %s.client, "client idle, upstream socket closed");
                clients.remove(&s.client);
            }
            keep
        });
        if self.sessions.len() != before {
            self.controls.lock().sessions = self.sessions.len();
        }
    }

    /// Sends everything that is due.
    async fn flush(&mut self) {
        let now = Instant::now();
        let mut out = Vec::new();
        {
            let mut st = self.controls.lock();
            let State {
                params, counters, ..
            } = &mut *st;
            let [up_counters, down_counters] = counters;
            for s in self.sessions.values_mut() {
                while let Some(d) = s.up.poll(&params[0], up_counters, now) {
                    out.push((Out::Upstream(s.socket.clone()), d));
                }
                while let Some(d) = s.down.poll(&params[1], down_counters, now) {
                    out.push((Out::Client(s.client), d));
                }
            }
        }
        for (to, data) in out {
            let r = match &to {
                Out::Upstream(socket) => socket.send(&data).await,
                Out::Client(addr) => self.listen.send_to(&data, addr).await,
            };
            if let Err(e) = r {
                // Typically ECONNREFUSED from an earlier datagram to a closed
                // upstream port: UDP, so not our problem.
                tracing::debug!(error = %e, "send failed");
            }
        }
    }
}

async fn read_upstream(id: u64, socket: Arc<UdpSocket>, tx: mpsc::Sender<(u64, Vec<u8>)>) {
    let mut buf = vec![0u8; MAX_DATAGRAM];
    loop {
        match socket.recv(&mut buf).await {
            Ok(n) => {
                if tx.send((id, buf[..n].to_vec())).await.is_err() {
                    return;
                }
            }
            Err(e) => {
                // ECONNREFUSED while upstream is down, and the like: keep
                // going, but never spin.
                tracing::debug!(error = %e, "receive from upstream failed");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }
}
