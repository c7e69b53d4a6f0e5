//! Page tokens: opaque to clients, and tamper-safe. A token is the position to continue from,
//! signed (HMAC-SHA256, truncated to 128 bits) together with the request it belongs to, so an
//! edited token, or one from another listing, is refused with INVALID_ARGUMENT naming the
//! field. Each service keeps its key in PostgreSQL, made once by a migration, so every replica
//! accepts every other's tokens and tokens survive restarts.

use hmac::{Hmac, Mac};
use merkle_core::digest::{hex, unhex};
use sha2::Sha256;

use tonic::Status;

use crate::error::invalid_argument;

const VERSION: u8 = 1;
const MAC_BYTES: usize = 16;

/// Signs and checks page tokens.
#[derive(Clone)]
pub struct PageTokens {
    key: Vec<u8>,
}

impl PageTokens {
    pub fn new(key: Vec<u8>) -> Self {
        PageTokens { key }
    }

    fn mac(&self, binding: &[u8], position: &[u8]) -> Hmac<Sha256> {
        let mut mac = Hmac::<Sha256>::new_from_slice(&self.key).expect("HMAC takes any key length");
        mac.update(&(binding.len() as u64).to_be_bytes());
        mac.update(binding);
        mac.update(&[VERSION]);
        mac.update(position);
        mac
    }

    /// The token continuing a listing (named by `binding`: the RPC and its request fields)
    /// at `position`.
    pub fn issue(&self, binding: &[u8], position: &[u8]) -> String {
        let tag = self.mac(binding, position).finalize().into_bytes();
        let mut bytes = Vec::with_capacity(1 + position.len() + MAC_BYTES);
        bytes.push(VERSION);
        bytes.extend_from_slice(position);
        bytes.extend_from_slice(&tag[..MAC_BYTES]);
        hex(&bytes)
    }

    /// The position in a token, if it was issued for this listing; empty tokens are `None`.
    pub fn check(
        &self,
        field: &str,
        binding: &[u8],
        token: &str,
    ) -> Result<Option<Vec<u8>>, Status> {
        if token.is_empty() {
            return Ok(None);
        }
        let invalid = || {
            invalid_argument(
                field,
                "is not a page token of this listing (use the next_page_token of the previous page, with the same request)",
            )
        };
        let bytes = unhex(token).ok_or_else(invalid)?;
        if bytes.len() < 1 + MAC_BYTES || bytes[0] != VERSION {
            return Err(invalid());
        }
        let (position, tag) = bytes[1..].split_at(bytes.len() - 1 - MAC_BYTES);
        self.mac(binding, position)
            .verify_truncated_left(tag)
            .map_err(|_| invalid())?;
        Ok(Some(position.to_vec()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_round_trip_and_refuse_tampering_and_other_listings() {
        let tokens = PageTokens::new(vec![7; 32]);
        let token = tokens.issue(b"snapshots/docs", &42u64.to_be_bytes());
        let position = tokens
            .check("page_token", b"snapshots/docs", &token)
            .expect("valid");
        assert_eq!(position, Some(42u64.to_be_bytes().to_vec()));
        assert_eq!(tokens.check("page_token", b"x", "").expect("empty"), None);

        let other = tokens
            .check("page_token", b"snapshots/web", &token)
            .expect_err("other listing");
        assert!(other.message().starts_with("page_token: "), "{other}");
        let mut edited = token.clone().into_bytes();
        edited[3] = if edited[3] == b'0' { b'1' } else { b'0' };
        let edited = String::from_utf8(edited).expect("hex");
        assert!(
            tokens
                .check("page_token", b"snapshots/docs", &edited)
                .is_err()
        );
        for junk in ["zz", "01", "not a token"] {
            assert!(
                tokens.check("page_token", b"snapshots/docs", junk).is_err(),
                "{junk}"
            );
        }
        let other_key = PageTokens::new(vec![8; 32]);
        assert!(
            other_key
                .check("page_token", b"snapshots/docs", &token)
                .is_err()
        );
    }
}
