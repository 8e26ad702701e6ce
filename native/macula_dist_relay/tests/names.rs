//! Names owned by keys: a node shows its key to the relay (a client
//! certificate), and a live name belongs to the key that holds it.

mod common;

use common::{relay, relay_with};
use macula_dist_node::e2e_node::E2eNode;
use macula_dist_node::identity::NodeIdentity;
use macula_dist_relay::{Config, Relay};

async fn join(relay: &Relay, name: &str, key: Option<&NodeIdentity>) -> anyhow::Result<E2eNode> {
    E2eNode::join_keyed(relay.local_addr(), relay.fingerprint(), name, key).await
}

fn refused_with(result: anyhow::Result<E2eNode>, reason: &str) {
    let err = format!("{:#}", result.err().expect("refused"));
    assert!(err.contains(reason), "{err}");
}

#[tokio::test]
async fn another_key_or_none_cannot_take_a_live_name() {
    let relay = relay().await;
    let k1 = NodeIdentity::derive(b"cookie", "a@h").unwrap();
    let k2 = NodeIdentity::derive(b"other cookie", "a@h").unwrap();
    let holder = join(&relay, "a@h", Some(&k1)).await.unwrap();
    refused_with(join(&relay, "a@h", Some(&k2)).await, "name_taken");
    // A certificate-less (v1-style) client never displaces a keyed node.
    refused_with(join(&relay, "a@h", None).await, "name_taken");
    // The same key while the holder lives: a second node, not a restart.
    refused_with(join(&relay, "a@h", Some(&k1)).await, "name_taken");
    assert!(holder.relay_conn.close_reason().is_none());
    assert_eq!(relay.stats().nodes, 1);
    // Once the holder is gone, its key takes the name again (a restart).
    holder.relay_conn.close(0u32.into(), b"bye");
    drop(holder);
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    join(&relay, "a@h", Some(&k1)).await.unwrap();
}

/// The same key replaces a holder that no longer answers (a node that
/// restarted before the relay noticed its old connection die).
#[tokio::test]
async fn the_same_key_replaces_a_holder_that_does_not_answer() {
    let relay = relay().await;
    let proxy = macula_impair::Impair::start(macula_impair::Config::new(
        "127.0.0.1:0".parse().unwrap(),
        relay.local_addr(),
    ))
    .await
    .unwrap();
    let key = NodeIdentity::derive(b"cookie", "a@h").unwrap();
    let stale = E2eNode::join_keyed(proxy.local_addr(), relay.fingerprint(), "a@h", Some(&key))
        .await
        .unwrap();
    proxy.controls().blackhole(true);
    let restarted = join(&relay, "a@h", Some(&key)).await.unwrap();
    assert_eq!(relay.stats().nodes, 1);
    drop((stale, restarted));
    proxy.stop().await;
}

#[tokio::test]
async fn a_nodes_file_closes_the_relay_to_everyone_else() {
    let a = NodeIdentity::derive(b"cookie", "a@h").unwrap();
    let other = NodeIdentity::derive(b"cookie", "b@h").unwrap();
    let dir = std::env::temp_dir().join(format!("macula-names-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("nodes");
    std::fs::write(
        &file,
        format!("# name key-id\na@h {}\n", hex::encode(a.key_id())),
    )
    .unwrap();
    let relay = relay_with(Config {
        nodes: Some(macula_dist_relay::read_nodes_file(&file).unwrap()),
        ..Config::loopback()
    })
    .await;
    join(&relay, "a@h", Some(&a)).await.unwrap();
    refused_with(join(&relay, "b@h", Some(&other)).await, "not_allowed");
    refused_with(join(&relay, "c@h", None).await, "not_allowed");
    let _ = std::fs::remove_dir_all(&dir);
}
