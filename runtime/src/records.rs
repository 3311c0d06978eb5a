//! Record files for `attache client load` and `dump`.
//!
//! - TSV (`tsv`): one `key<TAB>value` per line, bytes as they are: the key is
//!   everything before the first tab, the value everything after it. A record
//!   whose key holds a tab or newline, or whose value holds a newline, cannot
//!   be written this way; `dump` says so and names the escaped formats.
//! - Escaped TSV (`tsv-escaped`, like PostgreSQL's COPY text format): in keys
//!   and values `\` is written `\\`, tab `\t`, newline `\n`, carriage return
//!   `\r`, and a byte that is not part of valid UTF-8 `\xNN`; any bytes
//!   round-trip.
//! - JSON lines: one object per line, `{"key": "...", "value": "..."}` for
//!   UTF-8 data, `key_base64` / `value_base64` (standard alphabet) otherwise.

use base64::Engine as _;
use clap::ValueEnum;
use serde::{Deserialize, Serialize};

/// A record file format.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Format {
    /// `key<TAB>value` lines, bytes as they are.
    Tsv,
    /// `key<TAB>value` lines with backslash escapes.
    TsvEscaped,
    /// One JSON object per line.
    Jsonl,
}

impl Format {
    /// The format a file name suggests: `.jsonl`/`.json`/`.ndjson` are JSON lines, anything else TSV.
    pub fn from_path(path: &std::path::Path) -> Format {
        match path.extension().and_then(|e| e.to_str()) {
            Some("jsonl" | "json" | "ndjson") => Format::Jsonl,
            _ => Format::Tsv,
        }
    }
}

fn escape(bytes: &[u8], out: &mut String) {
    for chunk in bytes.utf8_chunks() {
        for c in chunk.valid().chars() {
            match c {
                '\\' => out.push_str("\\\\"),
                '\t' => out.push_str("\\t"),
                '\n' => out.push_str("\\n"),
                '\r' => out.push_str("\\r"),
                c => out.push(c),
            }
        }
        for b in chunk.invalid() {
            out.push_str(&format!("\\x{b:02x}"));
        }
    }
}

fn unescape(field: &str) -> Result<Vec<u8>, String> {
    let mut out = Vec::with_capacity(field.len());
    let mut chars = field.char_indices();
    while let Some((i, c)) = chars.next() {
        if c != '\\' {
            let mut buf = [0; 4];
            out.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
            continue;
        }
        match chars.next() {
            Some((_, '\\')) => out.push(b'\\'),
            Some((_, 't')) => out.push(b'\t'),
            Some((_, 'n')) => out.push(b'\n'),
            Some((_, 'r')) => out.push(b'\r'),
            Some((_, 'x')) => {
                let hex: String = chars.by_ref().take(2).map(|(_, c)| c).collect();
                let byte =
                    u8::from_str_radix(&hex, 16).map_err(|_| format!("bad escape \\x{hex} at column {}", i + 1))?;
                out.push(byte);
            }
            Some((_, c)) => return Err(format!("unknown escape \\{c} at column {}", i + 1)),
            None => return Err("line ends with a lone backslash".into()),
        }
    }
    Ok(out)
}

#[derive(Serialize, Deserialize, Default)]
struct JsonRecord {
    #[serde(skip_serializing_if = "Option::is_none")]
    key: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    key_base64: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    value: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    value_base64: Option<String>,
}

fn b64() -> base64::engine::GeneralPurpose {
    base64::engine::general_purpose::STANDARD
}

fn json_field(text: Option<String>, b64_text: Option<String>, what: &str) -> Result<Vec<u8>, String> {
    match (text, b64_text) {
        (Some(t), None) => Ok(t.into_bytes()),
        (None, Some(b)) => b64().decode(b).map_err(|e| format!("{what}_base64 is not base64: {e}")),
        (None, None) => Err(format!("missing \"{what}\" (or \"{what}_base64\")")),
        (Some(_), Some(_)) => Err(format!("give \"{what}\" or \"{what}_base64\", not both")),
    }
}

/// Parses one line (without its newline) into (key, value).
///
/// Errors: a message saying what is wrong with the line.
pub fn parse_line(format: Format, line: &[u8]) -> Result<(Vec<u8>, Vec<u8>), String> {
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    match format {
        Format::Tsv => {
            let tab = line.iter().position(|&b| b == b'\t').ok_or("no tab between key and value")?;
            Ok((line[..tab].to_vec(), line[tab + 1..].to_vec()))
        }
        Format::TsvEscaped => {
            let line = std::str::from_utf8(line).map_err(|e| format!("escaped TSV must be UTF-8: {e}"))?;
            let (k, v) = line.split_once('\t').ok_or("no tab between key and value")?;
            Ok((unescape(k)?, unescape(v)?))
        }
        Format::Jsonl => {
            let r: JsonRecord = serde_json::from_slice(line).map_err(|e| format!("not a JSON record: {e}"))?;
            Ok((json_field(r.key, r.key_base64, "key")?, json_field(r.value, r.value_base64, "value")?))
        }
    }
}

/// Formats one record as a line (without its newline).
///
/// Errors: for `tsv`, a key with a tab or newline, or a value with a newline
/// or ending in a carriage return, which that format cannot hold.
pub fn format_line(format: Format, key: &[u8], value: &[u8]) -> Result<Vec<u8>, String> {
    match format {
        Format::Tsv => {
            if key.contains(&b'\t') || key.contains(&b'\n') || value.contains(&b'\n') || value.ends_with(b"\r") {
                return Err(format!(
                    "record {} holds a tab or line break that plain TSV cannot hold: use --format tsv-escaped or jsonl",
                    escaped(key)
                ));
            }
            let mut out = Vec::with_capacity(key.len() + value.len() + 1);
            out.extend_from_slice(key);
            out.push(b'\t');
            out.extend_from_slice(value);
            Ok(out)
        }
        Format::TsvEscaped => {
            let mut out = String::with_capacity(key.len() + value.len() + 1);
            escape(key, &mut out);
            out.push('\t');
            escape(value, &mut out);
            Ok(out.into_bytes())
        }
        Format::Jsonl => {
            let mut r = JsonRecord::default();
            match std::str::from_utf8(key) {
                Ok(k) => r.key = Some(k.to_string()),
                Err(_) => r.key_base64 = Some(b64().encode(key)),
            }
            match std::str::from_utf8(value) {
                Ok(v) => r.value = Some(v.to_string()),
                Err(_) => r.value_base64 = Some(b64().encode(value)),
            }
            Ok(serde_json::to_vec(&r).expect("records serialize"))
        }
    }
}

/// `bytes` with the escapes of `tsv-escaped`, for messages and terminal output.
pub fn escaped(bytes: &[u8]) -> String {
    let mut out = String::new();
    escape(bytes, &mut out);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn any_bytes_round_trip(key in proptest::collection::vec(any::<u8>(), 1..40),
                                value in proptest::collection::vec(any::<u8>(), 0..80)) {
            for f in [Format::Tsv, Format::TsvEscaped, Format::Jsonl] {
                match format_line(f, &key, &value) {
                    Ok(line) => {
                        prop_assert!(!line.contains(&b'\n'));
                        prop_assert_eq!(parse_line(f, &line).unwrap(), (key.clone(), value.clone()));
                    }
                    Err(e) => prop_assert!(f == Format::Tsv && e.contains("tsv-escaped"), "{f:?}: {e}"),
                }
            }
        }
    }

    fn fuzz_cases() -> u32 {
        std::env::var("ATTACHE_FUZZ_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(2_000)
    }

    /// A line to parse: random bytes, or a valid line of some format with
    /// one byte changed and maybe cut short (inputs near the valid ones
    /// reach deeper than random bytes do).
    fn line() -> impl Strategy<Value = Vec<u8>> {
        let bytes = |n| proptest::collection::vec(any::<u8>(), 0..n);
        prop_oneof![
            bytes(120),
            (bytes(20), bytes(40), 0usize..3, any::<usize>(), any::<u8>(), any::<usize>()).prop_map(
                |(key, value, f, at, byte, cut)| {
                    let f = [Format::Tsv, Format::TsvEscaped, Format::Jsonl][f];
                    let mut line = format_line(f, &key, &value).unwrap_or_default();
                    if !line.is_empty() {
                        let at = at % line.len();
                        line[at] = byte;
                        line.truncate(cut % (line.len() + 1));
                    }
                    line
                }
            ),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(fuzz_cases()))]

        /// Fuzzing of `load`'s record parsers: any line parses or is
        /// refused with a message; none panics.
        #[test]
        fn any_line_parses_or_says_why(line in line()) {
            for f in [Format::Tsv, Format::TsvEscaped, Format::Jsonl] {
                if let Err(e) = parse_line(f, &line) {
                    prop_assert!(!e.is_empty());
                }
            }
        }
    }

    #[test]
    fn bad_lines_say_what_is_wrong() {
        assert!(parse_line(Format::Tsv, b"no-tab").unwrap_err().contains("no tab"));
        assert!(parse_line(Format::TsvEscaped, b"a\\q\tb").unwrap_err().contains("unknown escape"));
        assert!(parse_line(Format::Jsonl, br#"{"key":"a"}"#).unwrap_err().contains("value"));
        assert_eq!(parse_line(Format::Jsonl, br#"{"key":"a","value":"b"}"#).unwrap(), (b"a".to_vec(), b"b".to_vec()));
    }

    #[test]
    fn plain_tsv_keeps_backslashes_and_escaped_tsv_reads_them() {
        let line = b"/lib/systemd/system-systemd\\x2dcryptsetup.slice\tsystemd";
        assert_eq!(parse_line(Format::Tsv, line).unwrap().0, b"/lib/systemd/system-systemd\\x2dcryptsetup.slice");
        assert_eq!(parse_line(Format::TsvEscaped, line).unwrap().0, b"/lib/systemd/system-systemd-cryptsetup.slice");
        assert_eq!(parse_line(Format::Tsv, b"k\tv\tw\r").unwrap(), (b"k".to_vec(), b"v\tw".to_vec()));
        assert!(format_line(Format::Tsv, b"k", b"a\nb").unwrap_err().contains("tsv-escaped"));
    }
}
