//! The relay with its own certificate (PEM files, as `--cert/--key`), and a
//! client that trusts the CA that signed it.

mod common;

use common::*;
use macula_dist_relay::Config;
use macula_relay_proto::Message;
use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};

/// A CA, and a relay certificate it signed for `names`, as PEM files in a
/// fresh directory: (directory, CA file, certificate file, key file, leaf).
fn ca_signed(
    tag: &str,
    names: Vec<String>,
) -> (
    std::path::PathBuf,
    std::path::PathBuf,
    std::path::PathBuf,
    std::path::PathBuf,
    rcgen::Certificate,
) {
    let dir = std::env::temp_dir().join(format!("macula-tls-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(vec![]).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let leaf_key = KeyPair::generate().unwrap();
    let leaf = CertificateParams::new(names)
        .unwrap()
        .signed_by(&leaf_key, &ca, &ca_key)
        .unwrap();
    let (ca_file, cert_file, key_file) = (
        dir.join("ca.pem"),
        dir.join("cert.pem"),
        dir.join("key.pem"),
    );
    std::fs::write(&ca_file, ca.pem()).unwrap();
    std::fs::write(&cert_file, leaf.pem()).unwrap();
    std::fs::write(&key_file, leaf_key.serialize_pem()).unwrap();
    (dir, ca_file, cert_file, key_file, leaf)
}

/// A client endpoint that trusts the CA in `ca_file`.
fn trusting(ca_file: std::path::PathBuf) -> quinn::Endpoint {
    let transport = macula_dist_quic::Transport::default();
    let mut endpoint = transport
        .client_endpoint("127.0.0.1:0".parse().unwrap())
        .unwrap();
    endpoint.set_default_client_config(
        macula_dist_node::relay_trust::client_config(
            &macula_dist_node::relay_trust::Trust::CaFile(ca_file),
            &transport,
        )
        .unwrap(),
    );
    endpoint
}

#[tokio::test]
async fn relay_certificate_from_pem_files_verified_by_ca() {
    let (dir, ca_file, cert_file, key_file, leaf) = ca_signed("pem", vec!["localhost".into()]);
    let identity =
        macula_dist_relay::RelayCertificate::from_pem_files(&cert_file, &key_file).unwrap();
    let relay = relay_with(Config {
        certificate: Some(identity),
        ..Config::loopback()
    })
    .await;
    assert_eq!(
        relay.fingerprint(),
        macula_dist_quic::fingerprint(leaf.der())
    );

    let endpoint = trusting(ca_file);
    // The CA is trusted and the name checked: "localhost" is in the certificate.
    let conn = endpoint
        .connect(relay.local_addr(), "localhost")
        .unwrap()
        .await
        .unwrap();
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    send.write_all(
        &Message::Identify {
            node: "a@h".into(),
            token: None,
            version: None,
        }
        .encode(),
    )
    .await
    .unwrap();
    let mut reply = [0u8; 64];
    let n = recv.read(&mut reply).await.unwrap().unwrap();
    let mut input = &reply[..n];
    let msg = macula_relay_proto::FrameDecoder::default()
        .decode(&mut input)
        .unwrap();
    assert!(matches!(msg, Some(Message::Identified { .. })));
    // Another name than the certificate's is refused.
    let wrong_name = endpoint
        .connect(relay.local_addr(), "relay.example.com")
        .unwrap()
        .await;
    assert!(
        wrong_name.is_err(),
        "a name the certificate does not carry is refused"
    );
    relay.stop().await;
    let _ = std::fs::remove_dir_all(&dir);
}

/// A relay reached by an IP-literal URL is checked against the IP SANs of
/// its certificate (the client used to check the name "localhost").
#[tokio::test]
async fn ip_literal_is_checked_against_ip_sans() {
    for (tag, names, accepted) in [
        ("dns-only", vec!["localhost".to_string()], false),
        ("ip-san", vec!["127.0.0.1".to_string()], true),
    ] {
        let (dir, ca_file, cert_file, key_file, _) = ca_signed(tag, names);
        let relay = relay_with(Config {
            certificate: Some(
                macula_dist_relay::RelayCertificate::from_pem_files(&cert_file, &key_file).unwrap(),
            ),
            ..Config::loopback()
        })
        .await;
        let connected = trusting(ca_file)
            .connect(relay.local_addr(), "127.0.0.1")
            .unwrap()
            .await;
        assert_eq!(connected.is_ok(), accepted, "{tag}: {connected:?}");
        relay.stop().await;
        let _ = std::fs::remove_dir_all(&dir);
    }
}
