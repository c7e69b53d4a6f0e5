//! C2SP tlog-cosignature (v1): a witness's Ed25519 signature over a log's checkpoint and the
//! time it signed, as a signed-note signature line. The key id is signed-note's with signature
//! type 0x04: the first 4 bytes of `SHA-256(name || 0x0A || 0x04 || public key)`; the line's
//! signature is `key id || u64be(time) || Ed25519(message)`, where the message is
//! `cosignature/v1\ntime <time>\n` followed by the checkpoint's text.

use base64::{Engine as _, engine::general_purpose::STANDARD};
use ed25519_dalek::{Signer as _, SigningKey, Verifier as _, VerifyingKey};
use sha2::{Digest as _, Sha256};

/// The signature type of a cosignature key.
pub const SIGNATURE_TYPE: u8 = 0x04;

/// Why a cosignature line or key was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CosignatureError {
    #[error("not a cosignature key (name+id+base64(0x04 || key)): {0}")]
    BadKey(String),
    #[error("not a signature line of {0}")]
    NotThisWitness(String),
    #[error("the cosignature of {0} does not verify")]
    Invalid(String),
}

/// A witness's key id.
pub fn key_id(name: &str, key: &VerifyingKey) -> u32 {
    let mut hasher = Sha256::new();
    hasher.update(name.as_bytes());
    hasher.update([b'\n', SIGNATURE_TYPE]);
    hasher.update(key.as_bytes());
    let digest = hasher.finalize();
    u32::from_be_bytes([digest[0], digest[1], digest[2], digest[3]])
}

/// The witness's verifier key as signed-note writes keys: `name+<id, 8 hex>+base64(0x04 || key)`.
pub fn verifier_key(name: &str, key: &VerifyingKey) -> String {
    let mut bytes = vec![SIGNATURE_TYPE];
    bytes.extend_from_slice(key.as_bytes());
    format!(
        "{name}+{:08x}+{}",
        key_id(name, key),
        STANDARD.encode(bytes)
    )
}

/// The name and public key of a cosignature verifier key.
pub fn parse_verifier_key(text: &str) -> Result<(String, VerifyingKey), CosignatureError> {
    let bad = || CosignatureError::BadKey(text.to_owned());
    let mut parts = text.splitn(3, '+');
    let (Some(name), Some(id), Some(key)) = (parts.next(), parts.next(), parts.next()) else {
        return Err(bad());
    };
    let bytes = STANDARD.decode(key).map_err(|_| bad())?;
    let (&kind, key) = bytes.split_first().ok_or_else(bad)?;
    let key: [u8; 32] = key.try_into().map_err(|_| bad())?;
    let key = VerifyingKey::from_bytes(&key).map_err(|_| bad())?;
    if kind != SIGNATURE_TYPE || name.is_empty() || id != format!("{:08x}", key_id(name, &key)) {
        return Err(bad());
    }
    Ok((name.to_owned(), key))
}

/// The message a cosignature signs.
pub fn message(time: u64, checkpoint_text: &[u8]) -> Vec<u8> {
    let mut message = format!("cosignature/v1\ntime {time}\n").into_bytes();
    message.extend_from_slice(checkpoint_text);
    message
}

/// A cosignature line (with its newline) over `checkpoint_text` at `time`.
pub fn sign(name: &str, key: &SigningKey, time: u64, checkpoint_text: &[u8]) -> String {
    let signature = key.sign(&message(time, checkpoint_text));
    let mut blob = key_id(name, &key.verifying_key()).to_be_bytes().to_vec();
    blob.extend_from_slice(&time.to_be_bytes());
    blob.extend_from_slice(&signature.to_bytes());
    format!("\u{2014} {name} {}\n", STANDARD.encode(blob))
}

/// Checks that `line` is `name`'s valid cosignature of `checkpoint_text`; its time.
pub fn verify(
    line: &str,
    name: &str,
    key: &VerifyingKey,
    checkpoint_text: &[u8],
) -> Result<u64, CosignatureError> {
    let not_this = || CosignatureError::NotThisWitness(name.to_owned());
    let rest = line
        .trim_end_matches('\n')
        .strip_prefix("\u{2014} ")
        .ok_or_else(not_this)?;
    let (line_name, blob) = rest.split_once(' ').ok_or_else(not_this)?;
    let blob = STANDARD.decode(blob).map_err(|_| not_this())?;
    if line_name != name || blob.len() != 4 + 8 + 64 || blob[..4] != key_id(name, key).to_be_bytes()
    {
        return Err(not_this());
    }
    let time = u64::from_be_bytes(blob[4..12].try_into().map_err(|_| not_this())?);
    let signature = ed25519_dalek::Signature::from_slice(&blob[12..])
        .map_err(|_| CosignatureError::Invalid(name.to_owned()))?;
    key.verify(&message(time, checkpoint_text), &signature)
        .map_err(|_| CosignatureError::Invalid(name.to_owned()))?;
    Ok(time)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cosignature_verifies_and_nothing_else_does() {
        let key = SigningKey::from_bytes(&[3; 32]);
        let text = b"example.com/log\n7\nAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=\n";
        let line = sign("w.example", &key, 1_764_000_000, text);
        let vkey = verifier_key("w.example", &key.verifying_key());
        let (name, public) = parse_verifier_key(&vkey).expect("key");
        assert_eq!(name, "w.example");
        assert_eq!(verify(&line, &name, &public, text), Ok(1_764_000_000));
        assert!(matches!(
            verify(&line, &name, &public, b"example.com/log\n8\nAAAA\n"),
            Err(CosignatureError::Invalid(_))
        ));
        let other = SigningKey::from_bytes(&[4; 32]).verifying_key();
        assert!(verify(&line, &name, &other, text).is_err());
        assert!(verify(&line, "other", &public, text).is_err());
        assert!(parse_verifier_key(&vkey.replacen("w.example", "x", 1)).is_err());
        // A log key (type 0x01) is not a cosignature key.
        let mut log_key = vec![0x01];
        log_key.extend_from_slice(public.as_bytes());
        assert!(
            parse_verifier_key(&format!("w.example+00000000+{}", STANDARD.encode(log_key)))
                .is_err()
        );
    }
}
