//! The node crate's relay client against a real relay (in this process),
//! through the impairment proxy where a path must fail.

use std::sync::Arc;
use std::time::Duration;

use macula_dist_node::identity::NodeIdentity;
use macula_dist_node::relay_client::{Client, ClientEvent, ClientOptions, CloseReason};
use macula_dist_node::relay_trust::Trust;
use macula_dist_quic::Transport;
use macula_dist_relay::{Config, Relay};
use macula_impair::{Dirs, Impair};
use tokio::sync::mpsc::UnboundedReceiver;
use tokio::time::timeout;

/// How long any step may take before the test fails.
const WAIT: Duration = Duration::from_secs(20);

fn options(relay: &Relay, port: u16, node: &str, key: Arc<NodeIdentity>) -> ClientOptions {
    ClientOptions {
        host: "127.0.0.1".into(),
        port,
        node: node.into(),
        token: None,
        trust: Trust::Pin(relay.fingerprint().into()),
        transport: Transport {
            idle_timeout: Duration::from_secs(2),
            keep_alive: Duration::from_millis(500),
            ..Transport::default()
        },
        connect_timeout: Duration::from_secs(5),
        tunnel_timeout: Duration::from_secs(5),
        wants_e2e: true,
        key,
        cluster: None,
        direct: false,
        advertise: vec![],
    }
}

/// The next event that is not a log line. (Tests run in parallel in one
/// process, where a node's name picks its one endpoint: each test names
/// its nodes apart.)
async fn next_event(events: &mut UnboundedReceiver<ClientEvent>) -> ClientEvent {
    loop {
        match timeout(WAIT, events.recv()).await {
            Ok(Some(ClientEvent::Log(..))) => continue,
            Ok(Some(event)) => return event,
            Ok(None) => panic!("the client's events ended"),
            Err(_) => panic!("no event in {WAIT:?}"),
        }
    }
}

/// A node that stopped answering loses its name to a newer connection with
/// its key; when its path comes back it hears `Replaced` (the relay's
/// close code, not a text to match), which tells its keeper not to take
/// the name back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_whose_name_was_given_to_its_newer_connection_hears_replaced() {
    let relay = Relay::start(Config::loopback()).await.unwrap();
    let proxy = Impair::start(macula_impair::Config::new(
        "127.0.0.1:0".parse().unwrap(),
        relay.local_addr(),
    ))
    .await
    .unwrap();
    let key = Arc::new(NodeIdentity::generate().unwrap());
    let rt = tokio::runtime::Handle::current();

    let (_old, mut old_events) = Client::start(
        options(&relay, proxy.local_addr().port(), "replaced@h", key.clone()),
        rt.clone(),
    )
    .unwrap();
    assert!(matches!(
        next_event(&mut old_events).await,
        ClientEvent::Identified
    ));

    // The old connection goes silent towards the relay (its probe gets no
    // answer), but still hears the relay.
    proxy.controls().blackhole_dirs(Dirs::Up, true);
    let (_new, mut new_events) = Client::start(
        options(&relay, relay.local_addr().port(), "replaced@h", key),
        rt,
    )
    .unwrap();
    match next_event(&mut new_events).await {
        ClientEvent::Identified => {}
        ClientEvent::ConnectFailed(e) => panic!("the newer connection failed: {e:?}"),
        _ => panic!("expected the newer connection to be identified"),
    }
    match next_event(&mut old_events).await {
        ClientEvent::Closed(why) => assert_eq!(why, CloseReason::Replaced),
        _ => panic!("expected the old connection to close"),
    }
    relay.stop().await;
}

/// Another key cannot take a live name: the newer connection is refused,
/// and the holder keeps it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_key_cannot_take_a_live_name() {
    let relay = Relay::start(Config::loopback()).await.unwrap();
    let rt = tokio::runtime::Handle::current();
    let port = relay.local_addr().port();
    let (holder, mut holder_events) = Client::start(
        options(
            &relay,
            port,
            "held@h",
            Arc::new(NodeIdentity::generate().unwrap()),
        ),
        rt.clone(),
    )
    .unwrap();
    assert!(matches!(
        next_event(&mut holder_events).await,
        ClientEvent::Identified
    ));
    let (_other, mut other_events) = Client::start(
        options(
            &relay,
            port,
            "held@h",
            Arc::new(NodeIdentity::generate().unwrap()),
        ),
        rt,
    )
    .unwrap();
    match next_event(&mut other_events).await {
        ClientEvent::ConnectFailed(e) => assert_eq!(
            e,
            macula_dist_node::relay_client::ConnectError::Refused("name_taken".into())
        ),
        _ => panic!("expected a refusal"),
    }
    assert!(holder.status().phase == macula_relay_proto::node::control::Phase::Connected);
    relay.stop().await;
}

/// The same key claiming a live name makes the relay probe the holder (a
/// stream opened and reset at once). An e2e node allows the relay only a
/// few streams at a time, so it takes and drops each probe: more probes
/// than that still each find the holder alive, and it keeps its name.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_live_holder_answers_more_probes_than_it_allows_streams() {
    let relay = Relay::start(Config::loopback()).await.unwrap();
    let rt = tokio::runtime::Handle::current();
    let port = relay.local_addr().port();
    let key = Arc::new(NodeIdentity::generate().unwrap());
    let (holder, mut holder_events) =
        Client::start(options(&relay, port, "probed@h", key.clone()), rt.clone()).unwrap();
    assert!(matches!(
        next_event(&mut holder_events).await,
        ClientEvent::Identified
    ));
    for _ in 0..12 {
        let (claimant, mut events) =
            Client::start(options(&relay, port, "probed@h", key.clone()), rt.clone()).unwrap();
        match next_event(&mut events).await {
            ClientEvent::ConnectFailed(e) => assert_eq!(
                e,
                macula_dist_node::relay_client::ConnectError::Refused("name_taken".into())
            ),
            _ => panic!("the holder answered no probe: its name was handed over"),
        }
        drop(claimant);
    }
    assert!(holder.status().phase == macula_relay_proto::node::control::Phase::Connected);
    relay.stop().await;
}
