//! The one place that knows the binary encoding of stored records and
//! persisted state: bincode 2 (standard config) over serde, and the framing
//! (length + CRC32) of logs that may end in a torn append.
//!
//! bincode is pinned to 2.x in the workspace: 3.0.0 on crates.io does not
//! compile. Everything encoded here is versioned by its caller (a tag byte or
//! a versioned struct), so the codec can change behind this module.

use serde::de::DeserializeOwned;
use serde::Serialize;

/// Encodes `value` to bytes. Encoding plain data cannot fail; a failure is a bug.
pub fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    bincode::serde::encode_to_vec(value, bincode::config::standard()).expect("bincode encodes plain data")
}

/// Decodes a `T` from exactly `bytes`.
///
/// Errors: a message naming `what` when the bytes are not a valid `T` or have
/// bytes left over.
pub fn decode<T: DeserializeOwned>(bytes: &[u8], what: &str) -> Result<T, String> {
    let (value, used) = bincode::serde::decode_from_slice(bytes, bincode::config::standard())
        .map_err(|e| format!("cannot decode {what}: {e}"))?;
    if used != bytes.len() {
        return Err(format!("cannot decode {what}: {} trailing bytes", bytes.len() - used));
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
