//! Directory entries and nodes, and their canonical encoding (spec sections 4 and 5).

use crate::digest::{Digest, NODE_PREFIX, sha256};

/// What a snapshot's hashes cover.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Profile {
    /// Content, executable bit, symlink targets, names and structure.
    #[default]
    Content,
    /// Also permission bits, owner uid and gid.
    Full,
}

impl Profile {
    /// The profile byte of the encoding.
    pub fn byte(self) -> u8 {
        match self {
            Profile::Content => 0x01,
            Profile::Full => 0x02,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Profile::Content => "content",
            Profile::Full => "full",
        }
    }

    pub fn from_name(name: &str) -> Option<Profile> {
        match name {
            "content" => Some(Profile::Content),
            "full" => Some(Profile::Full),
            _ => None,
        }
    }

    /// The profile of a profile byte.
    pub fn from_byte(byte: u8) -> Option<Profile> {
        match byte {
            0x01 => Some(Profile::Content),
            0x02 => Some(Profile::Full),
            _ => None,
        }
    }
}

/// The kind of a directory entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EntryKind {
    File,
    Executable,
    Directory,
    Symlink,
}

impl EntryKind {
    pub fn byte(self) -> u8 {
        match self {
            EntryKind::File => 0x01,
            EntryKind::Executable => 0x02,
            EntryKind::Directory => 0x03,
            EntryKind::Symlink => 0x04,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            EntryKind::File => "file",
            EntryKind::Executable => "executable",
            EntryKind::Directory => "directory",
            EntryKind::Symlink => "symlink",
        }
    }

    /// The kind of a kind byte.
    pub fn from_byte(byte: u8) -> Option<EntryKind> {
        match byte {
            0x01 => Some(EntryKind::File),
            0x02 => Some(EntryKind::Executable),
            0x03 => Some(EntryKind::Directory),
            0x04 => Some(EntryKind::Symlink),
            _ => None,
        }
    }

    pub fn from_name(name: &str) -> Option<EntryKind> {
        match name {
            "file" => Some(EntryKind::File),
            "executable" => Some(EntryKind::Executable),
            "directory" => Some(EntryKind::Directory),
            "symlink" => Some(EntryKind::Symlink),
            _ => None,
        }
    }

    /// Regular files (executable or not), directories and symlinks are different groups; a
    /// change across groups is a kind change, within the file group a modification.
    pub fn group(self) -> u8 {
        match self {
            EntryKind::File | EntryKind::Executable => 0,
            EntryKind::Directory => 1,
            EntryKind::Symlink => 2,
        }
    }
}

/// Metadata hashed by the `full` profile.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Meta {
    /// `st_mode & 0o7777`.
    pub perm: u32,
    pub uid: u32,
    pub gid: u32,
}

/// One entry of a directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// The raw name bytes.
    pub name: Vec<u8>,
    pub kind: EntryKind,
    /// File or symlink leaf, or the child directory's node hash.
    pub hash: Digest,
    /// File size in bytes (informational: not hashed); 0 for directories and symlinks.
    pub size: u64,
    /// Set with the `full` profile, which hashes it.
    pub meta: Option<Meta>,
}

/// A directory node: entries sorted by raw name bytes.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct DirNode {
    pub entries: Vec<Entry>,
}

/// True for a name an entry may have: a file name as the file system gives it, so not empty,
/// not `.` or `..`, and without `/` or NUL (spec section 4).
pub fn valid_name(name: &[u8]) -> bool {
    !name.is_empty() && name != b"." && name != b".." && !name.contains(&b'/') && !name.contains(&0)
}

/// Why a node cannot be encoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NodeError {
    #[error("entries are not strictly sorted by name (at {0:?})")]
    Unsorted(String),
    #[error("entry {0:?} has an empty name, `.` or `..`, or one with '/' or NUL")]
    BadName(String),
    #[error("entry {0:?} lacks mode, uid and gid, which the full profile hashes")]
    MissingMeta(String),
    #[error("not a node encoding: {0}")]
    Malformed(&'static str),
}

/// Reads the encoding of a node, front to back.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], NodeError> {
        if self.0.len() < n {
            return Err(NodeError::Malformed("it ends early"));
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }

    fn u8(&mut self) -> Result<u8, NodeError> {
        Ok(self.take(1)?[0])
    }

    fn u32(&mut self) -> Result<u32, NodeError> {
        let b = self.take(4)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }
}

impl DirNode {
    /// The bytes hashed for this node under `profile` (prefix included). Checks the rules a
    /// verifier must check: names valid and strictly sorted, metadata present for `full`.
    pub fn encode(&self, profile: Profile) -> Result<Vec<u8>, NodeError> {
        let mut out = Vec::with_capacity(6 + self.entries.len() * 48);
        out.push(NODE_PREFIX);
        out.push(profile.byte());
        out.extend_from_slice(&(self.entries.len() as u32).to_be_bytes());
        let mut previous: Option<&[u8]> = None;
        for entry in &self.entries {
            let name = entry.name.as_slice();
            if !valid_name(name) {
                return Err(NodeError::BadName(lossy(name)));
            }
            if previous.is_some_and(|p| p >= name) {
                return Err(NodeError::Unsorted(lossy(name)));
            }
            previous = Some(name);
            out.push(entry.kind.byte());
            out.extend_from_slice(&(name.len() as u32).to_be_bytes());
            out.extend_from_slice(name);
            out.extend_from_slice(entry.hash.as_bytes());
            if profile == Profile::Full {
                let meta = entry
                    .meta
                    .ok_or_else(|| NodeError::MissingMeta(lossy(name)))?;
                out.extend_from_slice(&meta.perm.to_be_bytes());
                out.extend_from_slice(&meta.uid.to_be_bytes());
                out.extend_from_slice(&meta.gid.to_be_bytes());
            }
        }
        Ok(out)
    }

    /// Parses bytes made by [`DirNode::encode`] back into the profile and the node, checking
    /// the same rules (sizes are not encoded, so they are 0). `decode(b)` then `encode` gives
    /// `b` again, so a node stored in its encoding is verified by hashing those bytes.
    pub fn decode(bytes: &[u8]) -> Result<(Profile, DirNode), NodeError> {
        let mut r = Reader(bytes);
        if r.u8()? != NODE_PREFIX {
            return Err(NodeError::Malformed("wrong prefix byte"));
        }
        let profile = Profile::from_byte(r.u8()?).ok_or(NodeError::Malformed("unknown profile"))?;
        let count = r.u32()? as usize;
        // Each entry takes at least 38 bytes: no count can claim more than the bytes hold.
        if count > r.0.len() / 38 {
            return Err(NodeError::Malformed("more entries than bytes"));
        }
        let mut entries = Vec::with_capacity(count);
        for _ in 0..count {
            let kind = EntryKind::from_byte(r.u8()?).ok_or(NodeError::Malformed("unknown kind"))?;
            let len = r.u32()? as usize;
            let name = r.take(len)?.to_vec();
            let hash = Digest(
                r.take(32)?
                    .try_into()
                    .map_err(|_| NodeError::Malformed("short hash"))?,
            );
            let meta = match profile {
                Profile::Content => None,
                Profile::Full => Some(Meta {
                    perm: r.u32()?,
                    uid: r.u32()?,
                    gid: r.u32()?,
                }),
            };
            entries.push(Entry {
                name,
                kind,
                hash,
                size: 0,
                meta,
            });
        }
        if !r.0.is_empty() {
            return Err(NodeError::Malformed("bytes after the last entry"));
        }
        let node = DirNode { entries };
        // The same rules as encoding: names valid and strictly sorted.
        node.encode(profile)?;
        Ok((profile, node))
    }

    /// The node's hash under `profile`.
    pub fn hash(&self, profile: Profile) -> Result<Digest, NodeError> {
        Ok(sha256(&self.encode(profile)?))
    }

    /// The entry with this name (binary search: entries are sorted).
    pub fn get(&self, name: &[u8]) -> Option<&Entry> {
        self.entries
            .binary_search_by(|e| e.name.as_slice().cmp(name))
            .ok()
            .map(|i| &self.entries[i])
    }
}

/// A name for messages: UTF-8 where it is, escaped bytes where not.
pub fn lossy(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// What a built tree contains.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TreeStats {
    pub file_count: u64,
    pub dir_count: u64,
    pub symlink_count: u64,
    pub skipped_count: u64,
    pub total_bytes: u64,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::digest::file_leaf;

    fn entry(name: &str, kind: EntryKind) -> Entry {
        Entry {
            name: name.as_bytes().to_vec(),
            kind,
            hash: file_leaf(name.as_bytes()),
            size: 0,
            meta: None,
        }
    }

    #[test]
    fn empty_directory_encoding_is_prefix_profile_and_zero_count() {
        let node = DirNode::default();
        assert_eq!(
            node.encode(Profile::Content).expect("ok"),
            vec![0x01, 0x01, 0, 0, 0, 0]
        );
        assert_eq!(
            node.encode(Profile::Full).expect("ok"),
            vec![0x01, 0x02, 0, 0, 0, 0]
        );
        assert_ne!(node.hash(Profile::Content), node.hash(Profile::Full));
    }

    #[test]
    fn unsorted_or_duplicate_entries_are_rejected() {
        let node = DirNode {
            entries: vec![entry("b", EntryKind::File), entry("a", EntryKind::File)],
        };
        assert!(matches!(
            node.encode(Profile::Content),
            Err(NodeError::Unsorted(_))
        ));
        let node = DirNode {
            entries: vec![entry("a", EntryKind::File), entry("a", EntryKind::File)],
        };
        assert!(matches!(
            node.encode(Profile::Content),
            Err(NodeError::Unsorted(_))
        ));
    }

    #[test]
    fn full_profile_needs_metadata() {
        let node = DirNode {
            entries: vec![entry("a", EntryKind::File)],
        };
        assert!(matches!(
            node.hash(Profile::Full),
            Err(NodeError::MissingMeta(_))
        ));
    }

    #[test]
    fn kind_is_part_of_the_hash() {
        let file = DirNode {
            entries: vec![entry("a", EntryKind::File)],
        };
        let exec = DirNode {
            entries: vec![entry("a", EntryKind::Executable)],
        };
        assert_ne!(file.hash(Profile::Content), exec.hash(Profile::Content));
    }

    #[test]
    fn encodings_decode_back_to_the_node_for_both_profiles() {
        let mut node = DirNode {
            entries: vec![
                entry("a", EntryKind::Directory),
                entry("b.sh", EntryKind::Executable),
                entry("c", EntryKind::Symlink),
            ],
        };
        node.entries[0].name = b"\xffodd".to_vec();
        node.entries.sort_by(|x, y| x.name.cmp(&y.name));
        let encoded = node.encode(Profile::Content).expect("encodes");
        assert_eq!(
            DirNode::decode(&encoded),
            Ok((Profile::Content, node.clone()))
        );

        for (i, e) in node.entries.iter_mut().enumerate() {
            e.meta = Some(Meta {
                perm: 0o640 + i as u32,
                uid: 1000,
                gid: 7,
            });
        }
        let encoded = node.encode(Profile::Full).expect("encodes");
        let (profile, decoded) = DirNode::decode(&encoded).expect("decodes");
        assert_eq!((profile, &decoded), (Profile::Full, &node));
        assert_eq!(decoded.encode(profile).expect("encodes"), encoded);
        let empty = DirNode::default()
            .encode(Profile::Content)
            .expect("encodes");
        assert_eq!(
            DirNode::decode(&empty),
            Ok((Profile::Content, DirNode::default()))
        );
    }

    #[test]
    fn malformed_encodings_are_errors_not_panics() {
        let good = DirNode {
            entries: vec![entry("a", EntryKind::File), entry("b", EntryKind::File)],
        }
        .encode(Profile::Content)
        .expect("encodes");
        for cut in 0..good.len() {
            assert!(DirNode::decode(&good[..cut]).is_err(), "cut at {cut}");
        }
        let mut extra = good.clone();
        extra.push(0);
        assert!(DirNode::decode(&extra).is_err());
        let mut unsorted = good.clone();
        // Swap the two names ("a" and "b" sit at fixed offsets).
        unsorted.swap(11, 11 + 38);
        assert!(matches!(
            DirNode::decode(&unsorted),
            Err(NodeError::Unsorted(_))
        ));
        let mut huge_count = good;
        huge_count[2..6].copy_from_slice(&u32::MAX.to_be_bytes());
        assert!(DirNode::decode(&huge_count).is_err());
    }
}
