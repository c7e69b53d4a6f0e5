//! Sealed cache values: what a service writes into the cache carries an HMAC-SHA256 tag under a
//! key of that service's own, so a value it reads back is one it wrote. Anyone who can write to
//! Redis (or call the Cache service with stolen credentials) can delete or replay values, but
//! cannot make a service accept a value it never wrote.
//!
//! A sealed value is `0x01 || key_id (8 bytes) || tag (32 bytes) || message`, where
//! `key_id = SHA-256(key)[..8]` and
//! `tag = HMAC-SHA256(key, "merkle-cache-seal-v1" || u32be(namespace) || u32be(len(cache key))
//! || cache key || message)`: the tag binds the value to its namespace and key, so a genuine
//! value cannot be moved to another key either.

use hmac::{Hmac, Mac as _};
use sha2::{Digest as _, Sha256};

/// The first byte of a sealed value (the format's version).
const VERSION: u8 = 0x01;
const DOMAIN: &[u8] = b"merkle-cache-seal-v1";
const KEY_ID_LEN: usize = 8;
const TAG_LEN: usize = 32;
/// Bytes a seal adds in front of the message.
pub const OVERHEAD: usize = 1 + KEY_ID_LEN + TAG_LEN;

/// Why a cached value was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    /// Not a sealed value at all, or sealed under this key with a tag that does not match: a
    /// value this service never wrote.
    #[error("the value is not sealed by this service's key (forged or altered)")]
    Forged,
    /// Sealed under another key: a replica with a key of its own (expected only where
    /// `Seal::shared` is false).
    #[error("the value is sealed under another key")]
    ForeignKey,
}

/// The key a service seals its cache values with.
#[derive(Clone)]
pub struct Seal {
    key: [u8; 32],
    key_id: [u8; KEY_ID_LEN],
    /// True when every replica of the service holds this key: a value under another key id is
    /// then as forged as a bad tag.
    shared: bool,
}

impl std::fmt::Debug for Seal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the key.
        f.debug_struct("Seal")
            .field("key_id", &merkle_core::digest::hex(&self.key_id))
            .field("shared", &self.shared)
            .finish()
    }
}

impl Seal {
    /// A seal whose key is derived from `secret` (for example a secret the service's replicas
    /// share in PostgreSQL) and `purpose`, so one secret can serve several uses.
    pub fn derived(secret: &[u8], purpose: &str) -> Seal {
        let mut mac = <Hmac<Sha256>>::new_from_slice(secret).expect("HMAC takes any key length");
        mac.update(b"merkle-mesh key derivation\0");
        mac.update(purpose.as_bytes());
        Seal::from_key(mac.finalize().into_bytes().into(), true)
    }

    /// A random key of this process alone: its values are readable by no other replica, which
    /// reads them as misses (never as forgeries).
    pub fn random() -> Seal {
        let mut key = [0; 32];
        rustls::crypto::ring::default_provider()
            .secure_random
            .fill(&mut key)
            .expect("the system's random number generator works");
        Seal::from_key(key, false)
    }

    fn from_key(key: [u8; 32], shared: bool) -> Seal {
        let digest = Sha256::digest(key);
        let mut key_id = [0; KEY_ID_LEN];
        key_id.copy_from_slice(&digest[..KEY_ID_LEN]);
        Seal {
            key,
            key_id,
            shared,
        }
    }

    fn tag(&self, namespace: i32, cache_key: &str, message: &[u8]) -> Hmac<Sha256> {
        let mut mac = <Hmac<Sha256>>::new_from_slice(&self.key).expect("HMAC takes any key length");
        mac.update(DOMAIN);
        mac.update(&(namespace as u32).to_be_bytes());
        mac.update(&(cache_key.len() as u32).to_be_bytes());
        mac.update(cache_key.as_bytes());
        mac.update(message);
        mac
    }

    /// `message`, sealed for `namespace` and `cache_key`.
    pub fn seal(&self, namespace: i32, cache_key: &str, message: &[u8]) -> Vec<u8> {
        let tag = self
            .tag(namespace, cache_key, message)
            .finalize()
            .into_bytes();
        let mut sealed = Vec::with_capacity(OVERHEAD + message.len());
        sealed.push(VERSION);
        sealed.extend_from_slice(&self.key_id);
        sealed.extend_from_slice(&tag);
        sealed.extend_from_slice(message);
        sealed
    }

    /// The message inside `sealed`, when this service sealed it for `namespace` and
    /// `cache_key` (the tag is compared in constant time).
    pub fn open<'a>(
        &self,
        namespace: i32,
        cache_key: &str,
        sealed: &'a [u8],
    ) -> Result<&'a [u8], Refused> {
        if sealed.len() < OVERHEAD || sealed[0] != VERSION {
            return Err(Refused::Forged);
        }
        let (key_id, rest) = sealed[1..].split_at(KEY_ID_LEN);
        let (tag, message) = rest.split_at(TAG_LEN);
        if key_id != self.key_id {
            return Err(if self.shared {
                Refused::Forged
            } else {
                Refused::ForeignKey
            });
        }
        self.tag(namespace, cache_key, message)
            .verify_slice(tag)
            .map_err(|_| Refused::Forged)?;
        Ok(message)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sealed_value_opens_under_its_namespace_and_key_only() {
        let seal = Seal::derived(b"secret", "cache");
        let sealed = seal.seal(1, "docs", b"snapshot");
        assert_eq!(seal.open(1, "docs", &sealed), Ok(&b"snapshot"[..]));
        assert_eq!(seal.open(1, "etc", &sealed), Err(Refused::Forged));
        assert_eq!(seal.open(2, "docs", &sealed), Err(Refused::Forged));
    }

    #[test]
    fn altered_unsealed_and_foreign_values_are_refused() {
        let seal = Seal::derived(b"secret", "cache");
        let mut sealed = seal.seal(1, "docs", b"snapshot");
        *sealed.last_mut().expect("bytes") ^= 1;
        assert_eq!(seal.open(1, "docs", &sealed), Err(Refused::Forged));
        assert_eq!(seal.open(1, "docs", b"snapshot"), Err(Refused::Forged));
        assert_eq!(seal.open(1, "docs", b""), Err(Refused::Forged));

        let other = Seal::derived(b"another secret", "cache");
        let theirs = other.seal(1, "docs", b"snapshot");
        assert_eq!(seal.open(1, "docs", &theirs), Err(Refused::Forged));
        // Replicas with keys of their own read each other's values as foreign, not forged.
        let mine = Seal::random();
        assert_eq!(
            mine.open(1, "docs", &Seal::random().seal(1, "docs", b"x")),
            Err(Refused::ForeignKey)
        );
    }

    #[test]
    fn derivation_separates_purposes() {
        let a = Seal::derived(b"secret", "cache");
        let b = Seal::derived(b"secret", "other");
        assert_ne!(a.key_id, b.key_id);
        assert!(!format!("{a:?}").contains("key:"));
    }
}
