//! The one place that knows the binary encoding of stored records and
//! persisted state: a format byte, then postcard 1 over serde, and the
//! framing (length + CRC32) of logs that may end in a torn append.
//!
//! postcard's wire format is specified (postcard.jamesmunns.com, "Wire
//! format") and stable across its 1.x releases: varint integers, length-
//! prefixed sequences, enums as a varint variant index. What is encoded here
//! is versioned twice: by its caller (a tag byte or a versioned struct), and
//! by [`FORMAT`], the first byte of everything [`encode`] writes, which
//! names the codec. Builds before the format byte wrote bincode 2 with no
//! such byte; [`decode`] refuses their data by name (see [`FORMAT`]) rather
//! than misread it. A new codec gets a new byte, and `decode` may then read
//! both.

use serde::de::DeserializeOwned;
use serde::Serialize;

/// The first byte of every value [`encode`] writes: postcard 1, this
/// module's format 2. Format 1 (bincode 2, standard config) had no format
/// byte: its values begin with a varint, for our types a small one (shard
/// meta's version 1, a log record's variant index), so format 1 data does
/// not begin with this byte. The one exception is a list of exactly 193
/// index entries, which the default `max_indexes_per_put` (16) rules out;
/// and a shard's meta, refused first, is read before any of its records.
///
/// No downgrade: a build before the format byte treats a log record it
/// cannot decode as a torn tail and drops it, so starting one on a metadata
/// log this build wrote would start an empty store over it.
pub const FORMAT: u8 = 0xc1;

/// Encodes `value` to bytes: [`FORMAT`], then postcard. Encoding plain data
/// cannot fail; a failure is a bug.
pub fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    postcard::to_extend(value, vec![FORMAT]).expect("postcard encodes plain data")
}

/// Decodes a `T` from exactly `bytes`, as [`encode`] wrote it.
///
/// Errors: a message naming `what` when the bytes do not begin with
/// [`FORMAT`] (data of an older build, or damage), are not a valid `T`, or
/// have bytes left over.
pub fn decode<T: DeserializeOwned>(bytes: &[u8], what: &str) -> Result<T, String> {
    let body = match bytes.split_first() {
        Some((&FORMAT, body)) => body,
        Some((first, _)) => {
            return Err(format!(
                "cannot decode {what}: it begins with byte 0x{first:02x}, not 0x{FORMAT:02x}, the format byte of \
                 this build: it was written by an older build of Attaché (bincode, before format bytes), which \
                 this one does not read, or it is damaged"
            ))
        }
        None => return Err(format!("cannot decode {what}: no bytes")),
    };
    let (value, rest) = postcard::take_from_bytes(body).map_err(|e| format!("cannot decode {what}: {e}"))?;
    if !rest.is_empty() {
        return Err(format!("cannot decode {what}: {} trailing bytes", rest.len()));
    }
    Ok(value)
}

/// Appends `payload` to `out` as one frame: `u32be len ++ u32be crc32 ++ payload`.
/// `payload` is never empty (every record encodes to at least one byte):
/// an empty frame would read like zeros (see [`frames`]).
pub fn frame(out: &mut Vec<u8>, payload: &[u8]) {
    debug_assert!(!payload.is_empty(), "an empty frame reads as the end of a log");
    out.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    out.extend_from_slice(&crc32fast::hash(payload).to_be_bytes());
    out.extend_from_slice(payload);
}

/// Splits `bytes` into frame payloads, stopping at the first incomplete or
/// corrupt frame (a torn append) or at an empty one: a file that grew in a
/// crash before its new blocks were written reads as zeros there, and eight
/// zero bytes would otherwise pass as a frame (length 0, and the CRC32 of
/// nothing is 0). Returns the payloads and the length of the valid prefix
/// of `bytes`.
pub fn frames(bytes: &[u8]) -> (Vec<&[u8]>, usize) {
    let mut out = Vec::new();
    let mut at = 0;
    while bytes.len() - at >= 8 {
        let len = u32::from_be_bytes(bytes[at..at + 4].try_into().expect("4 bytes")) as usize;
        let crc = u32::from_be_bytes(bytes[at + 4..at + 8].try_into().expect("4 bytes"));
        if len == 0 {
            break;
        }
        let Some(payload) = bytes.get(at + 8..at + 8 + len) else { break };
        if crc32fast::hash(payload) != crc {
            break;
        }
        out.push(payload);
        at += 8 + len;
    }
    (out, at)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_trailing_bytes() {
        let v = (7u64, "x".to_string(), vec![1u8, 2, 3]);
        let bytes = encode(&v);
        assert_eq!(decode::<(u64, String, Vec<u8>)>(&bytes, "t").unwrap(), v);
        let mut longer = bytes.clone();
        longer.push(0);
        assert!(decode::<(u64, String, Vec<u8>)>(&longer, "t").unwrap_err().contains("trailing"));
        assert!(decode::<(u64, String, Vec<u8>)>(&bytes[..2], "t").is_err());
        assert_eq!(bytes[0], FORMAT);
        assert!(decode::<(u64, String, Vec<u8>)>(&[], "t").unwrap_err().contains("no bytes"));
    }

    /// Shard meta as the previous build wrote it (bincode 2, no format
    /// byte: `ShardMeta::new(7, "c", 1000)`, captured from that build) is
    /// refused with a message that says why, not misread.
    #[test]
    fn data_of_the_previous_format_is_refused_by_name() {
        let old = [0x01, 0x07, 0x01, 0x63, 0x00, 0xfb, 0xe8, 0x03, 0x00, 0x00];
        let e = crate::shard::layout::ShardMeta::decode(&old).unwrap_err().to_string();
        assert!(e.contains("older build of Attaché") && e.contains("0x01"), "{e}");
        let now = crate::shard::layout::ShardMeta::new(7, "c".into(), 1000);
        assert_eq!(crate::shard::layout::ShardMeta::decode(&now.encode()).unwrap(), now);
    }

    #[test]
    fn frames_stop_at_a_torn_or_corrupt_frame() {
        let mut log = Vec::new();
        frame(&mut log, b"one");
        frame(&mut log, b"two");
        let whole = log.len();
        assert_eq!(frames(&log), (vec![&b"one"[..], b"two"], whole));
        assert_eq!(frames(&log[..whole - 1]), (vec![&b"one"[..]], 11));
        log[whole - 1] ^= 1;
        assert_eq!(frames(&log).1, 11);
    }

    /// A tail of zeros (a file that grew before its blocks were written)
    /// ends the log; it is not read as empty records.
    #[test]
    fn a_zeroed_tail_ends_the_log() {
        let mut log = Vec::new();
        frame(&mut log, b"one");
        let valid = log.len();
        log.extend_from_slice(&[0; 64]);
        assert_eq!(frames(&log), (vec![&b"one"[..]], valid));
        assert_eq!(frames(&[0; 8]), (vec![], 0));
    }
}
