//! The send side of a control stream, as relay and node both run it.

use macula_relay_proto::Message;
use quinn::SendStream;
use tokio::sync::mpsc;

/// Control messages queued for one peer before it counts as not reading.
pub const CONTROL_QUEUE: usize = 1024;

/// Writes queued control messages, batching whatever is queued at once.
/// When the queue closes it finishes the stream and waits for the peer to
/// read it, so a last message (a refusal) is delivered before a close.
pub async fn write_control(mut send: SendStream, mut queue: mpsc::Receiver<Message>) {
    let mut buf = Vec::new();
    while let Some(msg) = queue.recv().await {
        buf.clear();
        msg.encode_into(&mut buf);
        while let Ok(more) = queue.try_recv() {
            more.encode_into(&mut buf);
        }
        if send.write_all(&buf).await.is_err() {
            return;
        }
    }
    let _ = send.finish();
    let _ = send.stopped().await;
}
