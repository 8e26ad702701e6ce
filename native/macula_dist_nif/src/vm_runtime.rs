//! The VM's one tokio runtime, and the relay connections closed at VM exit.

use std::sync::{Once, OnceLock};
use std::time::Duration;

use tokio::runtime::Runtime;

static RUNTIME: OnceLock<Runtime> = OnceLock::new();
static CLOSE_AT_EXIT: Once = Once::new();

/// Worker threads: `MACULA_DIST_THREADS`, else 1. Every tunnel shares the
/// one relay connection, whose driver is a single task: one worker beside
/// the VM's schedulers measured faster than two (fewer wakeups).
pub(crate) fn runtime() -> &'static Runtime {
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
            .unwrap_or(1);
        CLOSE_AT_EXIT.call_once(|| {
            // SAFETY: registers a plain extern "C" function; glibc also runs
            // it if this library is unloaded, so it never outlives its code.
            unsafe { libc::atexit(close_endpoints) };
        });
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads)
            .thread_name("macula-dist")
            .enable_all()
            .build()
            .expect("the tokio runtime starts")
    })
}

/// At VM exit (`halt`, `init:stop`): close every relay connection, so the
/// relay hears it now and closes this node's tunnels, as a TCP peer would
/// see a socket close. Without it the node's peers wait for a tick timeout.
extern "C" fn close_endpoints() {
    if macula_dist_node::endpoint::close_all_endpoints() > 0 {
        // The runtime's threads still run: give them a moment to send it.
        std::thread::sleep(Duration::from_millis(20));
    }
}
