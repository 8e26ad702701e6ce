//! `macula-impair`: a UDP impairment proxy for fault-injection tests, for
//! machines without netem, iptables or nft.
//!
//! Clients send datagrams to the proxy's listen address; it forwards each
//! to the upstream address from an upstream socket of that client's own
//! (like a NAT: one socket per client address, so many clients work) and
//! sends the replies back to the client. On the way, each direction (`up`:
//! client to upstream, `down`: upstream to client) can be impaired:
//!
//! - delay: a fixed delay, a strict lower bound;
//! - jitter: extra random delay, uniform in `[0, jitter]` (reorders too);
//! - loss: probability that a datagram is dropped;
//! - duplicate: probability that a datagram is sent twice;
//! - reorder: probability that a datagram is held back until a later one
//!   has been sent (or `reorder-hold` past its deadline if none comes);
//! - blackhole: drop everything, including what is already queued.
//!
//! - rate and queue: a bottleneck of so many Mbit/s with a drop-tail queue
//!   of so many milliseconds (datagrams leave it in order, then take the
//!   delay).
//!
//! A seed fixes every random decision (per client and direction).
//!
//! # Tun mode
//!
//! With `--tun-a A --tun-b B` it is a WAN for every IP packet, TCP too:
//! it opens two point-to-point tun devices; move each into a network
//! namespace and address it (`bench/wan.sh` does), and what one namespace
//! sends the other gets through the `up` (A to B) or `down` impairments.
//! Jitter keeps packets in order there, as a path's queueing does. See
//! [`tun`].
//!
//! # Design
//!
//! The decisions are sans-IO: [`link::decide`] gives the fate of one
//! datagram from the parameters, an [`Rng`] and the time;
//! [`Link`] is the queue of one direction of one client (push a datagram at
//! `now`, poll for those due at `now`, ask for the next deadline). They are
//! tested with made-up instants and no sockets. [`proxy`] is the thin tokio
//! glue: one engine task owns the sockets' links, a reader task per
//! upstream socket, and a timer for the next deadline.
//!
//! # Control port
//!
//! With `--control 127.0.0.1:PORT` (loopback only: it has no
//! authentication) the proxy takes one command per line over TCP and
//! answers each with one line starting with `ok` or `err`
//! (`nc 127.0.0.1 PORT`, or `gen_tcp` with `{packet, line}`):
//!
//! | command | effect |
//! | --- | --- |
//! | `stats` | `ok sessions=N up.received=.. up.forwarded=.. up.dropped=.. up.blackholed=.. up.duplicated=.. up.reordered=.. up.queued=.. down.received=.. ...` |
//! | `show` | the current impairments, `ok up.delay=.. up.jitter=.. up.loss=.. ... down.blackhole=off` |
//! | `blackhole on\|off [up\|down]` | drop everything (both ways by default) |
//! | `set PARAM [up=\|down=]VALUE` | `delay`, `jitter`, `reorder-hold` in milliseconds; `loss`, `duplicate`, `reorder` as probabilities 0..1; both ways by default |
//! | `clear [up\|down]` | no impairment at all (blackhole off too) |
//! | `reset` | zero the counters |
//! | `help` | the list, on one line |
//! | `quit` | close the connection |
//!
//! For example `set loss 0.02`, `set delay up=50`, `blackhole on`.
//! Counters always satisfy `received + duplicated = forwarded + dropped +
//! queued`; `dropped` includes `blackholed`.
//!
//! # From Rust
//!
//! ```no_run
//! # async fn demo() -> std::io::Result<()> {
//! use macula_impair::{Config, Dirs, Impair};
//! let mut config = Config::new("127.0.0.1:0".parse().unwrap(), "127.0.0.1:4434".parse().unwrap());
//! config.seed = 7;
//! let proxy = Impair::start(config).await?;
//! let send_here = proxy.local_addr();
//! proxy.set_loss(Dirs::Both, 0.02);
//! proxy.set_delay(Dirs::Up, std::time::Duration::from_millis(50));
//! proxy.blackhole(true);
//! println!("{:?}", proxy.stats());
//! proxy.stop().await;
//! # let _ = send_here; Ok(()) }
//! ```

pub mod control;
pub mod controls;
pub mod link;
pub mod proxy;
pub mod rng;
pub mod tun;

pub use controls::{Controls, Direction, Dirs, Stats};
pub use link::{Counters, Decision, DropReason, Link, Params};
pub use proxy::{Config, Handle, Impair};
pub use rng::Rng;
