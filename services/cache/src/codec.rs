//! How values are stored: a one-byte header, then the caller's bytes, plain or compressed with
//! LZ4 (block format, decompressed size first). Values over the threshold are compressed when
//! that makes them smaller; the header lets both kinds coexist, so changing the threshold
//! never makes a stored value unreadable.

use crate::keys::MAX_VALUE_BYTES;

/// The header of a value stored as it is.
const PLAIN: u8 = 0;
/// The header of an LZ4-compressed value.
const LZ4: u8 = 1;

/// Why stored bytes could not be read back.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CodecError {
    #[error("the stored value is empty (no header byte)")]
    Empty,
    #[error("unknown value header {0:#04x}")]
    UnknownHeader(u8),
    #[error("compressed value is corrupt: {0}")]
    Corrupt(String),
}

/// Encodes `value` for Redis: compressed when it is over `threshold` bytes (0: never) and
/// compression makes it smaller.
pub fn encode(value: &[u8], threshold: usize) -> Vec<u8> {
    if threshold > 0 && value.len() > threshold {
        let compressed = lz4_flex::block::compress_prepend_size(value);
        if compressed.len() < value.len() {
            let mut stored = Vec::with_capacity(1 + compressed.len());
            stored.push(LZ4);
            stored.extend_from_slice(&compressed);
            return stored;
        }
    }
    let mut stored = Vec::with_capacity(1 + value.len());
    stored.push(PLAIN);
    stored.extend_from_slice(value);
    stored
}

/// Decodes bytes read from Redis back into the caller's value.
pub fn decode(stored: &[u8]) -> Result<Vec<u8>, CodecError> {
    let (&header, body) = stored.split_first().ok_or(CodecError::Empty)?;
    match header {
        PLAIN => Ok(body.to_vec()),
        LZ4 => {
            // The size comes first: refuse a corrupt one before allocating it.
            let size = body
                .get(..4)
                .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize)
                .ok_or_else(|| CodecError::Corrupt("shorter than its size field".into()))?;
            if size > MAX_VALUE_BYTES {
                return Err(CodecError::Corrupt(format!(
                    "claims {size} bytes, over the value limit"
                )));
            }
            lz4_flex::block::decompress_size_prepended(body)
                .map_err(|e| CodecError::Corrupt(e.to_string()))
        }
        other => Err(CodecError::UnknownHeader(other)),
    }
}

/// True when `stored` holds a compressed value (for tests and statistics).
pub fn is_compressed(stored: &[u8]) -> bool {
    stored.first() == Some(&LZ4)
}

#[cfg(test)]
mod tests {
    use super::*;

    proptest::proptest! {
        /// What Redis holds is untrusted: any bytes decode to a value or an error, never a
        /// panic or an allocation larger than a value may be; what was encoded decodes back.
        #[test]
        fn any_stored_bytes_decode_safely(
            stored in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..2048),
            value in proptest::collection::vec(0u8..4, 0..4096),
        ) {
            if let Ok(decoded) = decode(&stored) {
                proptest::prop_assert!(decoded.len() <= MAX_VALUE_BYTES);
            }
            proptest::prop_assert_eq!(decode(&encode(&value, 64)).expect("round trip"), value);
        }
    }

    fn compressible(len: usize) -> Vec<u8> {
        (0..len).map(|i| b"merkle mesh "[i % 12]).collect()
    }

    #[test]
    fn values_at_the_threshold_boundary_round_trip() {
        for len in [0, 1, 1023, 1024, 1025, 64 * 1024, MAX_VALUE_BYTES] {
            let value = compressible(len);
            let stored = encode(&value, 1024);
            assert_eq!(is_compressed(&stored), len > 1024, "length {len}");
            assert_eq!(decode(&stored).expect("decodes"), value, "length {len}");
        }
    }

    #[test]
    fn incompressible_values_stay_plain() {
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let value: Vec<u8> = (0..4096)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        let stored = encode(&value, 1024);
        assert!(!is_compressed(&stored));
        assert_eq!(decode(&stored).expect("decodes"), value);
    }

    #[test]
    fn a_zero_threshold_never_compresses() {
        assert!(!is_compressed(&encode(&compressible(10_000), 0)));
    }

    #[test]
    fn bad_stored_bytes_are_errors_not_panics() {
        assert_eq!(decode(b""), Err(CodecError::Empty));
        assert_eq!(decode(&[7, 1, 2]), Err(CodecError::UnknownHeader(7)));
        assert!(matches!(decode(&[LZ4, 1]), Err(CodecError::Corrupt(_))));
        let huge = [LZ4, 0xff, 0xff, 0xff, 0x7f, 0];
        assert!(matches!(decode(&huge), Err(CodecError::Corrupt(_))));
        let mut stored = encode(&compressible(5000), 1024);
        stored.truncate(stored.len() / 2);
        assert!(matches!(decode(&stored), Err(CodecError::Corrupt(_))));
    }
}
