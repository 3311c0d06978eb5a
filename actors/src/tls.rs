//! TLS for this crate's gRPC clients (the service [`Client`](crate::client::Client)
//! and the metadata client `RemoteBackend`): what a client trusts and what it
//! presents, as PEM bytes. Applied with rustls through tonic in the normal
//! build when the `tls` feature is on (`attache-runtime` turns it on); the
//! simulation runs plaintext and has no TLS, so there a [`ClientTls`] is an
//! error at connect time.

use tonic::transport::Endpoint;

/// A client's TLS settings. With them, the client connects over TLS
/// (`https://`), checks the server's certificate against `ca_pem` and the
/// name in `domain` (default: the host of the address), and presents
/// `identity` when it is set (mutual TLS).
#[derive(Clone, Default, PartialEq, Eq)]
pub struct ClientTls {
    /// PEM certificates of the CAs that sign the servers' certificates.
    pub ca_pem: Vec<u8>,
    /// The client's certificate chain and private key, PEM, for servers
    /// that verify clients (mTLS); `None`: present none.
    pub identity: Option<(Vec<u8>, Vec<u8>)>,
    /// The name the server's certificate must carry; `None`: the host of
    /// the address called (an IP address must then be in the certificate's
    /// subject alternative names).
    pub domain: Option<String>,
}

impl std::fmt::Debug for ClientTls {
    /// Sizes only: the key is a secret.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientTls")
            .field("ca_pem_bytes", &self.ca_pem.len())
            .field("identity", &self.identity.is_some())
            .field("domain", &self.domain)
            .finish()
    }
}

/// The endpoint for `addr` (`host:port`, or a URL whose scheme is then
/// kept), plaintext `http://` without `tls` and `https://` with it.
///
/// Errors: a message naming `addr` when it is not a valid URI, when TLS is
/// asked of an `http://` URL, or of a build without TLS (the simulation,
/// or without the `tls` feature).
pub fn endpoint(addr: &str, tls: Option<&ClientTls>) -> Result<Endpoint, String> {
    let scheme = if tls.is_some() { "https" } else { "http" };
    let url = if addr.contains("://") { addr.to_string() } else { format!("{scheme}://{addr}") };
    let endpoint =
        Endpoint::from_shared(url.clone()).map_err(|e| format!("address {addr:?} is not a valid URI: {e}"))?;
    let Some(tls) = tls else { return Ok(endpoint) };
    if !url.starts_with("https://") {
        return Err(format!("address {addr:?}: TLS is configured, so call it as https://, not {url}"));
    }
    with_tls(endpoint, tls)
}

#[cfg(all(feature = "tls", not(madsim)))]
fn with_tls(endpoint: Endpoint, tls: &ClientTls) -> Result<Endpoint, String> {
    use tonic::transport::{Certificate, ClientTlsConfig, Identity};
    let mut config = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(&tls.ca_pem));
    if let Some((cert, key)) = &tls.identity {
        config = config.identity(Identity::from_pem(cert, key));
    }
    if let Some(domain) = &tls.domain {
        config = config.domain_name(domain.clone());
    }
    endpoint.tls_config(config).map_err(|e| format!("TLS settings refused: {e}"))
}

#[cfg(not(all(feature = "tls", not(madsim))))]
fn with_tls(_endpoint: Endpoint, _tls: &ClientTls) -> Result<Endpoint, String> {
    Err("this build has no TLS (the simulation, or attache-actors without its `tls` feature)".into())
}
