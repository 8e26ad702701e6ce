//! The `macula-impair` binary, on 127.0.0.1 only.

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

const BIN: &str = env!("CARGO_BIN_EXE_macula-impair");
const WAIT: Duration = Duration::from_secs(20);

/// Kills the child (ours) when the test ends, even on failure.
struct Proxy(Child);

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn value<'a>(line: &'a str, key: &str) -> &'a str {
    line.split_whitespace()
        .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('='))
        .unwrap_or_else(|| panic!("no {key} in {line:?}"))
}

#[test]
fn help_lists_the_control_commands() {
    let out = Command::new(BIN).arg("--help").output().unwrap();
    assert!(out.status.success());
    let help = String::from_utf8(out.stdout).unwrap();
    for needle in [
        "--upstream",
        "--delay-ms",
        "--jitter-ms",
        "--loss",
        "--duplicate",
        "--reorder",
        "--seed",
        "--control",
        "blackhole on|off",
        "set PARAM",
        "stats",
    ] {
        assert!(help.contains(needle), "--help lacks {needle}:\n{help}");
    }
}

#[test]
fn forwards_and_answers_on_the_control_port() {
    let upstream = UdpSocket::bind("127.0.0.1:0").unwrap();
    upstream.set_read_timeout(Some(WAIT)).unwrap();
    let mut child = Command::new(BIN)
        .args([
            "--listen",
            "127.0.0.1:0",
            "--control",
            "127.0.0.1:0",
            "--seed",
            "5",
            "--duplicate",
            "up=1",
        ])
        .arg("--upstream")
        .arg(upstream.local_addr().unwrap().to_string())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let _proxy = Proxy(child);
    let mut line = String::new();
    BufReader::new(stdout).read_line(&mut line).unwrap();
    let listen: SocketAddr = value(&line, "listen").parse().unwrap();
    let control: SocketAddr = value(&line, "control").parse().unwrap();
    assert_eq!(value(&line, "seed"), "5");
    assert!(listen.ip().is_loopback() && control.ip().is_loopback());

    let client = UdpSocket::bind("127.0.0.1:0").unwrap();
    client.set_read_timeout(Some(WAIT)).unwrap();
    client.send_to(b"hello", listen).unwrap();
    let mut buf = [0u8; 64];
    // --duplicate up=1: twice upstream.
    let (n, nat) = upstream.recv_from(&mut buf).unwrap();
    assert_eq!(&buf[..n], b"hello");
    let (n, _) = upstream.recv_from(&mut buf).unwrap();
    assert_eq!(&buf[..n], b"hello");
    // Once back.
    upstream.send_to(b"back", nat).unwrap();
    let (n, from) = client.recv_from(&mut buf).unwrap();
    assert_eq!((&buf[..n], from), (&b"back"[..], listen));

    let stream = TcpStream::connect(control).unwrap();
    stream.set_read_timeout(Some(WAIT)).unwrap();
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut ask = |cmd: &str| {
        (&stream).write_all(format!("{cmd}\n").as_bytes()).unwrap();
        let mut reply = String::new();
        reader.read_line(&mut reply).unwrap();
        reply.trim_end().to_owned()
    };
    let stats = ask("stats");
    assert_eq!(value(&stats, "up.received"), "1");
    assert_eq!(value(&stats, "up.duplicated"), "1");
    assert_eq!(value(&stats, "up.forwarded"), "2");
    assert_eq!(value(&stats, "down.forwarded"), "1");
    assert_eq!(ask("set loss down=0.5"), "ok");
    assert!(ask("show").contains("down.loss=0.5 "));
}
