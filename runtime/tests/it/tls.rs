//! TLS with real processes: a CA and certificates made in the test
//! (`rcgen`), `attache meta` and `attache node` both serving mutual TLS
//! (the node calls its metadata store over TLS with its own certificate,
//! whose organization is `attache:node`). A client with a certificate from
//! the CA is served as the client its common name names, through the
//! library client and through `attache client`, and refused
//! (`PERMISSION_DENIED`) as any other client and at the metadata store; a
//! client with a certificate from another CA, one with no certificate, and
//! a plaintext one are refused.
//! A node or `attache meta` asked to serve plaintext on a non-loopback
//! address refuses to start unless given `--insecure`. The etcd backend
//! calls an etcd that requires client certificates.

use crate::common;

use std::path::{Path, PathBuf};
use std::process::Command;

use attache_actors::client::{CallSpec, Client, ClientSettings};
use attache_actors::service::proto::{GetRequest, NewShardRequest, PutRequest};
use attache_actors::tls::ClientTls;
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};

/// A CA that signs certificates.
struct Ca {
    issuer: Issuer<'static, KeyPair>,
    pem: String,
}

impl Ca {
    fn new(name: &str) -> Ca {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        let pem = params.self_signed(&key).unwrap().pem();
        Ca { issuer: Issuer::new(params, key), pem }
    }

    /// A certificate for `names` (DNS names or IP addresses) with common
    /// name `cn`, and its key, both PEM.
    fn sign(&self, cn: &str, names: &[&str]) -> (String, String) {
        self.sign_in(cn, &[], names)
    }

    /// As [`Ca::sign`], with the organization (O) of each of `groups`
    /// (rcgen keeps the last one only: give one).
    fn sign_in(&self, cn: &str, groups: &[&str], names: &[&str]) -> (String, String) {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>()).unwrap();
        params.distinguished_name.push(DnType::CommonName, cn);
        for g in groups {
            params.distinguished_name.push(DnType::OrganizationName, *g);
        }
        (params.signed_by(&key, &self.issuer).unwrap().pem(), key.serialize_pem())
    }
}

/// Writes `text` to `dir/name`; its path.
fn file(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// The client id the test's client certificate names (its CN).
const CLIENT: &str = "client-1";

async fn new_shard(c: &Client) -> Result<u64, String> {
    new_shard_as(c, CLIENT).await
}

async fn new_shard_as(c: &Client, client_id: &str) -> Result<u64, String> {
    let client_id = client_id.to_string();
    c.call(CallSpec::any().once().starting_at(0), |mut c| {
        let client_id = client_id.clone();
        async move { c.new_shard(NewShardRequest { client_id, size_limit_bytes: 0 }).await }
    })
    .await
    .map(|s| s.value.shard_id)
    .map_err(|f| format!("{:?} {}", f.status.code(), f.status.message()))
}

fn settings() -> ClientSettings {
    ClientSettings { deadline_ms: 3_000, ..ClientSettings::default() }
}

#[actix_rt::test]
async fn mutual_tls_serves_clients_of_the_ca_and_refuses_the_rest() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let ca = Ca::new("attache test CA");
    let ca_file = file(root, "ca.pem", &ca.pem);
    // The node's certificate is also its identity to the metadata store,
    // which serves only the group attache:node.
    let (server_cert, server_key) = ca.sign_in("node-1", &["attache:node"], &["localhost", "127.0.0.1"]);
    let (cert, key) = (file(root, "node.pem", &server_cert), file(root, "node.key", &server_key));
    let (client_cert, client_key) = ca.sign(CLIENT, &[]);

    // attache meta and a node, both requiring client certificates of the CA.
    let tls = ["--tls-cert", s(&cert), "--tls-key", s(&key), "--tls-client-ca", s(&ca_file)];
    let meta_dir = root.join("meta");
    let mut meta_args = vec!["meta", "--listen", "127.0.0.1:0", "--data-dir", s(&meta_dir)];
    meta_args.extend_from_slice(&tls);
    let meta = common::start(&meta_args, "serving gRPC on ");
    let metadata = format!("grpc://{}", meta.addr);
    let mut extra = tls.to_vec();
    extra.extend_from_slice(&["--metadata-tls-ca", s(&ca_file)]);
    let node = common::start_node(root, "node-1", "vol-1", &metadata, &extra);

    // A client of the CA: served.
    let good = ClientTls {
        ca_pem: ca.pem.clone().into_bytes(),
        identity: Some((client_cert.clone().into_bytes(), client_key.clone().into_bytes())),
        domain: None,
    };
    let c = Client::new(std::slice::from_ref(&node.addr), settings()).unwrap().with_tls(good.clone());
    let shard = new_shard(&c).await.expect("a client with a certificate of the CA is served");
    let put = PutRequest {
        shard_id: shard,
        client_id: CLIENT.into(),
        key: "k".into(),
        value: "v".into(),
        indexes: vec![],
        request_id: c.request_id(),
    };
    c.call(CallSpec::shard(shard), move |mut c| {
        let r = put.clone();
        async move { c.put(r).await }
    })
    .await
    .expect("put over mutual TLS");
    let got = c
        .call(CallSpec::shard(shard), |mut c| async move {
            c.get(GetRequest {
                shard_id: shard,
                client_id: CLIENT.into(),
                key: "k".into(),
                consistency: 0,
                max_staleness_ms: 0,
            })
            .await
        })
        .await
        .expect("get over mutual TLS");
    assert_eq!(got.value.value, b"v");

    // The certificate's CN is the only client it may act as; it is no node
    // to the metadata store.
    let denied = new_shard_as(&c, "client-2").await.expect_err("acting as another client");
    assert!(denied.starts_with("PermissionDenied") && denied.contains("\"client-1\""), "{denied}");
    let at_meta = attache_actors::meta::remote::RemoteBackend::new(meta.addr.clone()).with_tls(good.clone());
    let refused = attache_actors::meta::MetadataBackend::get(&at_meta, b"nodes/1").await;
    assert!(matches!(refused, Err(attache_actors::meta::MetaError::Refused(_))), "a client at meta: {refused:?}");

    // Refused: a certificate of another CA, no certificate, plaintext.
    let other = Ca::new("another CA");
    let (other_cert, other_key) = other.sign("intruder", &[]);
    let foreign = ClientTls { identity: Some((other_cert.into_bytes(), other_key.into_bytes())), ..good.clone() };
    let anonymous = ClientTls { identity: None, ..good.clone() };
    for (what, tls) in
        [("another CA's certificate", Some(foreign)), ("no certificate", Some(anonymous)), ("plaintext", None)]
    {
        let c = Client::new(std::slice::from_ref(&node.addr), settings()).unwrap();
        let c = match tls {
            Some(tls) => c.with_tls(tls),
            None => c,
        };
        let refused = new_shard(&c).await.expect_err(what);
        eprintln!("{what}: refused: {refused}");
        // Refused by the server, on the wire: not a client-side settings error.
        assert!(!refused.starts_with("InvalidArgument"), "{what}: {refused}");
    }
    // A client that does not trust the node's CA refuses the node.
    let untrusting = ClientTls { ca_pem: other.pem.clone().into_bytes(), ..good.clone() };
    let c = Client::new(std::slice::from_ref(&node.addr), settings()).unwrap().with_tls(untrusting);
    new_shard(&c).await.expect_err("a server certificate from an unknown CA");

    // attache client with the TLS flags.
    let (cc, ck) = (file(root, "client.pem", &client_cert), file(root, "client.key", &client_key));
    let out = Command::new(env!("CARGO_BIN_EXE_attache"))
        .args(["client", "--addr", &node.addr, "--tls-ca", s(&ca_file), "--tls-cert", s(&cc), "--tls-key", s(&ck)])
        .args(["get", "--shard", &shard.to_string(), "--client-id", CLIENT, "k"])
        .output()
        .unwrap();
    assert!(out.status.success(), "attache client over TLS: {}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "v");
    let out = Command::new(env!("CARGO_BIN_EXE_attache"))
        .args(["client", "--addr", &node.addr, "--retry-secs", "2"])
        .args(["get", "--shard", &shard.to_string(), "--client-id", CLIENT, "k"])
        .output()
        .unwrap();
    assert!(!out.status.success(), "a plaintext attache client was served by a TLS node");
    drop((node, meta));
}

#[test]
fn plaintext_on_a_non_loopback_address_needs_insecure() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("n");
    let node = |extra: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_attache"))
            .args(["node", "--listen", "0.0.0.0:0", "--data-dir", s(&data), "--volume-root", s(dir.path())])
            .args(["--volumes", "vol-1", "--metadata", "grpc://127.0.0.1:1"])
            .args(extra)
            .output()
            .unwrap()
    };
    let out = node(&[]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("--insecure") && err.contains("--tls-cert"), "{err}");
    let out = Command::new(env!("CARGO_BIN_EXE_attache"))
        .args(["meta", "--listen", "0.0.0.0:0", "--data-dir", s(&dir.path().join("m"))])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("--insecure"), "{err}");
    let out = Command::new(env!("CARGO_BIN_EXE_attache"))
        .args(["dev", "--listen", "0.0.0.0:0", "--data-dir", s(&dir.path().join("d"))])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("--insecure"), "{err}");
}

/// The etcd backend over mutual TLS: etcd started with a certificate of the
/// test's CA and `--client-cert-auth`; `EtcdBackend` with the CA and a
/// client certificate writes and reads; one without a certificate, or in
/// plaintext, is refused.
#[actix_rt::test]
async fn the_etcd_backend_calls_etcd_over_mutual_tls() {
    use crate::metadata::{Etcd, EtcdTls};
    use attache_actors::meta::MetadataBackend;
    use attache_runtime::etcd::EtcdBackend;
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let ca = Ca::new("attache test CA");
    let ca_file = file(root, "ca.pem", &ca.pem);
    let (server_cert, server_key) = ca.sign("etcd", &["localhost", "127.0.0.1"]);
    let (cert, key) = (file(root, "etcd.pem", &server_cert), file(root, "etcd.key", &server_key));
    let (client_cert, client_key) = ca.sign("node-1", &[]);
    let tls = ClientTls {
        ca_pem: ca.pem.clone().into_bytes(),
        identity: Some((client_cert.into_bytes(), client_key.into_bytes())),
        domain: None,
    };
    // Ready once a client with the CA's certificate reads from it.
    let etcd = Etcd::start_with(Some(EtcdTls { cert, key, client_ca: ca_file, client: tls.clone() })).await;
    let endpoint = etcd.endpoint();
    let backend = EtcdBackend::connect(std::slice::from_ref(&endpoint), Some(&tls)).await.unwrap();
    backend.put(b"/tls/k", b"v", 0).await.expect("put over mutual TLS");
    assert_eq!(backend.get(b"/tls/k").await.unwrap().map(|kv| kv.value), Some(b"v".to_vec()));
    let anonymous = ClientTls { identity: None, ..tls.clone() };
    for (what, tls) in [("no client certificate", Some(&anonymous)), ("plaintext", None)] {
        let refused = match EtcdBackend::connect(std::slice::from_ref(&endpoint), tls).await {
            Ok(b) => b.get(b"/tls/k").await.map(|_| ()),
            Err(e) => Err(e),
        };
        assert!(refused.is_err(), "{what}: etcd served a read");
    }
    drop(etcd);
}
