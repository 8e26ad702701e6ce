//! The control port: one command per line in, one reply line out.
//!
//! Parsing ([`Command::parse`]) and execution ([`execute`]) are plain
//! functions; [`serve`] is the TCP loop around them. The commands are
//! listed in the crate documentation and in [`COMMANDS`].

use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;
use tokio::task::JoinSet;

use crate::controls::{Controls, Direction, Dirs};
use crate::link::Params;

/// The command summary (the `help` reply and the end of `--help`).
pub const COMMANDS: &str = "\
Control port commands (one per line; each reply is one line starting with `ok` or `err`):
  stats                          counters: sessions=N up.received=.. up.forwarded=.. up.dropped=..
                                 up.blackholed=.. up.duplicated=.. up.reordered=.. up.queued=.. down.(same)
  show                           current impairments of both directions
  blackhole on|off [up|down]     drop everything (also what is already queued); both ways by default
  set PARAM [up=|down=]VALUE     PARAM: delay, jitter, reorder-hold, queue (milliseconds),
                                 loss, duplicate, reorder (probability 0..1), rate (Mbit/s,
                                 0: none); both ways by default
  clear [up|down]                no impairment at all (blackhole off too)
  reset                          zero the counters
  help                           this list (one line)
  quit                           close the connection
`up` is client -> upstream, `down` is upstream -> client.";

/// Largest delay-like value accepted (milliseconds): one hour.
const MAX_MS: f64 = 3_600_000.0;

/// A settable impairment.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Param {
    Delay,
    Jitter,
    ReorderHold,
    Loss,
    Duplicate,
    Reorder,
    /// The bottleneck's rate, in Mbit/s (0: none).
    RateMbit,
    /// The bottleneck's drop-tail queue, in milliseconds at that rate.
    Queue,
}

impl Param {
    pub fn parse(s: &str) -> Result<Param, String> {
        Ok(match s.to_ascii_lowercase().replace('_', "-").as_str() {
            "delay" | "delay-ms" => Param::Delay,
            "jitter" | "jitter-ms" => Param::Jitter,
            "reorder-hold" | "reorder-hold-ms" => Param::ReorderHold,
            "loss" => Param::Loss,
            "duplicate" | "dup" => Param::Duplicate,
            "reorder" => Param::Reorder,
            "rate" | "rate-mbit" => Param::RateMbit,
            "queue" | "queue-ms" => Param::Queue,
            _ => {
                return Err(format!(
                "unknown parameter {s:?} (delay, jitter, reorder-hold, loss, duplicate, reorder, rate, queue)"
            ))
            }
        })
    }

    fn is_probability(self) -> bool {
        matches!(self, Param::Loss | Param::Duplicate | Param::Reorder)
    }

    /// Checks a value: milliseconds `0..=3600000` or a probability `0..=1`.
    pub fn check(self, value: f64) -> Result<f64, String> {
        let max = if self.is_probability() { 1.0 } else { MAX_MS };
        if value.is_finite() && (0.0..=max).contains(&value) {
            Ok(value)
        } else if self.is_probability() {
            Err(format!("{value} is not a probability (0..1)"))
        } else if self == Param::RateMbit {
            Err(format!("{value} is not a rate in Mbit/s (0..{MAX_MS})"))
        } else {
            Err(format!(
                "{value} is not a number of milliseconds (0..{MAX_MS})"
            ))
        }
    }

    /// Sets this parameter in `p` (value already checked).
    pub fn apply(self, p: &mut Params, value: f64) {
        let ms = || Duration::from_secs_f64(value / 1000.0);
        match self {
            Param::Delay => p.delay = ms(),
            Param::Jitter => p.jitter = ms(),
            Param::ReorderHold => p.reorder_hold = ms(),
            Param::Loss => p.loss = value,
            Param::Duplicate => p.duplicate = value,
            Param::Reorder => p.reorder = value,
            Param::RateMbit => p.rate = (value * 1e6 / 8.0) as u64,
            Param::Queue => p.queue = ms(),
        }
    }
}

/// Parses a direction word: `up`, `down` or `both`.
pub fn parse_dirs(s: &str) -> Result<Dirs, String> {
    match s.to_ascii_lowercase().as_str() {
        "up" => Ok(Dirs::Up),
        "down" => Ok(Dirs::Down),
        "both" => Ok(Dirs::Both),
        _ => Err(format!("unknown direction {s:?} (up, down, both)")),
    }
}

/// Parses `[up=|down=|both=]VALUE` for `param` (the syntax of `set` and of
/// the command-line options).
pub fn parse_setting(param: Param, s: &str) -> Result<(Dirs, f64), String> {
    let (dirs, value) = match s.split_once('=') {
        Some((d, v)) => (parse_dirs(d)?, v),
        None => (Dirs::Both, s),
    };
    let value: f64 = value
        .trim()
        .parse()
        .map_err(|_| format!("{value:?} is not a number"))?;
    Ok((dirs, param.check(value)?))
}

/// One control command.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Command {
    Help,
    Stats,
    Show,
    Reset,
    Quit,
    Blackhole {
        on: bool,
        dirs: Dirs,
    },
    Set {
        param: Param,
        dirs: Dirs,
        value: f64,
    },
    Clear {
        dirs: Dirs,
    },
}

impl Command {
    /// Parses one line (surrounding blanks ignored, words case-insensitive).
    pub fn parse(line: &str) -> Result<Command, String> {
        let words: Vec<&str> = line.split_whitespace().collect();
        let lower: Vec<String> = words.iter().map(|w| w.to_ascii_lowercase()).collect();
        let lower: Vec<&str> = lower.iter().map(String::as_str).collect();
        let dirs_of = |rest: &[&str]| match rest {
            [] => Ok(Dirs::Both),
            [d] => parse_dirs(d),
            _ => Err("too many words".to_owned()),
        };
        match lower.as_slice() {
            ["help"] | ["?"] => Ok(Command::Help),
            ["stats"] => Ok(Command::Stats),
            ["show"] | ["get"] => Ok(Command::Show),
            ["reset"] => Ok(Command::Reset),
            ["quit"] | ["exit"] => Ok(Command::Quit),
            ["blackhole", onoff, rest @ ..] => {
                let on = match *onoff {
                    "on" | "true" | "1" => true,
                    "off" | "false" | "0" => false,
                    _ => return Err(format!("blackhole {onoff:?}: expected on or off")),
                };
                Ok(Command::Blackhole {
                    on,
                    dirs: dirs_of(rest)?,
                })
            }
            ["set", param, value] => {
                let param = Param::parse(param)?;
                let (dirs, value) = parse_setting(param, value)?;
                Ok(Command::Set { param, dirs, value })
            }
            ["set", ..] => Err("usage: set PARAM [up=|down=]VALUE".to_owned()),
            ["clear", rest @ ..] => Ok(Command::Clear {
                dirs: dirs_of(rest)?,
            }),
            [] => Err("empty command".to_owned()),
            _ => Err(format!("unknown command {:?} (try help)", words.join(" "))),
        }
    }
}

fn fmt_ms(d: Duration) -> String {
    format!("{}", d.as_secs_f64() * 1000.0)
}

/// `stats` reply (without the leading `ok`).
pub fn format_stats(controls: &Controls) -> String {
    let stats = controls.stats();
    let mut s = format!("sessions={}", stats.sessions);
    for (name, d) in [("up", Direction::Up), ("down", Direction::Down)] {
        let c = stats.dir(d);
        s += &format!(
            " {name}.received={} {name}.forwarded={} {name}.dropped={} {name}.blackholed={} \
             {name}.duplicated={} {name}.reordered={} {name}.queued={}",
            c.received,
            c.forwarded,
            c.dropped,
            c.blackholed,
            c.duplicated,
            c.reordered,
            c.queued()
        );
    }
    s
}

/// `show` reply (without the leading `ok`).
pub fn format_params(controls: &Controls) -> String {
    let mut parts = Vec::new();
    for (name, d) in [("up", Direction::Up), ("down", Direction::Down)] {
        let p = controls.params(d);
        parts.push(format!(
            "{name}.delay={} {name}.jitter={} {name}.loss={} {name}.duplicate={} {name}.reorder={} \
             {name}.reorder-hold={} {name}.blackhole={} {name}.rate={} {name}.queue={}",
            fmt_ms(p.delay),
            fmt_ms(p.jitter),
            p.loss,
            p.duplicate,
            p.reorder,
            fmt_ms(p.reorder_hold),
            if p.blackhole { "on" } else { "off" },
            p.rate as f64 * 8.0 / 1e6,
            fmt_ms(p.queue)
        ));
    }
    parts.join(" ")
}

/// Runs a command; returns the reply line (without newline).
pub fn execute(controls: &Controls, cmd: &Command) -> String {
    match *cmd {
        Command::Help => "ok commands: stats | show | blackhole on|off [up|down] | \
                          set delay|jitter|reorder-hold|loss|duplicate|reorder|rate|queue [up=|down=]VALUE | \
                          clear [up|down] | reset | quit"
            .to_owned(),
        Command::Stats => format!("ok {}", format_stats(controls)),
        Command::Show => format!("ok {}", format_params(controls)),
        Command::Reset => {
            controls.reset_stats();
            "ok".to_owned()
        }
        Command::Quit => "ok bye".to_owned(),
        Command::Blackhole { on, dirs } => {
            controls.blackhole_dirs(dirs, on);
            "ok".to_owned()
        }
        Command::Set { param, dirs, value } => {
            controls.update(dirs, |p| param.apply(p, value));
            "ok".to_owned()
        }
        Command::Clear { dirs } => {
            controls.clear(dirs);
            "ok".to_owned()
        }
    }
}

/// Parses and runs one line; the reply and whether to close afterwards.
pub fn handle_line(controls: &Controls, line: &str) -> (String, bool) {
    match Command::parse(line) {
        Ok(cmd) => (execute(controls, &cmd), cmd == Command::Quit),
        Err(e) => (format!("err {e}"), false),
    }
}

/// Serves the control port until aborted (aborting it closes every
/// connection too).
pub async fn serve(listener: TcpListener, controls: Controls) {
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    tracing::debug!(%peer, "control connection");
                    connections.spawn(connection(stream, controls.clone()));
                }
                Err(e) => {
                    tracing::warn!(error = %e, "control accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            Some(_) = connections.join_next() => {}
        }
    }
}

async fn connection(stream: tokio::net::TcpStream, controls: Controls) {
    let (read, mut write) = stream.into_split();
    let mut lines = BufReader::new(read).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        if line.trim().is_empty() {
            continue;
        }
        let (mut reply, close) = handle_line(&controls, &line);
        tracing::debug!(command = %line.trim(), %reply, "control");
        reply.push('\n');
        if write.write_all(reply.as_bytes()).await.is_err() || close {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::controls::Stats;

    #[test]
    fn parses_commands() {
        assert_eq!(Command::parse("stats"), Ok(Command::Stats));
        assert_eq!(Command::parse("  STATS \r"), Ok(Command::Stats));
        assert_eq!(
            Command::parse("blackhole on"),
            Ok(Command::Blackhole {
                on: true,
                dirs: Dirs::Both
            })
        );
        assert_eq!(
            Command::parse("blackhole off down"),
            Ok(Command::Blackhole {
                on: false,
                dirs: Dirs::Down
            })
        );
        assert_eq!(
            Command::parse("set loss 0.02"),
            Ok(Command::Set {
                param: Param::Loss,
                dirs: Dirs::Both,
                value: 0.02
            })
        );
        assert_eq!(
            Command::parse("set delay up=50"),
            Ok(Command::Set {
                param: Param::Delay,
                dirs: Dirs::Up,
                value: 50.0
            })
        );
        assert_eq!(
            Command::parse("set reorder-hold 12.5"),
            Ok(Command::Set {
                param: Param::ReorderHold,
                dirs: Dirs::Both,
                value: 12.5
            })
        );
        assert_eq!(
            Command::parse("clear up"),
            Ok(Command::Clear { dirs: Dirs::Up })
        );
        assert_eq!(
            Command::parse("clear"),
            Ok(Command::Clear { dirs: Dirs::Both })
        );
    }

    #[test]
    fn rejects_bad_commands() {
        for bad in [
            "",
            "blackhole",
            "blackhole maybe",
            "blackhole on sideways",
            "blackhole on up down",
            "set loss",
            "set loss 1.5",
            "set loss -0.1",
            "set loss nan",
            "set delay -1",
            "set delay 4000000",
            "set speed 3",
            "set loss left=0.1",
            "frobnicate",
        ] {
            assert!(Command::parse(bad).is_err(), "{bad:?} parsed");
        }
    }

    #[test]
    fn settings_syntax() {
        assert_eq!(parse_setting(Param::Loss, "0.5"), Ok((Dirs::Both, 0.5)));
        assert_eq!(parse_setting(Param::Loss, "down=1"), Ok((Dirs::Down, 1.0)));
        assert_eq!(
            parse_setting(Param::Delay, "both=250"),
            Ok((Dirs::Both, 250.0))
        );
        assert!(parse_setting(Param::Reorder, "up=2").is_err());
    }

    #[test]
    fn executes_against_controls() {
        let c = Controls::new(Params::default(), Params::default());
        assert_eq!(handle_line(&c, "set delay up=50").0, "ok");
        assert_eq!(handle_line(&c, "set loss 0.25").0, "ok");
        assert_eq!(handle_line(&c, "blackhole on down").0, "ok");
        let up = c.params(Direction::Up);
        let down = c.params(Direction::Down);
        assert_eq!(up.delay, Duration::from_millis(50));
        assert_eq!(down.delay, Duration::ZERO);
        assert_eq!((up.loss, down.loss), (0.25, 0.25));
        assert!(!up.blackhole && down.blackhole);
        let show = handle_line(&c, "show").0;
        assert!(show.starts_with("ok up.delay=50 "), "{show}");
        assert!(show.contains(" down.blackhole=on"), "{show}");
        assert_eq!(handle_line(&c, "clear").0, "ok");
        assert_eq!(c.params(Direction::Up), Params::default());
        assert_eq!(c.stats(), Stats::default());
        let stats = handle_line(&c, "stats").0;
        assert!(stats.starts_with("ok sessions=0 up.received=0 "), "{stats}");
        assert!(stats.ends_with(" down.queued=0"), "{stats}");
        assert!(handle_line(&c, "nope").0.starts_with("err "));
        assert_eq!(handle_line(&c, "quit"), ("ok bye".to_owned(), true));
    }
}
