//! One tokio runtime and one quinn client endpoint per address family, per VM.

use std::net::SocketAddr;
use std::sync::OnceLock;

use tokio::runtime::Runtime;

static RUNTIME: OnceLock<Runtime> = OnceLock::new();
static ENDPOINT_V4: OnceLock<Result<quinn::Endpoint, String>> = OnceLock::new();
static ENDPOINT_V6: OnceLock<Result<quinn::Endpoint, String>> = OnceLock::new();

/// Worker threads: `MACULA_DIST_THREADS`, else 2 (the VM's schedulers do
/// the rest of the work; QUIC needs few threads).
pub fn runtime() -> &'static Runtime {
    RUNTIME.get_or_init(|| {
        // Opt-in logs of the NIF's own work, on stderr: MACULA_DIST_LOG=debug.
        if let Ok(filter) = std::env::var("MACULA_DIST_LOG") {
            let _ = tracing_subscriber::fmt()
                .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
                .with_writer(std::io::stderr)
                .try_init();
        }
        let threads = std::env::var("MACULA_DIST_THREADS")
            .ok()
            .and_then(|v| v.parse().ok())
            .filter(|n: &usize| *n > 0)
            .unwrap_or(2);
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads)
            .thread_name("macula-dist")
            .enable_all()
            .build()
            .expect("the tokio runtime starts")
    })
}

/// The client endpoint for `remote`'s address family, bound on first use.
pub fn endpoint_for(remote: SocketAddr) -> Result<quinn::Endpoint, String> {
    let (cell, bind): (_, SocketAddr) = if remote.is_ipv4() {
        (&ENDPOINT_V4, "0.0.0.0:0".parse().unwrap())
    } else {
        (&ENDPOINT_V6, "[::]:0".parse().unwrap())
    };
    cell.get_or_init(|| {
        let _guard = runtime().enter();
        quinn::Endpoint::client(bind).map_err(|e| format!("binding a UDP socket: {e}"))
    })
    .clone()
}
