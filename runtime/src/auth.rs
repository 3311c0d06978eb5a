//! Identities of the `attache` commands (the rules are
//! `attache_actors::auth`): the token file a server reads (`--token-file`
//! of `attache node` and `attache meta`), the token a client sends
//! (`--token-file` of `attache client` and `attache bench`,
//! `--metadata-token-file` of a node), and `attache token`, which makes a
//! token and its token-file line.

use std::io::Write as _;
use std::path::{Path, PathBuf};

use anyhow::Context as _;
use attache_actors::auth::{new_token, token_hash, Authenticator, BearerToken, TokenFile, TOKEN_BYTES};
use clap::Args;

use crate::tls::ServerTls;

/// Reads the token file named by `flag` (see `TokenFile` for its lines).
///
/// Errors: the file cannot be read, or a line is malformed (by number).
pub fn read_token_file(path: &Path, flag: &str) -> anyhow::Result<TokenFile> {
    let text = std::fs::read_to_string(path).with_context(|| format!("{flag} {}: cannot read it", path.display()))?;
    TokenFile::parse(&text).map_err(|e| anyhow::anyhow!("{flag} {}: {e}", path.display()))
}

/// Reads a bearer token from the file named by `flag`: the file holds the
/// token (as `attache token --out` wrote it), surrounding whitespace aside.
///
/// Errors: the file cannot be read, is empty, or holds more than a token.
pub fn read_token(path: &Path, flag: &str) -> anyhow::Result<BearerToken> {
    let text = std::fs::read_to_string(path).with_context(|| format!("{flag} {}: cannot read it", path.display()))?;
    anyhow::ensure!(
        text.split_whitespace().count() <= 1,
        "{flag} {}: holds more than one word; it must hold only the token (is it the server's token file?)",
        path.display()
    );
    BearerToken::new(&text).map_err(|e| anyhow::anyhow!("{flag} {}: {e}", path.display()))
}

/// How a server authenticates: by the tokens of `token_file` and, when its
/// `tls` requires client certificates (a client CA), by their subject.
/// Neither: no authentication (every caller may do everything).
///
/// Errors: the token file cannot be read.
pub fn authenticator(token_file: Option<&Path>, tls: Option<&ServerTls>) -> anyhow::Result<Authenticator> {
    let tokens = token_file.map(|p| read_token_file(p, "--token-file")).transpose()?;
    Ok(Authenticator::new(tokens, tls.is_some_and(|t| t.client_ca_pem.is_some())))
}

/// A server's token flag (`attache meta`; `attache node` has the same key
/// in its config).
#[derive(Args, Clone, Debug, Default)]
pub struct ServerAuthArgs {
    /// Token file: the SHA-256 of each bearer token this server accepts,
    /// with the identity it stands for (`attache token` makes its lines).
    /// With it, or with --tls-client-ca, callers are authenticated.
    #[arg(long, env = "ATTACHE_TOKEN_FILE")]
    pub token_file: Option<PathBuf>,
}

/// A client's token flag (`attache client`, `attache bench`).
#[derive(Args, Clone, Debug, Default)]
pub struct ClientAuthArgs {
    /// A file holding the bearer token to call the nodes with (from
    /// `attache token --out`); its identity is the client id you may use.
    #[arg(long, env = "ATTACHE_CLIENT_TOKEN_FILE")]
    pub token_file: Option<PathBuf>,
}

impl ClientAuthArgs {
    /// The token to send; `None` without `--token-file`.
    ///
    /// Errors: as [`read_token`].
    pub fn load(&self) -> anyhow::Result<Option<BearerToken>> {
        self.token_file.as_deref().map(|p| read_token(p, "--token-file")).transpose()
    }
}

/// `attache token` flags.
#[derive(Args, Clone, Debug)]
pub struct TokenArgs {
    /// The identity the token stands for: the client id its holder may act
    /// as (a node's name for a node).
    pub name: String,
    /// A group of the identity, repeatable: `attache:operator` (may call
    /// ClusterStatus and list any client's shards), `attache:node` (a
    /// storage node, the only callers the metadata store serves).
    #[arg(long = "group")]
    pub groups: Vec<String>,
    /// Where to write the token (created with mode 0600; never
    /// overwritten). The token file line goes to stdout.
    #[arg(long)]
    pub out: PathBuf,
}

/// Runs `attache token`: a new random token written to `--out`, and its
/// token-file line (hash, name, groups) printed, to append to the servers'
/// token files.
///
/// Errors: a name or group with whitespace, a comma in a group, or `--out`
/// exists or cannot be written.
pub fn run_token(args: TokenArgs) -> anyhow::Result<()> {
    let line = token_line(&args.name, &args.groups, &write_new_token(&args.out)?)?;
    println!("{line}");
    Ok(())
}

/// The token-file line of `token` for `name` and `groups`.
///
/// Errors: a name or group with whitespace or a control character, an
/// empty name, a comma in a group.
fn token_line(name: &str, groups: &[String], token: &str) -> anyhow::Result<String> {
    let bad = |s: &str| s.is_empty() || s.chars().any(|c| c.is_whitespace() || c.is_control());
    anyhow::ensure!(!bad(name), "the name {name:?} is empty or holds whitespace");
    for g in groups {
        anyhow::ensure!(!bad(g) && !g.contains(','), "the group {g:?} is empty or holds whitespace or a comma");
    }
    let mut line = format!("{} {name}", token_hash(token));
    if !groups.is_empty() {
        line = format!("{line} {}", groups.join(","));
    }
    // The line must read back as what it says.
    let parsed = TokenFile::parse(&line).map_err(anyhow::Error::msg)?;
    anyhow::ensure!(parsed.identify(token).is_some_and(|id| id.name == name), "token line does not read back");
    Ok(line)
}

/// Writes a new token to `out` (mode 0600, refusing an existing file) and
/// returns it. The randomness is the operating system's (`rand::rngs::OsRng`).
fn write_new_token(out: &Path) -> anyhow::Result<String> {
    use rand::TryRngCore as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let mut random = [0u8; TOKEN_BYTES];
    rand::rngs::OsRng.try_fill_bytes(&mut random).context("the operating system gave no random bytes")?;
    let token = new_token(random);
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(out)
        .with_context(|| format!("--out {}: cannot create it (it must not exist yet)", out.display()))?;
    file.write_all(format!("{token}\n").as_bytes())
        .and_then(|()| file.sync_all())
        .with_context(|| format!("--out {}: cannot write it", out.display()))?;
    Ok(token)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_new_token_reads_back_and_its_line_identifies_it() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("alice.token");
        let token = write_new_token(&out).unwrap();
        use std::os::unix::fs::PermissionsExt as _;
        assert_eq!(std::fs::metadata(&out).unwrap().permissions().mode() & 0o777, 0o600);
        assert!(write_new_token(&out).is_err(), "an existing token file is never overwritten");
        assert!(read_token(&out, "--token-file").unwrap().is_set());
        let line = token_line("alice", &["attache:operator".into()], &token).unwrap();
        assert!(!line.contains(&token), "the line holds the hash, not the token");
        let file = dir.path().join("tokens");
        std::fs::write(&file, format!("# servers' tokens\n{line}\n")).unwrap();
        let tokens = read_token_file(&file, "--token-file").unwrap();
        let id = tokens.identify(&token).unwrap();
        assert_eq!((id.name.as_str(), id.groups.as_slice()), ("alice", &["attache:operator".to_string()][..]));
        assert!(token_line("two words", &[], &token).is_err());
        assert!(token_line("bob", &["a,b".into()], &token).is_err());
    }

    /// A self-signed certificate whose subject has the CN `cn` and the O
    /// `org`, when given, DER. (rcgen keeps one value per attribute type,
    /// so a subject with two CNs cannot be made here.)
    fn certificate(cn: Option<&str>, org: Option<&str>) -> Vec<u8> {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name = rcgen::DistinguishedName::new();
        if let Some(cn) = cn {
            params.distinguished_name.push(rcgen::DnType::CommonName, cn);
        }
        if let Some(org) = org {
            params.distinguished_name.push(rcgen::DnType::OrganizationName, org);
        }
        let key = rcgen::KeyPair::generate().unwrap();
        params.self_signed(&key).unwrap().der().to_vec()
    }

    #[test]
    fn a_certificate_names_its_holder_by_its_cn_and_groups_by_its_o() {
        use attache_actors::auth::subject_identity;
        let id = subject_identity(&certificate(Some("node-1"), Some("attache:node"))).unwrap();
        assert_eq!((id.name.as_str(), id.groups.as_slice()), ("node-1", &["attache:node".to_string()][..]));
        let id = subject_identity(&certificate(Some("alice"), None)).unwrap();
        assert!(id.groups.is_empty());
        let e = subject_identity(&certificate(None, Some("attache:node"))).unwrap_err();
        assert!(e.contains("0 common names"), "{e}");
        assert!(subject_identity(b"not a certificate").is_err());
    }

    #[test]
    fn a_token_file_given_as_a_client_token_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("tokens");
        std::fs::write(&file, format!("{} alice\n", token_hash("x"))).unwrap();
        let e = read_token(&file, "--token-file").unwrap_err().to_string();
        assert!(e.contains("more than one word"), "{e}");
        let e = read_token_file(&dir.path().join("missing"), "--token-file").unwrap_err().to_string();
        assert!(e.contains("cannot read"), "{e}");
    }
}
