//! Forwarding one tunnel: one task per direction, chunks handed from one
//! stream to the other without copying, never reordered.

use bytes::Bytes;
use prometheus_client::metrics::counter::Counter;
use quinn::{ReadError, RecvStream, SendStream, VarInt, WriteError};
use tokio_util::sync::CancellationToken;

/// Chunks (about a packet each) taken from a stream at once.
const BATCH: usize = 64;

/// Closes a stream of a tunnel that ended (code 0, either direction).
pub(crate) const TUNNEL_CLOSED: VarInt = VarInt::from_u32(0);

/// Forwards both directions until both end; returns the bytes forwarded
/// (up: requester to target, down: back).
pub(crate) async fn run(
    (requester_send, requester_recv): (SendStream, RecvStream),
    (target_send, target_recv): (SendStream, RecvStream),
    cancel: CancellationToken,
    counted: Counter,
) -> (u64, u64) {
    let up = tokio::spawn(pipe(
        requester_recv,
        target_send,
        cancel.clone(),
        counted.clone(),
    ));
    let down = tokio::spawn(pipe(target_recv, requester_send, cancel.clone(), counted));
    let bytes_up = up.await.unwrap_or_default();
    let bytes_down = down.await.unwrap_or_default();
    (bytes_up, bytes_down)
}

enum Outcome {
    Finished,
    Cancelled,
    Read(ReadError),
    Write(WriteError),
}

/// Copies `from` to `to` until one ends. A finish is passed on as a finish
/// and a stop as a stop (each ends one direction); a reset or a lost
/// connection closes the whole tunnel.
/// Returns the bytes forwarded.
async fn pipe(
    mut from: RecvStream,
    mut to: SendStream,
    cancel: CancellationToken,
    counted: Counter,
) -> u64 {
    let mut bytes = 0u64;
    // Whatever quinn has buffered is taken and handed on at once: one wakeup
    // of the other connection per batch, not per received packet.
    let mut chunks: Vec<Bytes> = vec![Bytes::new(); BATCH];
    // Only a real STOP_SENDING counts; the stream's other ends (finish,
    // reset, connection loss) are seen by reads and writes.
    let stopped = to.stopped();
    let stop_sending = async move {
        match stopped.await {
            Ok(Some(code)) => code,
            _ => std::future::pending().await,
        }
    };
    tokio::pin!(stop_sending);
    let outcome = loop {
        let read = tokio::select! {
            biased;
            _ = cancel.cancelled() => break Outcome::Cancelled,
            // The far side stopped reading (STOP_SENDING): the tunnel is
            // over even if this side never sends again; its slot is freed.
            code = &mut stop_sending => break Outcome::Write(WriteError::Stopped(code)),
            read = from.read_chunks(&mut chunks) => read,
        };
        let n = match read {
            Ok(Some(n)) => n,
            Ok(None) => break Outcome::Finished,
            Err(e) => break Outcome::Read(e),
        };
        let read: u64 = chunks[..n].iter().map(|c| c.len() as u64).sum();
        bytes += read;
        counted.inc_by(read);
        tokio::select! {
            biased;
            _ = cancel.cancelled() => break Outcome::Cancelled,
            written = to.write_all_chunks(&mut chunks[..n]) => if let Err(e) = written {
                break Outcome::Write(e);
            },
        }
    };
    match outcome {
        Outcome::Finished => {
            let _ = to.finish();
            return bytes;
        }
        // The receiver wants no more: tell the sender, and end this
        // direction only (the other may still carry the last of a reply).
        Outcome::Write(WriteError::Stopped(code)) => {
            let _ = from.stop(code);
            return bytes;
        }
        Outcome::Cancelled => {}
        Outcome::Read(ReadError::Reset(code)) => {
            let _ = to.reset(code);
        }
        Outcome::Read(_) | Outcome::Write(_) => {}
    }
    let _ = to.reset(TUNNEL_CLOSED);
    let _ = from.stop(TUNNEL_CLOSED);
    cancel.cancel();
    bytes
}
