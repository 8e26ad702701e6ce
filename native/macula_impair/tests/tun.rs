//! Tun mode between two real network namespaces: what TCP and UDP measure
//! across it matches the settings (delay, loss, rate). Needs root (network
//! namespaces and /dev/net/tun): `scripts/test.sh` runs it with
//! `cargo test -p macula_impair --test tun -- --ignored`.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream, UdpSocket};
use std::os::fd::AsRawFd;
use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

use macula_impair::tun::{self, TunConfig};
use macula_impair::{Dirs, Params};

const A_ADDR: &str = "10.201.0.1";
const B_ADDR: &str = "10.201.0.2";

fn ip(args: &[&str]) {
    let status = Command::new("ip").args(args).status().expect("ip runs");
    assert!(status.success(), "ip {}", args.join(" "));
}

/// Two namespaces, removed when dropped.
struct Namespaces {
    a: String,
    b: String,
}

impl Drop for Namespaces {
    fn drop(&mut self) {
        for ns in [&self.a, &self.b] {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

/// Runs `f` on a thread inside namespace `ns` (sockets it makes stay there).
fn in_ns<T: Send + 'static>(
    ns: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> thread::JoinHandle<T> {
    let path = format!("/var/run/netns/{ns}");
    thread::spawn(move || {
        let file = std::fs::File::open(&path).expect("namespace file");
        // SAFETY: setns on this thread only, with a namespace fd we hold.
        let r = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(r, 0, "setns {path}: {}", std::io::Error::last_os_error());
        f()
    })
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

#[test]
#[ignore = "needs root: run by scripts/test.sh with --ignored"]
fn tcp_and_udp_across_the_tun_wan_see_its_delay_loss_and_rate() {
    let id = std::process::id() % 100_000;
    let ns = Namespaces {
        a: format!("mia{id}"),
        b: format!("mib{id}"),
    };
    ip(&["netns", "add", &ns.a]);
    ip(&["netns", "add", &ns.b]);
    let (dev_a, dev_b) = (format!("tmia{id}"), format!("tmib{id}"));
    let rt = tokio::runtime::Runtime::new().unwrap();
    // 20 ms each way, 20 Mbit/s (2.5 MB/s), a 50 ms queue.
    let params = Params {
        delay: Duration::from_millis(20),
        rate: 2_500_000,
        queue: Duration::from_millis(50),
        ..Params::default()
    };
    let emulator = rt
        .block_on(tun::start(TunConfig {
            a: dev_a.clone(),
            b: dev_b.clone(),
            control: None,
            up: params,
            down: params,
            seed: 1,
        }))
        .expect("tun devices open");
    for (dev, ns, me, peer) in [
        (&dev_a, &ns.a, A_ADDR, B_ADDR),
        (&dev_b, &ns.b, B_ADDR, A_ADDR),
    ] {
        ip(&["link", "set", dev, "netns", ns]);
        ip(&["-n", ns, "addr", "add", me, "peer", peer, "dev", dev]);
        ip(&["-n", ns, "link", "set", dev, "up"]);
        ip(&["-n", ns, "link", "set", "lo", "up"]);
    }

    // Delay: UDP round trips take 2 × 20 ms (plus a little).
    let echo = in_ns(&ns.b, || {
        let s = UdpSocket::bind((B_ADDR, 9000)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut buf = [0u8; 2048];
        let mut received = 0u32;
        while let Ok((n, from)) = s.recv_from(&mut buf) {
            if &buf[..n] == b"end" {
                break;
            }
            if buf[0] == b'p' {
                let _ = s.send_to(&buf[..n], from);
            } else {
                received += 1;
            }
        }
        received
    });
    let rtts = in_ns(&ns.a, || {
        let s = UdpSocket::bind((A_ADDR, 0)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        let mut rtts = vec![];
        let mut buf = [0u8; 64];
        for _ in 0..20 {
            let t = Instant::now();
            s.send_to(b"ping", (B_ADDR, 9000)).unwrap();
            if s.recv_from(&mut buf).is_ok() {
                rtts.push(t.elapsed());
            }
        }
        rtts
    })
    .join()
    .unwrap();
    assert!(rtts.len() >= 18, "{} of 20 pings answered", rtts.len());
    let rtt = median(rtts);
    assert!(
        rtt >= Duration::from_millis(40) && rtt < Duration::from_millis(60),
        "udp rtt {rtt:?} for 20 ms each way"
    );

    // Loss: 20 % of datagrams a to b go.
    emulator.controls().set_loss(Dirs::Up, 0.2);
    in_ns(&ns.a, || {
        let s = UdpSocket::bind((A_ADDR, 0)).unwrap();
        for _ in 0..2000 {
            s.send_to(&[b'd'; 100], (B_ADDR, 9000)).unwrap();
            thread::sleep(Duration::from_micros(200));
        }
        emulator_pause();
        // The end marker is sent until it gets through the loss.
        for _ in 0..20 {
            s.send_to(b"end", (B_ADDR, 9000)).unwrap();
        }
    })
    .join()
    .unwrap();
    let received = echo.join().unwrap();
    let share = f64::from(received) / 2000.0;
    assert!(
        (0.75..=0.85).contains(&share),
        "{received} of 2000 datagrams arrived with 20 % loss"
    );
    emulator.controls().set_loss(Dirs::Up, 0.0);

    // Rate: a TCP transfer a to b runs at the 20 Mbit/s bottleneck.
    let sink = in_ns(&ns.b, || {
        let l = TcpListener::bind((B_ADDR, 9001)).unwrap();
        let (mut c, _) = l.accept().unwrap();
        let mut buf = vec![0u8; 65536];
        let mut total = 0usize;
        let mut marks = vec![];
        let start = Instant::now();
        while let Ok(n) = c.read(&mut buf) {
            if n == 0 {
                break;
            }
            total += n;
            marks.push((start.elapsed(), total));
        }
        marks
    });
    thread::sleep(Duration::from_millis(200));
    in_ns(&ns.a, || {
        let mut c = TcpStream::connect((B_ADDR, 9001)).unwrap();
        let chunk = vec![7u8; 65536];
        let until = Instant::now() + Duration::from_secs(4);
        while Instant::now() < until {
            c.write_all(&chunk).unwrap();
        }
    })
    .join()
    .unwrap();
    let marks = sink.join().unwrap();
    // Past slow start: bytes between 1.5 s and 3.5 s.
    let at = |t: f64| {
        marks
            .iter()
            .find(|(e, _)| e.as_secs_f64() >= t)
            .map(|m| m.1)
            .unwrap_or(marks.last().unwrap().1)
    };
    let rate = (at(3.5) - at(1.5)) as f64 / 2.0;
    assert!(
        (0.8 * 2_500_000.0..=1.03 * 2_500_000.0).contains(&rate),
        "tcp moved {:.2} MB/s through a 2.5 MB/s bottleneck",
        rate / 1e6
    );
    let c = emulator.controls().stats();
    assert!(c.up.forwarded > 0 && c.down.forwarded > 0, "{c:?}");
    drop(emulator);
    drop(rt);
}

/// Lets the datagrams in flight land before the end marker.
fn emulator_pause() {
    thread::sleep(Duration::from_millis(100));
}
