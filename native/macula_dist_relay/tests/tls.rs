//! The relay with its own certificate (PEM files, as `--cert/--key`), and a
//! client that trusts the CA that signed it.

mod common;

use common::*;
use macula_dist_relay::{tls, Config};
use macula_relay_proto::Message;
use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};

#[tokio::test]
async fn relay_certificate_from_pem_files_verified_by_ca() {
    let dir = std::env::temp_dir().join(format!("macula-tls-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(vec![]).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let leaf_key = KeyPair::generate().unwrap();
    let leaf = CertificateParams::new(vec!["localhost".into()])
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

    let identity = tls::Identity::from_pem_files(&cert_file, &key_file).unwrap();
    let relay = relay_with(Config {
        identity: Some(identity),
        ..Config::loopback()
    })
    .await;
    assert_eq!(relay.fingerprint(), tls::fingerprint(leaf.der()));

    let transport = tls::Transport::default();
    let mut endpoint = transport
        .client_endpoint("127.0.0.1:0".parse().unwrap())
        .unwrap();
    endpoint.set_default_client_config(
        tls::client_config(&tls::Trust::CaFile(ca_file), &transport).unwrap(),
    );
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
