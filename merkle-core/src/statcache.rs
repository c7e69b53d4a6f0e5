//! The persistent stat cache: path, size, mtime, ctime, inode and mode → file digest, like
//! git's index. It makes a rebuild read only the files that changed.
//!
//! **Racy files**: a file rewritten within the file system's timestamp granularity of the scan
//! that cached it can keep an identical stat. So a cached digest is trusted only when the file's
//! mtime and ctime are at least [`RACY_MARGIN`] older than the start of the scan that cached
//! it; other files are read again (and cached again, to be trusted the time after).
//!
//! File format (little-endian): `MMSC`, u32 version 1, i64 seconds and u32 nanoseconds of the
//! scan start, u64 record count, then per record: u32 path length, path bytes (relative to the
//! root, `/`-separated), u64 size, i64 mtime s, u32 mtime ns, i64 ctime s, u32 ctime ns,
//! u64 inode, u32 mode, u32 uid, u32 gid, 32 digest bytes. A file that does not parse is
//! ignored: the cache is only ever a speed-up.

use std::{
    collections::HashMap,
    fs::{self, Metadata},
    io::{self, Write as _},
    os::unix::fs::MetadataExt as _,
    path::Path,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use crate::digest::Digest;

/// How much older than the caching scan a file's timestamps must be for its digest to be
/// trusted; covers coarse (1-2 s) file-system timestamps and clock skew.
pub const RACY_MARGIN: Duration = Duration::from_secs(2);

const MAGIC: &[u8; 4] = b"MMSC";
const VERSION: u32 = 1;

/// The `lstat` fields that tell whether a file may have changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct FileStat {
    pub size: u64,
    pub mtime_s: i64,
    pub mtime_ns: u32,
    pub ctime_s: i64,
    pub ctime_ns: u32,
    pub ino: u64,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
}

impl FileStat {
    pub fn from_metadata(m: &Metadata) -> FileStat {
        FileStat {
            size: m.len(),
            mtime_s: m.mtime(),
            mtime_ns: m.mtime_nsec() as u32,
            ctime_s: m.ctime(),
            ctime_ns: m.ctime_nsec() as u32,
            ino: m.ino(),
            mode: m.mode(),
            uid: m.uid(),
            gid: m.gid(),
        }
    }

    /// The later of mtime and ctime, in nanoseconds since the epoch.
    pub(crate) fn newest_ns(&self) -> i128 {
        let m = self.mtime_s as i128 * 1_000_000_000 + self.mtime_ns as i128;
        let c = self.ctime_s as i128 * 1_000_000_000 + self.ctime_ns as i128;
        m.max(c)
    }
}

/// A cached file: the stat it was read under and its leaf digest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CachedFile {
    pub stat: FileStat,
    pub digest: Digest,
}

/// A loaded stat cache.
#[derive(Debug, Default)]
pub struct StatCache {
    /// Files whose newest timestamp is before this (ns since the epoch) are trusted.
    trusted_before_ns: i128,
    files: HashMap<Vec<u8>, CachedFile>,
}

pub(crate) fn epoch_ns(t: SystemTime) -> i128 {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => d.as_nanos() as i128,
        Err(e) => -(e.duration().as_nanos() as i128),
    }
}

impl StatCache {
    /// Loads the cache at `path`; a missing or unreadable file gives an empty cache.
    pub fn load(path: &Path) -> StatCache {
        fs::read(path)
            .ok()
            .and_then(|bytes| Self::parse(&bytes))
            .unwrap_or_default()
    }

    /// The cached digest of `rel`, if its stat is unchanged and not racy.
    pub fn lookup(&self, rel: &[u8], stat: &FileStat) -> Option<Digest> {
        let cached = self.files.get(rel)?;
        (cached.stat == *stat && stat.newest_ns() < self.trusted_before_ns).then_some(cached.digest)
    }

    pub fn len(&self) -> usize {
        self.files.len()
    }

    pub fn is_empty(&self) -> bool {
        self.files.is_empty()
    }

    /// Writes a cache of `files` (see [`StatCacheWriter`]).
    pub fn save(
        path: &Path,
        trusted_before: SystemTime,
        files: &[(Vec<u8>, CachedFile)],
    ) -> io::Result<()> {
        let mut writer = StatCacheWriter::new(trusted_before);
        for (rel, file) in files {
            writer.push(rel, file);
        }
        writer.finish(path)
    }

    fn parse(bytes: &[u8]) -> Option<StatCache> {
        let mut r = Reader(bytes);
        if r.take(4)? != MAGIC || r.u32()? != VERSION {
            return None;
        }
        let secs = r.i64()?;
        let nanos = r.u32()?;
        let count = r.u64()?;
        let mut files = HashMap::with_capacity(count.min(10_000_000) as usize);
        for _ in 0..count {
            let len = r.u32()? as usize;
            let rel = r.take(len)?.to_vec();
            let stat = FileStat {
                size: r.u64()?,
                mtime_s: r.i64()?,
                mtime_ns: r.u32()?,
                ctime_s: r.i64()?,
                ctime_ns: r.u32()?,
                ino: r.u64()?,
                mode: r.u32()?,
                uid: r.u32()?,
                gid: r.u32()?,
            };
            let digest = Digest(r.take(32)?.try_into().ok()?);
            files.insert(rel, CachedFile { stat, digest });
        }
        r.0.is_empty().then_some(StatCache {
            trusted_before_ns: secs as i128 * 1_000_000_000 + nanos as i128,
            files,
        })
    }
}

/// Builds a cache file record by record, then writes it atomically (a temporary file renamed
/// over the old one). No fsync: a cache lost or torn by a crash fails to parse and is ignored.
pub struct StatCacheWriter {
    out: Vec<u8>,
    count: u64,
}

impl StatCacheWriter {
    /// Files whose mtime or ctime is not before `trusted_before` (the scan start less the racy
    /// margin) will be read again by the next build.
    pub fn new(trusted_before: SystemTime) -> Self {
        let ns = epoch_ns(trusted_before);
        let mut out = Vec::with_capacity(1 << 16);
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&VERSION.to_le_bytes());
        out.extend_from_slice(&(ns.div_euclid(1_000_000_000) as i64).to_le_bytes());
        out.extend_from_slice(&(ns.rem_euclid(1_000_000_000) as u32).to_le_bytes());
        out.extend_from_slice(&0u64.to_le_bytes()); // the count, patched by finish
        StatCacheWriter { out, count: 0 }
    }

    pub fn push(&mut self, rel: &[u8], f: &CachedFile) {
        self.push_child(b"", rel, f);
    }

    /// Pushes the file `name` of the directory `dir` (both relative, `dir` empty for the root),
    /// without building the joined path.
    pub fn push_child(&mut self, dir: &[u8], name: &[u8], f: &CachedFile) {
        let out = &mut self.out;
        let len = if dir.is_empty() {
            name.len()
        } else {
            dir.len() + 1 + name.len()
        };
        out.extend_from_slice(&(len as u32).to_le_bytes());
        if !dir.is_empty() {
            out.extend_from_slice(dir);
            out.push(b'/');
        }
        out.extend_from_slice(name);
        let s = &f.stat;
        out.extend_from_slice(&s.size.to_le_bytes());
        out.extend_from_slice(&s.mtime_s.to_le_bytes());
        out.extend_from_slice(&s.mtime_ns.to_le_bytes());
        out.extend_from_slice(&s.ctime_s.to_le_bytes());
        out.extend_from_slice(&s.ctime_ns.to_le_bytes());
        out.extend_from_slice(&s.ino.to_le_bytes());
        out.extend_from_slice(&s.mode.to_le_bytes());
        out.extend_from_slice(&s.uid.to_le_bytes());
        out.extend_from_slice(&s.gid.to_le_bytes());
        out.extend_from_slice(f.digest.as_bytes());
        self.count += 1;
    }

    pub fn finish(mut self, path: &Path) -> io::Result<()> {
        self.out[20..28].copy_from_slice(&self.count.to_le_bytes());
        if let Some(dir) = path.parent() {
            fs::create_dir_all(dir)?;
        }
        let tmp = path.with_extension(format!("tmp{}", std::process::id()));
        let mut file = fs::File::create(&tmp)?;
        file.write_all(&self.out)?;
        drop(file);
        fs::rename(&tmp, path)
    }
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (head, tail) = self.0.split_at(n);
        self.0 = tail;
        Some(head)
    }
    fn u32(&mut self) -> Option<u32> {
        Some(u32::from_le_bytes(self.take(4)?.try_into().ok()?))
    }
    fn u64(&mut self) -> Option<u64> {
        Some(u64::from_le_bytes(self.take(8)?.try_into().ok()?))
    }
    fn i64(&mut self) -> Option<i64> {
        Some(i64::from_le_bytes(self.take(8)?.try_into().ok()?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::digest::file_leaf;

    fn stat_at(secs: i64) -> FileStat {
        FileStat {
            size: 5,
            mtime_s: secs,
            ctime_s: secs,
            ino: 7,
            mode: 0o100644,
            ..FileStat::default()
        }
    }

    #[test]
    fn round_trip_and_racy_rule() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("cache");
        let scan = UNIX_EPOCH + Duration::from_secs(1_000) - RACY_MARGIN;
        let old = stat_at(900);
        let racy = stat_at(999);
        let digest = file_leaf(b"hello");
        StatCache::save(
            &path,
            scan,
            &[
                (b"old".to_vec(), CachedFile { stat: old, digest }),
                (b"racy".to_vec(), CachedFile { stat: racy, digest }),
            ],
        )
        .expect("save");
        let cache = StatCache::load(&path);
        assert_eq!(cache.len(), 2);
        assert_eq!(cache.lookup(b"old", &old), Some(digest));
        // Modified within the margin of the caching scan: never trusted.
        assert_eq!(cache.lookup(b"racy", &racy), None);
        // Any stat difference: not trusted.
        let mut changed = old;
        changed.size = 6;
        assert_eq!(cache.lookup(b"old", &changed), None);
        assert_eq!(cache.lookup(b"missing", &old), None);
    }

    #[test]
    fn corrupt_cache_is_ignored() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("cache");
        fs::write(&path, b"MMSC garbage").expect("write");
        assert!(StatCache::load(&path).is_empty());
        assert!(StatCache::load(&dir.path().join("absent")).is_empty());
    }
}
