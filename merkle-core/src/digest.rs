//! SHA-256 digests and the domain-separated leaves (spec sections 2 and 3).

use std::{fmt, io::Read, str::FromStr};

use sha2::{Digest as _, Sha256};

/// Prefix of a regular file's content.
pub const FILE_PREFIX: u8 = 0x00;
/// Prefix of a directory node.
pub const NODE_PREFIX: u8 = 0x01;
/// Prefix of a symbolic link's target.
pub const SYMLINK_PREFIX: u8 = 0x02;

/// A SHA-256 digest; written as 64 lowercase hex characters.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct Digest(pub [u8; 32]);

impl Digest {
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// The lowercase hex form.
    pub fn to_hex(&self) -> String {
        hex(&self.0)
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Digest({})", self.to_hex())
    }
}

/// Why a string is not a digest.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("must be 64 lowercase hex characters (a SHA-256 digest)")]
pub struct ParseDigestError;

impl FromStr for Digest {
    type Err = ParseDigestError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bytes = s.as_bytes();
        if bytes.len() != 64 {
            return Err(ParseDigestError);
        }
        let mut out = [0u8; 32];
        for (i, pair) in bytes.chunks_exact(2).enumerate() {
            out[i] = (nibble(pair[0])? << 4) | nibble(pair[1])?;
        }
        Ok(Digest(out))
    }
}

fn nibble(c: u8) -> Result<u8, ParseDigestError> {
    match c {
        b'0'..=b'9' => Ok(c - b'0'),
        b'a'..=b'f' => Ok(c - b'a' + 10),
        _ => Err(ParseDigestError),
    }
}

/// Lowercase hex of any bytes.
pub fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(DIGITS[(b >> 4) as usize] as char);
        s.push(DIGITS[(b & 15) as usize] as char);
    }
    s
}

/// Bytes from hex (either case), or `None`.
pub fn unhex(s: &str) -> Option<Vec<u8>> {
    let lower = s.to_ascii_lowercase();
    let bytes = lower.as_bytes();
    if !bytes.len().is_multiple_of(2) {
        return None;
    }
    bytes
        .chunks_exact(2)
        .map(|p| Some((nibble(p[0]).ok()? << 4) | nibble(p[1]).ok()?))
        .collect()
}

/// The leaf of a file whose whole content is `content`.
pub fn file_leaf(content: &[u8]) -> Digest {
    let mut hasher = FileHasher::new();
    hasher.update(content);
    hasher.finish()
}

/// The leaf of a symbolic link with this target text.
pub fn symlink_leaf(target: &[u8]) -> Digest {
    let mut h = Sha256::new();
    h.update([SYMLINK_PREFIX]);
    h.update(target);
    Digest(h.finalize().into())
}

/// Hashes a file's content incrementally, as it is read.
pub struct FileHasher(Sha256);

impl FileHasher {
    pub fn new() -> Self {
        let mut h = Sha256::new();
        h.update([FILE_PREFIX]);
        FileHasher(h)
    }

    pub fn update(&mut self, bytes: &[u8]) {
        self.0.update(bytes);
    }

    pub fn finish(self) -> Digest {
        Digest(self.0.finalize().into())
    }
}

impl Default for FileHasher {
    fn default() -> Self {
        Self::new()
    }
}

/// The size of the buffer files are read through. Small enough that the kernel's copy out of
/// the page cache and the hashing of it stay in one core's L2 cache: with 256 KiB both ran
/// about a third slower on this project's machine.
pub const READ_BUFFER: usize = 128 * 1024;

/// A buffer of [`READ_BUFFER`] bytes that starts on a page boundary. The kernel copies file
/// pages (page-aligned) into it; a buffer that starts a few bytes past a page boundary, as a
/// large allocation does, makes that copy several times slower on x86 (the copy's loads
/// wrongly wait for its own earlier stores: 4K aliasing).
pub struct ReadBuffer {
    bytes: Vec<u8>,
    start: usize,
}

impl ReadBuffer {
    const PAGE: usize = 4096;

    pub fn new() -> Self {
        let bytes = vec![0u8; READ_BUFFER + Self::PAGE];
        let start = (Self::PAGE - bytes.as_ptr() as usize % Self::PAGE) % Self::PAGE;
        ReadBuffer { bytes, start }
    }

    pub fn get(&mut self) -> &mut [u8] {
        &mut self.bytes[self.start..self.start + READ_BUFFER]
    }
}

impl Default for ReadBuffer {
    fn default() -> Self {
        Self::new()
    }
}

/// The file leaf of everything `reader` yields, read in `buf`-sized chunks.
pub fn file_leaf_from_reader(
    reader: &mut impl Read,
    buf: &mut [u8],
) -> std::io::Result<(Digest, u64)> {
    let mut hasher = FileHasher::new();
    let mut total = 0u64;
    loop {
        let n = match reader.read(buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        hasher.update(&buf[..n]);
        total += n as u64;
    }
    Ok((hasher.finish(), total))
}

/// SHA-256 of `bytes`. A directory node's hash is this over its encoding, which starts with
/// the 0x01 prefix ([`crate::DirNode::encode`]), so stored encodings are checked with it.
pub fn sha256(bytes: &[u8]) -> Digest {
    Digest(Sha256::digest(bytes).into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn read_buffers_start_on_a_page_boundary() {
        for _ in 0..4 {
            let mut buffer = ReadBuffer::new();
            let slice = buffer.get();
            assert_eq!(slice.len(), READ_BUFFER);
            assert_eq!(slice.as_ptr() as usize % 4096, 0);
        }
    }

    #[test]
    fn hex_round_trips_and_rejects_uppercase() {
        let d = file_leaf(b"hello\n");
        let text = d.to_hex();
        assert_eq!(text.len(), 64);
        assert_eq!(text.parse::<Digest>(), Ok(d));
        assert!(text.to_uppercase().parse::<Digest>().is_err());
        assert!("abc".parse::<Digest>().is_err());
    }

    #[test]
    fn leaves_are_domain_separated() {
        // The same bytes as a file and as a symlink target hash differently.
        assert_ne!(file_leaf(b"x"), symlink_leaf(b"x"));
        assert_eq!(file_leaf(b""), sha256(&[FILE_PREFIX]));
    }

    #[test]
    fn streamed_leaf_equals_whole_leaf() {
        let content: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
        let mut buf = [0u8; 4096];
        let (d, n) = file_leaf_from_reader(&mut content.as_slice(), &mut buf).expect("read");
        assert_eq!(n, content.len() as u64);
        assert_eq!(d, file_leaf(&content));
    }
}
