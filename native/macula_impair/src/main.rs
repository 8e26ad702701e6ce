//! `macula-impair`: the impairment proxy as a command.

use std::net::SocketAddr;
use std::time::Duration;

use clap::Parser;
use macula_impair::control::{parse_setting, Param, COMMANDS};
use macula_impair::link::DEFAULT_QUEUE_LIMIT;
use macula_impair::{Config, Dirs, Impair, Params};
use tracing_subscriber::EnvFilter;

type Setting = (Dirs, f64);

fn ms(s: &str) -> Result<Setting, String> {
    parse_setting(Param::Delay, s)
}
fn probability(s: &str) -> Result<Setting, String> {
    parse_setting(Param::Loss, s)
}
fn rate(s: &str) -> Result<Setting, String> {
    parse_setting(Param::RateMbit, s)
}

/// UDP impairment proxy: forwards datagrams from clients to --upstream (one
/// upstream socket per client, like a NAT) and the replies back, with
/// delay, jitter, loss, duplication, reordering and a blackhole, each per
/// direction and changeable at run time over the control port.
///
/// Impairment options take `VALUE` (both directions) or `up=VALUE` (client
/// to upstream) or `down=VALUE` (upstream to client), and may be repeated.
/// On start it prints `listen=ADDR control=ADDR seed=N` on stdout.
///
/// Tun mode (--tun-a, --tun-b): every IP packet between two tun devices,
/// `up` being A to B; it prints `tun control=ADDR seed=N`.
#[derive(Parser, Debug)]
#[command(version, about, long_about, after_help = COMMANDS)]
struct Args {
    /// UDP address clients send to (port 0: any free port, printed).
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: SocketAddr,

    /// UDP address datagrams are forwarded to (UDP proxy mode).
    #[arg(long, required_unless_present = "tun_a")]
    upstream: Option<SocketAddr>,

    /// Tun mode: the tun device whose packets go `up` (made if missing);
    /// with --tun-b, every IP packet between the two is impaired, not only
    /// UDP to one address. Move each device into its network namespace
    /// and address it after start (`bench/wan.sh` shows how).
    #[arg(long, requires = "tun_b", conflicts_with = "upstream")]
    tun_a: Option<String>,

    /// Tun mode: the tun device `up` packets come out of.
    #[arg(long, requires = "tun_a")]
    tun_b: Option<String>,

    /// Loopback TCP address of the line-based control port (port 0: any
    /// free port, printed). See the commands below.
    #[arg(long)]
    control: Option<SocketAddr>,

    /// Fixed delay in milliseconds ([up=|down=]MS).
    #[arg(long, value_name = "[DIR=]MS", value_parser = ms)]
    delay_ms: Vec<Setting>,

    /// Extra random delay, uniform in 0..=MS, per datagram ([up=|down=]MS).
    #[arg(long, value_name = "[DIR=]MS", value_parser = ms)]
    jitter_ms: Vec<Setting>,

    /// Probability 0..1 that a datagram is dropped.
    #[arg(long, value_name = "[DIR=]P", value_parser = probability)]
    loss: Vec<Setting>,

    /// Probability 0..1 that a datagram is sent twice.
    #[arg(long, value_name = "[DIR=]P", value_parser = probability)]
    duplicate: Vec<Setting>,

    /// Probability 0..1 that a datagram is held back until a later one has
    /// been sent.
    #[arg(long, value_name = "[DIR=]P", value_parser = probability)]
    reorder: Vec<Setting>,

    /// Longest a held-back datagram waits for a later one, past its own
    /// deadline, before it is sent anyway [default: 50].
    #[arg(long, value_name = "[DIR=]MS", value_parser = ms)]
    reorder_hold_ms: Vec<Setting>,

    /// A bottleneck rate in Mbit/s ([up=|down=]MBIT; 0: none).
    #[arg(long, value_name = "[DIR=]MBIT", value_parser = rate)]
    rate_mbit: Vec<Setting>,

    /// The bottleneck's drop-tail queue, in milliseconds at its rate.
    #[arg(long, value_name = "[DIR=]MS", value_parser = ms)]
    queue_ms: Vec<Setting>,

    /// Start with the blackhole on (both directions, or `up`/`down`).
    #[arg(long, value_name = "DIR", num_args = 0..=1, default_missing_value = "both",
          value_parser = macula_impair::control::parse_dirs)]
    blackhole: Option<Dirs>,

    /// Seed for every random decision (default: from the clock, printed).
    #[arg(long)]
    seed: Option<u64>,

    /// Most datagrams queued per client and direction.
    #[arg(long, default_value_t = DEFAULT_QUEUE_LIMIT)]
    queue_limit: usize,

    /// Seconds after which a silent client's upstream socket is closed.
    #[arg(long, default_value_t = 300)]
    session_idle_secs: u64,
}

fn apply(up: &mut Params, down: &mut Params, param: Param, settings: &[Setting]) {
    for &(dirs, value) in settings {
        if dirs != Dirs::Down {
            param.apply(up, value);
        }
        if dirs != Dirs::Up {
            param.apply(down, value);
        }
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let seed = args.seed.unwrap_or_else(|| {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        macula_impair::rng::mix(nanos ^ u64::from(std::process::id()))
    });
    let (mut up, mut down) = (Params::default(), Params::default());
    apply(&mut up, &mut down, Param::Delay, &args.delay_ms);
    apply(&mut up, &mut down, Param::Jitter, &args.jitter_ms);
    apply(&mut up, &mut down, Param::Loss, &args.loss);
    apply(&mut up, &mut down, Param::Duplicate, &args.duplicate);
    apply(&mut up, &mut down, Param::Reorder, &args.reorder);
    apply(
        &mut up,
        &mut down,
        Param::ReorderHold,
        &args.reorder_hold_ms,
    );
    apply(&mut up, &mut down, Param::RateMbit, &args.rate_mbit);
    apply(&mut up, &mut down, Param::Queue, &args.queue_ms);
    if let Some(dirs) = args.blackhole {
        up.blackhole = dirs != Dirs::Down;
        down.blackhole = dirs != Dirs::Up;
    }
    if let (Some(a), Some(b)) = (args.tun_a, args.tun_b) {
        let tun = macula_impair::tun::start(macula_impair::tun::TunConfig {
            a,
            b,
            control: args.control,
            up,
            down,
            seed,
        })
        .await?;
        let control = tun
            .control_addr()
            .map_or_else(|| "none".to_owned(), |a| a.to_string());
        println!("tun control={control} seed={seed}");
        tracing::info!(up = ?up, down = ?down, seed, "impairments (tun mode)");
        return wait_for_signal().await;
    }
    let Some(upstream) = args.upstream else {
        anyhow::bail!("--upstream (UDP proxy) or --tun-a and --tun-b (tun mode)");
    };
    let mut config = Config::new(args.listen, upstream);
    config.control = args.control;
    config.seed = seed;
    config.queue_limit = args.queue_limit;
    config.session_idle = Duration::from_secs(args.session_idle_secs);
    config.up = up;
    config.down = down;
    let proxy = Impair::start(config).await?;
    let control = proxy
        .control_addr()
        .map_or_else(|| "none".to_owned(), |a| a.to_string());
    println!(
        "listen={} control={control} seed={seed}",
        proxy.local_addr()
    );
    tracing::info!(up = ?up, down = ?down, seed, "impairments");
    wait_for_signal().await?;
    proxy.stop().await;
    Ok(())
}

async fn wait_for_signal() -> anyhow::Result<()> {
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = terminate() => {}
    }
    Ok(())
}

#[cfg(unix)]
async fn terminate() {
    if let Ok(mut s) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        s.recv().await;
    }
}

#[cfg(not(unix))]
async fn terminate() {
    std::future::pending::<()>().await
}
