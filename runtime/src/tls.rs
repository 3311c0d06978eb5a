//! TLS settings of the `attache` commands: what a server presents and whom
//! it lets in (`attache node`, `attache meta`), and what a client trusts and
//! presents (`attache client`, `attache bench`, a node calling its metadata
//! store). rustls (through tonic, with aws-lc-rs) does the TLS; this module
//! reads the PEM files, with errors that name the file and the flag.
//!
//! The rule for plaintext: a server listens without TLS only on a loopback
//! address, unless told `--insecure` ([`check_plaintext`]).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::Context as _;
use attache_actors::tls::ClientTls;
use clap::Args;

/// A server's TLS: its certificate chain and key, and (mutual TLS) the CAs
/// whose client certificates it accepts.
#[derive(Clone, PartialEq, Eq)]
pub struct ServerTls {
    /// PEM certificate chain presented to clients.
    pub cert_pem: Vec<u8>,
    /// PEM private key of the first certificate.
    pub key_pem: Vec<u8>,
    /// PEM CA certificates: when set, a client must present a certificate
    /// one of them signed, or the handshake fails.
    pub client_ca_pem: Option<Vec<u8>>,
}

impl std::fmt::Debug for ServerTls {
    /// Sizes only: the key is a secret.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerTls")
            .field("cert_pem_bytes", &self.cert_pem.len())
            .field("mutual", &self.client_ca_pem.is_some())
            .finish()
    }
}

/// Reads a PEM file named by `flag`.
///
/// Errors: the file cannot be read, or holds no `-----BEGIN` block.
pub fn read_pem(path: &Path, flag: &str) -> anyhow::Result<Vec<u8>> {
    let bytes = std::fs::read(path).with_context(|| format!("{flag} {}: cannot read it", path.display()))?;
    anyhow::ensure!(
        bytes.windows(11).any(|w| w == b"-----BEGIN "),
        "{flag} {}: not a PEM file (no -----BEGIN line); give a PEM certificate or key",
        path.display()
    );
    Ok(bytes)
}

impl ServerTls {
    /// The TLS of a server given `--tls-cert`, `--tls-key` and optionally
    /// `--tls-client-ca`; `None` when none of them is given.
    ///
    /// Errors: one of cert and key without the other, a client CA without
    /// them, or a file that cannot be read as PEM.
    pub fn load(cert: Option<&Path>, key: Option<&Path>, client_ca: Option<&Path>) -> anyhow::Result<Option<Self>> {
        match (cert, key) {
            (None, None) => {
                anyhow::ensure!(
                    client_ca.is_none(),
                    "--tls-client-ca needs --tls-cert and --tls-key: a server verifies clients only over TLS"
                );
                Ok(None)
            }
            (Some(cert), Some(key)) => {
                let tls = ServerTls {
                    cert_pem: read_pem(cert, "--tls-cert")?,
                    key_pem: read_pem(key, "--tls-key")?,
                    client_ca_pem: client_ca.map(|p| read_pem(p, "--tls-client-ca")).transpose()?,
                };
                // Checked now, before the node takes any volume: a key that
                // is not the certificate's, a CA file holding no certificate.
                tonic::transport::Server::builder().tls_config(tls.config()).with_context(|| {
                    format!(
                        "--tls-cert {}, --tls-key {}{}: rustls refuses them (does the key belong to the \
                         certificate?)",
                        cert.display(),
                        key.display(),
                        client_ca.map(|p| format!(", --tls-client-ca {}", p.display())).unwrap_or_default()
                    )
                })?;
                Ok(Some(tls))
            }
            _ => anyhow::bail!("--tls-cert and --tls-key go together: give both, or neither for plaintext"),
        }
    }

    /// tonic's configuration of this TLS. A handshake not done within
    /// `FIRST_BYTES_WITHIN` (10 s) is dropped, so a peer that stalls in it
    /// does not hold a connection slot.
    pub fn config(&self) -> tonic::transport::ServerTlsConfig {
        use tonic::transport::{Certificate, Identity, ServerTlsConfig};
        let mut config = ServerTlsConfig::new()
            .identity(Identity::from_pem(&self.cert_pem, &self.key_pem))
            .timeout(crate::serve::FIRST_BYTES_WITHIN);
        if let Some(ca) = &self.client_ca_pem {
            config = config.client_ca_root(Certificate::from_pem(ca));
        }
        config
    }

    /// The same certificate and key as a client's identity (a node
    /// presents its own certificate to its metadata store), trusting the
    /// servers `ca_pem` signs.
    pub fn as_client(&self, ca_pem: Vec<u8>) -> ClientTls {
        ClientTls { ca_pem, identity: Some((self.cert_pem.clone(), self.key_pem.clone())), domain: None }
    }
}

/// Refuses plaintext on an address other hosts can reach: without TLS a
/// server listens only on a loopback address, unless `insecure`.
///
/// Errors: `listen` is not a loopback address, `tls` is `None` and
/// `insecure` is not set.
pub fn check_plaintext(what: &str, listen: SocketAddr, tls: Option<&ServerTls>, insecure: bool) -> anyhow::Result<()> {
    if tls.is_some() || insecure || listen.ip().is_loopback() {
        return Ok(());
    }
    anyhow::bail!(
        "{what} would serve plaintext on {listen}, which other machines can reach: anyone there could read and \
         change every shard. Give --tls-cert and --tls-key (and --tls-client-ca to require client certificates), \
         listen on 127.0.0.1, or pass --insecure to serve plaintext anyway"
    )
}

/// Server TLS flags (`attache meta`; `attache node` has the same keys in
/// its config).
#[derive(Args, Clone, Debug, Default)]
pub struct ServerTlsArgs {
    /// PEM certificate chain to serve TLS with (with --tls-key).
    #[arg(long, env = "ATTACHE_TLS_CERT")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert.
    #[arg(long, env = "ATTACHE_TLS_KEY")]
    pub tls_key: Option<PathBuf>,
    /// PEM CA certificates: require every client to present a certificate
    /// one of them signed (mutual TLS).
    #[arg(long, env = "ATTACHE_TLS_CLIENT_CA")]
    pub tls_client_ca: Option<PathBuf>,
    /// Serve plaintext on a non-loopback address (refused without it).
    #[arg(long, env = "ATTACHE_INSECURE")]
    pub insecure: bool,
}

impl ServerTlsArgs {
    /// See [`ServerTls::load`].
    pub fn load(&self) -> anyhow::Result<Option<ServerTls>> {
        ServerTls::load(self.tls_cert.as_deref(), self.tls_key.as_deref(), self.tls_client_ca.as_deref())
    }
}

/// Client TLS flags (`attache client`, `attache bench`). Their environment
/// variables say `CLIENT`, apart from a node's own `ATTACHE_TLS_*`.
#[derive(Args, Clone, Debug, Default)]
pub struct ClientTlsArgs {
    /// PEM CA certificates that sign the nodes' certificates: call them
    /// over TLS (plaintext without it).
    #[arg(long, env = "ATTACHE_CLIENT_TLS_CA")]
    pub tls_ca: Option<PathBuf>,
    /// PEM certificate to present to nodes that require one (with --tls-key).
    #[arg(long, env = "ATTACHE_CLIENT_TLS_CERT")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert.
    #[arg(long, env = "ATTACHE_CLIENT_TLS_KEY")]
    pub tls_key: Option<PathBuf>,
    /// The name the nodes' certificates carry, when it is not the host
    /// called (e.g. the nodes are called by IP address).
    #[arg(long, env = "ATTACHE_CLIENT_TLS_DOMAIN")]
    pub tls_domain: Option<String>,
}

/// Whether every host in the metadata spec `spec` (`grpc://HOST:PORT`,
/// `etcd://HOST:PORT[,...]`; `embedded:` has none) is this machine's
/// loopback (`localhost`, `127.0.0.0/8`, `::1`).
pub fn metadata_is_local(spec: &str) -> bool {
    let Some((_, hosts)) = spec.split_once("://") else { return true };
    hosts.split(',').all(|h| {
        let host = h.rsplit_once(':').map_or(h, |(host, _)| host).trim_start_matches('[').trim_end_matches(']');
        host == "localhost" || host.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback())
    })
}

impl ClientTlsArgs {
    /// The client's TLS; `None` without `--tls-ca`.
    ///
    /// Errors: a certificate without its key (or the reverse), either
    /// without `--tls-ca`, or a file that cannot be read as PEM.
    pub fn load(&self) -> anyhow::Result<Option<ClientTls>> {
        let identity = match (&self.tls_cert, &self.tls_key) {
            (None, None) => None,
            (Some(cert), Some(key)) => Some((read_pem(cert, "--tls-cert")?, read_pem(key, "--tls-key")?)),
            _ => anyhow::bail!("--tls-cert and --tls-key go together: give both, or neither"),
        };
        let Some(ca) = &self.tls_ca else {
            anyhow::ensure!(
                identity.is_none() && self.tls_domain.is_none(),
                "--tls-cert, --tls-key and --tls-domain apply to TLS: give --tls-ca (the CA of the nodes' \
                 certificates) too"
            );
            return Ok(None);
        };
        Ok(Some(ClientTls { ca_pem: read_pem(ca, "--tls-ca")?, identity, domain: self.tls_domain.clone() }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plaintext_is_for_loopback_unless_insecure() {
        let lo: SocketAddr = "127.0.0.1:7400".parse().unwrap();
        let any: SocketAddr = "0.0.0.0:7400".parse().unwrap();
        assert!(check_plaintext("node", lo, None, false).is_ok());
        assert!(check_plaintext("node", "[::1]:7400".parse().unwrap(), None, false).is_ok());
        let e = check_plaintext("node", any, None, false).unwrap_err().to_string();
        assert!(e.contains("--insecure") && e.contains("--tls-cert"), "{e}");
        assert!(check_plaintext("node", any, None, true).is_ok());
        let tls = ServerTls { cert_pem: vec![], key_pem: vec![], client_ca_pem: None };
        assert!(check_plaintext("node", any, Some(&tls), false).is_ok());
    }

    #[test]
    fn metadata_on_loopback_is_local() {
        for local in
            ["embedded:/tmp/m", "grpc://127.0.0.1:7300", "grpc://localhost:7300", "etcd://127.0.0.1:2379,[::1]:2379"]
        {
            assert!(metadata_is_local(local), "{local}");
        }
        for remote in ["grpc://10.0.0.5:7300", "etcd://127.0.0.1:2379,10.0.0.6:2379", "grpc://meta.internal:7300"] {
            assert!(!metadata_is_local(remote), "{remote}");
        }
    }

    #[test]
    fn tls_flags_go_together_and_files_must_be_pem() {
        let dir = tempfile::tempdir().unwrap();
        let (pem, junk) = (dir.path().join("a.pem"), dir.path().join("b.txt"));
        std::fs::write(&pem, "-----BEGIN CERTIFICATE-----\nAA==\n-----END CERTIFICATE-----\n").unwrap();
        std::fs::write(&junk, "not pem").unwrap();
        assert!(ServerTls::load(None, None, None).unwrap().is_none());
        assert!(ServerTls::load(Some(&pem), None, None).unwrap_err().to_string().contains("go together"));
        assert!(ServerTls::load(None, None, Some(&pem)).unwrap_err().to_string().contains("needs --tls-cert"));
        let e = ServerTls::load(Some(&pem), Some(&junk), None).unwrap_err().to_string();
        assert!(e.contains("--tls-key") && e.contains("not a PEM file"), "{e}");
        let e = ServerTls::load(Some(&dir.path().join("none")), Some(&pem), None).unwrap_err().to_string();
        assert!(e.contains("cannot read"), "{e}");
        let e = ServerTls::load(Some(&pem), Some(&pem), Some(&pem)).unwrap_err();
        assert!(format!("{e:#}").contains("rustls refuses them"), "not a certificate and key: {e:#}");
        let client = ClientTlsArgs { tls_cert: Some(pem.clone()), tls_key: Some(pem.clone()), ..Default::default() };
        assert!(client.load().unwrap_err().to_string().contains("give --tls-ca"));
        let client = ClientTlsArgs { tls_ca: Some(pem.clone()), ..client };
        assert!(client.load().unwrap().unwrap().identity.is_some());
    }
}
