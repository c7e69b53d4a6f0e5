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

/// Why a node cannot be encoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NodeError {
    #[error("entries are not strictly sorted by name (at {0:?})")]
    Unsorted(String),
    #[error("entry {0:?} has an empty name, or one with '/' or NUL")]
    BadName(String),
    #[error("entry {0:?} lacks mode, uid and gid, which the full profile hashes")]
    MissingMeta(String),
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
            if name.is_empty() || name.contains(&b'/') || name.contains(&0) {
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
}
