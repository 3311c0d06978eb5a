//! Who may do what: callers' identities and the rules the node service
//! ([`crate::service`]) and the metadata endpoint ([`crate::meta::remote`])
//! apply to them. Written once for both builds: the simulation runs every
//! rule through bearer tokens (it has no TLS).
//!
//! A caller's identity comes from its connection, never from the request
//! body ([`Authenticator::caller`]):
//! - a bearer token in the `authorization` metadata entry
//!   (`Bearer <token>`, the header of RFC 6750 §2.1), looked up by its
//!   SHA-256 in a token file ([`TokenFile`]), which stores only hashes;
//! - else, on a mutual-TLS connection, the subject of the client's
//!   certificate: its common name (CN) is the identity's name and each
//!   organization (O) one of its groups. This is the convention Kubernetes
//!   uses for X.509 client certificates ("Authenticating", kubernetes.io).
//!
//! The rules ([`Caller`]):
//! - a request that names a `client_id` (every shard call, `NewShard`,
//!   `ListShards`) is served only when the id is the caller's name;
//!   otherwise `PERMISSION_DENIED`, before anything is done. An operator
//!   may also list any client's shards;
//! - `ClusterStatus` needs the group [`OPERATOR_GROUP`] or [`NODE_GROUP`];
//! - every call of the metadata endpoint needs [`NODE_GROUP`]: only nodes
//!   read and change node, volume, lease and shard records;
//! - a server that authenticates answers a call with no identity, or with
//!   a token it does not know, `UNAUTHENTICATED`.
//!
//! A server with neither a token file nor a client CA (`attache dev`, or a
//! node started so) does not authenticate: every caller may do everything
//! ([`Caller::Anyone`]).

use std::collections::HashMap;
use std::sync::Arc;

use sha2::{Digest, Sha256};
use tonic::metadata::{Ascii, MetadataValue};
use tonic::{Request, Status};

use crate::error::AttacheError;

/// The group of operators: they may call `ClusterStatus` and list any
/// client's shards.
pub const OPERATOR_GROUP: &str = "attache:operator";

/// The group of storage nodes: the metadata endpoint serves only them.
pub const NODE_GROUP: &str = "attache:node";

/// The request metadata entry that carries a bearer token.
pub const AUTHORIZATION: &str = "authorization";

/// A caller's name and groups.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Identity {
    /// The caller's name: the client id it may act as.
    pub name: String,
    /// Its groups ([`OPERATOR_GROUP`], [`NODE_GROUP`], or any other).
    pub groups: Vec<String>,
}

impl Identity {
    /// Whether the identity is in `group`.
    pub fn in_group(&self, group: &str) -> bool {
        self.groups.iter().any(|g| g == group)
    }
}

/// Who is calling, as the server established it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Caller {
    /// The server does not authenticate: anyone may do anything.
    Anyone,
    /// An authenticated caller.
    Known(Identity),
}

impl Caller {
    /// Whether the caller may act as client `client_id`: it is the
    /// caller's name.
    ///
    /// Errors: `PermissionDenied` naming both.
    pub fn may_act_as(&self, client_id: &str) -> Result<(), AttacheError> {
        match self {
            Caller::Anyone => Ok(()),
            Caller::Known(id) if id.name == client_id => Ok(()),
            Caller::Known(id) => Err(AttacheError::PermissionDenied(format!(
                "caller {:?} may not act as client {client_id:?}: a request's client_id must be the caller's \
                 own name (the CN of its certificate, or the name its token maps to)",
                id.name
            ))),
        }
    }

    /// Whether the caller may list `client_id`'s shards: it is that client
    /// or an operator.
    ///
    /// Errors: `PermissionDenied`.
    pub fn may_list(&self, client_id: &str) -> Result<(), AttacheError> {
        match self {
            Caller::Known(id) if id.in_group(OPERATOR_GROUP) => Ok(()),
            _ => self.may_act_as(client_id),
        }
    }

    /// Whether the caller is in one of `groups` (for `what`, named in the
    /// error).
    ///
    /// Errors: `PermissionDenied` naming the groups needed.
    pub fn needs_group(&self, groups: &[&str], what: &str) -> Result<(), AttacheError> {
        match self {
            Caller::Anyone => Ok(()),
            Caller::Known(id) if groups.iter().any(|g| id.in_group(g)) => Ok(()),
            Caller::Known(id) => Err(AttacheError::PermissionDenied(format!(
                "caller {:?} may not {what}: it needs the group {} (an O of its certificate, or a group its \
                 token maps to)",
                id.name,
                groups.join(" or ")
            ))),
        }
    }
}

/// The SHA-256 of `token` as a token file stores it: `sha256:` and 64
/// lowercase hex digits.
pub fn token_hash(token: &str) -> String {
    format!("sha256:{}", hex(&Sha256::digest(token.as_bytes())))
}

fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    bytes.iter().flat_map(|b| [DIGITS[usize::from(b >> 4)] as char, DIGITS[usize::from(b & 15)] as char]).collect()
}

/// The 32 bytes of 64 hex digits (either case); `None` for anything else.
fn unhex32(digits: &str) -> Option<[u8; 32]> {
    let digits = digits.as_bytes();
    if digits.len() != 64 {
        return None;
    }
    let nibble = |d: u8| (d as char).to_digit(16).map(|v| v as u8);
    let mut out = [0u8; 32];
    for (i, pair) in digits.chunks_exact(2).enumerate() {
        out[i] = nibble(pair[0])? << 4 | nibble(pair[1])?;
    }
    Some(out)
}

/// Bytes in a bearer token [`new_token`] makes (before hex).
pub const TOKEN_BYTES: usize = 32;

/// A new bearer token: `attache_` and [`TOKEN_BYTES`] bytes of `random` as
/// hex. `random` must come from a cryptographic generator in production.
pub fn new_token(random: [u8; TOKEN_BYTES]) -> String {
    format!("attache_{}", hex(&random))
}

/// The tokens a server accepts: SHA-256 of each token, with the identity
/// it stands for. Its text, one token per line:
///
/// ```text
/// # comment
/// sha256:<64 hex digits> <name> [<group>[,<group>...]]
/// ```
///
/// A token is looked up by its hash, so the file holds no secret that
/// would let its reader call the server. `attache token` makes a token and
/// its line.
#[derive(Clone, Debug, Default)]
pub struct TokenFile {
    /// By the SHA-256 of the token (its 32 bytes: a lookup hashes the
    /// token and formats nothing).
    by_hash: HashMap<[u8; 32], Identity>,
}

impl TokenFile {
    /// Parses a token file's text.
    ///
    /// Errors: the first bad line, by number: not `sha256:` and 64 hex
    /// digits, no name, a name or group with a control character, or a
    /// hash listed twice.
    pub fn parse(text: &str) -> Result<Self, String> {
        let mut by_hash = HashMap::new();
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let at = |what: String| format!("token file line {}: {what}", n + 1);
            let mut fields = line.split_whitespace();
            let hash = fields.next().unwrap_or_default().to_ascii_lowercase();
            let Some(digest) = hash.strip_prefix("sha256:").and_then(unhex32) else {
                return Err(at(format!(
                    "{hash:?} is not a token hash: expected sha256: and 64 hex digits (attache token makes one)"
                )));
            };
            let name = fields.next().ok_or_else(|| at("no name after the hash".into()))?;
            let groups: Vec<String> = match fields.next() {
                Some(g) => g.split(',').filter(|g| !g.is_empty()).map(str::to_string).collect(),
                None => Vec::new(),
            };
            if let Some(extra) = fields.next() {
                return Err(at(format!("unexpected {extra:?}: groups are one comma-separated field")));
            }
            if name.chars().chain(groups.iter().flat_map(|g| g.chars())).any(char::is_control) {
                return Err(at("a name or group holds a control character".into()));
            }
            let id = Identity { name: name.to_string(), groups };
            if by_hash.insert(digest, id).is_some() {
                return Err(at(format!("the hash {hash} is listed twice")));
            }
        }
        Ok(TokenFile { by_hash })
    }

    /// The identity `token` stands for, if the file lists its hash.
    pub fn identify(&self, token: &str) -> Option<&Identity> {
        self.by_hash.get(&<[u8; 32]>::from(Sha256::digest(token.as_bytes())))
    }

    /// Tokens listed.
    pub fn len(&self) -> usize {
        self.by_hash.len()
    }

    /// Whether the file lists no token.
    pub fn is_empty(&self) -> bool {
        self.by_hash.is_empty()
    }
}

/// How a server establishes who calls it; cheap to clone.
#[derive(Clone, Debug, Default)]
pub struct Authenticator {
    /// `None`: no authentication ([`Caller::Anyone`]).
    policy: Option<Arc<Policy>>,
}

#[derive(Debug)]
struct Policy {
    tokens: Option<TokenFile>,
    certificates: bool,
}

impl Authenticator {
    /// No authentication: every caller is [`Caller::Anyone`].
    pub fn open() -> Self {
        Authenticator { policy: None }
    }

    /// Authentication by the bearer tokens of `tokens` and, when
    /// `certificates`, by the subject of a verified TLS client certificate
    /// (the server must require client certificates of a CA). With neither,
    /// the same as [`Authenticator::open`].
    pub fn new(tokens: Option<TokenFile>, certificates: bool) -> Self {
        if tokens.is_none() && !certificates {
            return Authenticator::open();
        }
        Authenticator { policy: Some(Arc::new(Policy { tokens, certificates })) }
    }

    /// Whether callers are authenticated.
    pub fn authenticates(&self) -> bool {
        self.policy.is_some()
    }

    /// The rules in force, for a server's start-up line.
    pub fn describe(&self) -> String {
        let Some(policy) = &self.policy else {
            return "no caller authentication (no token file, no client CA): any caller may act as any client".into();
        };
        let mut by = Vec::new();
        if let Some(tokens) = &policy.tokens {
            by.push(format!("bearer token ({} in the token file)", tokens.len()));
        }
        if policy.certificates {
            by.push("client certificate (CN: name, O: groups)".into());
        }
        format!("callers authenticated by {}", by.join(" or "))
    }

    /// Who sent `req` (see the module docs for the order).
    ///
    /// Errors: `UNAUTHENTICATED`, tagged as a rejection, when the server
    /// authenticates and `req` has an unknown or malformed token, or
    /// neither a token nor a certificate it accepts.
    pub fn caller<T>(&self, req: &Request<T>) -> Result<Caller, Status> {
        let Some(policy) = &self.policy else { return Ok(Caller::Anyone) };
        let refuse = |m: String| Err(crate::service::status(AttacheError::Unauthenticated(m)));
        let mut entries = req.metadata().get_all(AUTHORIZATION).iter();
        if let (Some(tokens), Some(value)) = (&policy.tokens, entries.next()) {
            if entries.next().is_some() {
                return refuse("more than one authorization entry: send one bearer token".into());
            }
            // The scheme is case-insensitive (RFC 7235 §2.1).
            let token = value.to_str().ok().and_then(|v| {
                let (scheme, token) = v.trim().split_once(' ')?;
                scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
            });
            let Some(token) = token.filter(|t| !t.is_empty()) else {
                return refuse("the authorization entry is not `Bearer <token>`".into());
            };
            return match tokens.identify(token) {
                Some(id) => Ok(Caller::Known(id.clone())),
                None => refuse("unknown bearer token: this server's token file does not list it".into()),
            };
        }
        if policy.certificates {
            if let Some(id) = certificate_identity(req)? {
                return Ok(Caller::Known(id));
            }
        }
        let how = match (&policy.tokens, policy.certificates) {
            (Some(_), true) => "a client certificate of its CA or a bearer token",
            (Some(_), false) => "a bearer token (authorization: Bearer <token>)",
            _ => "a client certificate of its CA",
        };
        refuse(format!("this server authenticates its callers: call it with {how}"))
    }
}

/// As a gRPC interceptor (the servers wrap their services in it): puts the
/// [`Caller`] in the request's extensions for [`caller_of`], or refuses the
/// call before its body is read and decoded.
impl tonic::service::Interceptor for Authenticator {
    fn call(&mut self, mut req: Request<()>) -> Result<Request<()>, Status> {
        let caller = self.caller(&req).inspect_err(|_| {
            metrics::counter!("attache_requests_unauthenticated_total").increment(1);
        })?;
        req.extensions_mut().insert(caller);
        Ok(req)
    }
}

/// The caller the server's [`Authenticator`] (its interceptor) found for
/// `req`.
///
/// Errors: `INTERNAL` when there is none: the service is served without
/// its authenticator, a bug; the call is refused, not let through.
pub fn caller_of<T>(req: &Request<T>) -> Result<Caller, Status> {
    req.extensions().get::<Caller>().cloned().ok_or_else(|| {
        crate::service::status(AttacheError::Internal(
            "no caller identity on this request: the service runs without its authenticator".into(),
        ))
    })
}

/// The identity in the verified client certificate of `req`'s connection:
/// the subject's CN and its O values. `None` without one.
///
/// Errors: `UNAUTHENTICATED` when the certificate has no CN (or one that is
/// not UTF-8).
#[cfg(all(feature = "tls", not(madsim)))]
fn certificate_identity<T>(req: &Request<T>) -> Result<Option<Identity>, Status> {
    let Some(certs) = req.peer_certs() else { return Ok(None) };
    let Some(leaf) = certs.first() else { return Ok(None) };
    subject_identity(leaf.as_ref()).map(Some).map_err(|m| crate::service::status(AttacheError::Unauthenticated(m)))
}

/// The simulation (and a build without TLS) has no certificates.
#[cfg(not(all(feature = "tls", not(madsim))))]
fn certificate_identity<T>(_req: &Request<T>) -> Result<Option<Identity>, Status> {
    Ok(None)
}

/// The identity a DER certificate's subject names: its one CN, and every
/// O (as text) as a group.
///
/// Errors: a message when the certificate does not parse, or has no CN,
/// more than one, or one that is empty or not text.
#[cfg(all(feature = "tls", not(madsim)))]
pub fn subject_identity(der: &[u8]) -> Result<Identity, String> {
    use x509_parser::prelude::{FromDer, X509Certificate};
    let (_, cert) =
        X509Certificate::from_der(der).map_err(|e| format!("the client certificate does not parse: {e}"))?;
    let subject = cert.subject();
    let names: Vec<_> = subject.iter_common_name().collect();
    let [cn] = names[..] else {
        return Err(format!(
            "the client certificate's subject has {} common names (CN): it must have one, the caller's name",
            names.len()
        ));
    };
    let name = cn
        .as_str()
        .ok()
        .filter(|cn| !cn.is_empty())
        .ok_or("the client certificate's common name (CN) is empty or not text: the CN is the caller's name")?;
    let groups = subject.iter_organization().filter_map(|o| o.as_str().ok()).map(str::to_string).collect();
    Ok(Identity { name: name.to_string(), groups })
}

/// A client's credentials: puts `authorization: Bearer <token>` on every
/// request when it has a token (a gRPC interceptor, so every call of a
/// stub carries it).
#[derive(Clone, Default)]
pub struct BearerToken(Option<MetadataValue<Ascii>>);

impl BearerToken {
    /// Credentials that send `token`.
    ///
    /// Errors: a message when `token` is empty or holds characters a
    /// metadata value cannot carry.
    pub fn new(token: &str) -> Result<Self, String> {
        let token = token.trim();
        if token.is_empty() {
            return Err("the token is empty".into());
        }
        let mut value: MetadataValue<Ascii> = format!("Bearer {token}")
            .parse()
            .map_err(|_| "the token holds characters a gRPC metadata value cannot carry".to_string())?;
        // Kept out of HTTP/2 header compression tables (HPACK's "never
        // indexed"): a secret.
        value.set_sensitive(true);
        Ok(BearerToken(Some(value)))
    }

    /// Whether a token is sent.
    pub fn is_set(&self) -> bool {
        self.0.is_some()
    }
}

impl std::fmt::Debug for BearerToken {
    /// Never the token: it is a secret.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("BearerToken").field(&self.0.as_ref().map(|_| "<redacted>")).finish()
    }
}

impl tonic::service::Interceptor for BearerToken {
    fn call(&mut self, mut req: Request<()>) -> Result<Request<()>, Status> {
        if let Some(v) = &self.0 {
            req.metadata_mut().insert(AUTHORIZATION, v.clone());
        }
        Ok(req)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_token(token: &str) -> Request<()> {
        tonic::service::Interceptor::call(&mut BearerToken::new(token).unwrap(), Request::new(())).unwrap()
    }

    fn file() -> TokenFile {
        TokenFile::parse(&format!(
            "# tokens\n\n{} alice\n{}  ops  attache:operator,other\n",
            token_hash("alice-secret"),
            token_hash("ops-secret")
        ))
        .unwrap()
    }

    #[test]
    fn a_token_stands_for_the_identity_its_hash_is_listed_with() {
        let auth = Authenticator::new(Some(file()), false);
        let alice = auth.caller(&with_token("alice-secret")).unwrap();
        assert_eq!(alice, Caller::Known(Identity { name: "alice".into(), groups: vec![] }));
        alice.may_act_as("alice").unwrap();
        let denied = alice.may_act_as("bob").unwrap_err();
        assert!(
            matches!(&denied, AttacheError::PermissionDenied(m) if m.contains("\"alice\"") && m.contains("\"bob\""))
        );
        assert!(alice.needs_group(&[OPERATOR_GROUP], "see the cluster").is_err());
        assert!(alice.may_list("bob").is_err());
        let ops = auth.caller(&with_token("ops-secret")).unwrap();
        ops.needs_group(&[OPERATOR_GROUP], "see the cluster").unwrap();
        ops.may_list("bob").unwrap();
        assert!(ops.may_act_as("bob").is_err(), "an operator reads no one's data");
    }

    #[test]
    fn unknown_missing_and_malformed_credentials_are_unauthenticated() {
        let auth = Authenticator::new(Some(file()), false);
        for req in [with_token("guess"), Request::new(())] {
            let s = auth.caller(&req).unwrap_err();
            assert_eq!(s.code(), tonic::Code::Unauthenticated);
            assert!(crate::service::is_rejection(&s));
        }
        let mut basic = Request::new(());
        basic.metadata_mut().insert(AUTHORIZATION, "Basic abc".parse().unwrap());
        assert_eq!(auth.caller(&basic).unwrap_err().code(), tonic::Code::Unauthenticated);
        let mut two = with_token("alice-secret");
        two.metadata_mut().append(AUTHORIZATION, "Bearer ops-secret".parse().unwrap());
        assert_eq!(auth.caller(&two).unwrap_err().code(), tonic::Code::Unauthenticated, "two tokens");
        let mut lower = Request::new(());
        lower.metadata_mut().insert(AUTHORIZATION, "bearer alice-secret".parse().unwrap());
        assert!(matches!(auth.caller(&lower), Ok(Caller::Known(id)) if id.name == "alice"));
    }

    #[test]
    fn without_tokens_or_certificates_anyone_may_do_anything() {
        let auth = Authenticator::new(None, false);
        assert!(!auth.authenticates());
        let anyone = auth.caller(&with_token("whatever")).unwrap();
        assert_eq!(anyone, Caller::Anyone);
        anyone.may_act_as("x").unwrap();
        anyone.needs_group(&[NODE_GROUP], "change metadata").unwrap();
    }

    #[test]
    fn a_bad_token_file_line_is_refused_by_number() {
        let cases = [
            ("sha256:abc alice", "line 1", "not a token hash"),
            (&format!("# c\n{}", token_hash("t")), "line 2", "no name"),
            (&format!("{0} a\n{0} b", token_hash("t")), "line 2", "twice"),
            (&format!("{} a g1 g2", token_hash("t")), "line 1", "comma-separated"),
        ];
        for (text, line, what) in cases {
            let e = TokenFile::parse(text).unwrap_err();
            assert!(e.contains(line) && e.contains(what), "{text:?}: {e}");
        }
    }

    #[test]
    fn the_hash_is_sha256_of_the_token() {
        // sha256("abc"), FIPS 180-2 appendix B.1.
        assert_eq!(token_hash("abc"), "sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
        // A line's hash is read in either case and identifies its token only.
        let f = TokenFile::parse(&format!("{} carol", token_hash("abc").to_ascii_uppercase())).unwrap();
        assert_eq!(f.identify("abc").map(|i| i.name.as_str()), Some("carol"));
        assert!(f.identify("abd").is_none() && f.identify("").is_none());
        let t = new_token([7; TOKEN_BYTES]);
        assert!(t.starts_with("attache_") && t.len() == 8 + 2 * TOKEN_BYTES);
        assert!(format!("{:?}", BearerToken::new(&t).unwrap()).contains("redacted"));
        assert!(BearerToken::new(" ").is_err());
    }
}
