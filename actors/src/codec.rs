//! The one place that knows the binary encoding of stored records and
//! persisted state: bincode 2 (standard config) over serde.
//!
//! bincode is pinned to 2.x in the workspace: 3.0.0 on crates.io does not
//! compile. Everything encoded here is versioned by its caller (a tag byte or
//! a versioned struct), so the codec can change behind this module.

use serde::de::DeserializeOwned;
use serde::Serialize;

/// Encodes `value` to bytes. Encoding plain data cannot fail; a failure is a bug.
pub fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    bincode::serde::encode_to_vec(value, bincode::config::standard())
        .expect("bincode encodes plain data")
}

/// Decodes a `T` from exactly `bytes`.
///
/// Errors: a message naming `what` when the bytes are not a valid `T` or have
/// bytes left over.
pub fn decode<T: DeserializeOwned>(bytes: &[u8], what: &str) -> Result<T, String> {
    let (value, used) = bincode::serde::decode_from_slice(bytes, bincode::config::standard())
        .map_err(|e| format!("cannot decode {what}: {e}"))?;
    if used != bytes.len() {
        return Err(format!(
            "cannot decode {what}: {} trailing bytes",
            bytes.len() - used
        ));
    }
    Ok(value)
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
        assert!(decode::<(u64, String, Vec<u8>)>(&longer, "t")
            .unwrap_err()
            .contains("trailing"));
        assert!(decode::<(u64, String, Vec<u8>)>(&bytes[..2], "t").is_err());
    }
}
