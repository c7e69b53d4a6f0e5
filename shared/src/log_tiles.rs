//! Paths of C2SP tlog-tiles (tile height 8), which DbSync serves and `merklectl export-log`
//! writes: `tile/<L>/<N>[.p/<W>]` for hash tiles and `tile/entries/<N>[.p/<W>]` for entry
//! bundles, mapped to and from `tlog_tiles::Tile` (whose own paths are Go sumdb's,
//! `tile/8/<L>/...` and `tile/8/data/...`).

use tlog_tiles::{Hash, HashReader, Tile};

/// Tile height of C2SP tlog-tiles.
pub const HEIGHT: u8 = 8;
/// Hashes (or entries) in a full tile.
pub const WIDTH: u64 = 1 << HEIGHT;

/// The tile or entry bundle a C2SP path names; `None` for a path that is not one.
pub fn parse(path: &str) -> Option<Tile> {
    let rest = path.strip_prefix("tile/")?;
    let sumdb = match rest.strip_prefix("entries/") {
        Some(n) => format!("tile/{HEIGHT}/data/{n}"),
        None => format!("tile/{HEIGHT}/{rest}"),
    };
    Tile::from_path(&sumdb).ok()
}

/// The C2SP path of a tile or entry bundle.
pub fn path_of(tile: &Tile) -> String {
    let sumdb = tile.path();
    let rest = sumdb
        .strip_prefix(&format!("tile/{HEIGHT}/"))
        .unwrap_or(&sumdb);
    match rest.strip_prefix("data/") {
        Some(n) => format!("tile/entries/{n}"),
        None => format!("tile/{rest}"),
    }
}

/// Every tile and entry bundle of the log of `size` leaves: the full ones and the last
/// partial ones.
pub fn paths(size: u64) -> Vec<String> {
    let mut out = Vec::new();
    for tile in Tile::new_tiles(HEIGHT, 0, size) {
        if tile.level() == 0 {
            let mut data = tile;
            data.set_is_data();
            out.push(path_of(&data));
        }
        out.push(path_of(&tile));
    }
    out
}

/// A log's stored hashes in memory, by stored hash index (appended in order): what a client
/// rebuilding a log from its entries (`merklectl export-log`, the bundle bench) reads proofs
/// and tree hashes from.
#[derive(Debug, Default)]
pub struct MemoryHashes(pub Vec<Hash>);

impl HashReader for MemoryHashes {
    fn read_hashes(&self, indexes: &[u64]) -> Result<Vec<Hash>, tlog_tiles::Error> {
        indexes
            .iter()
            .map(|&i| {
                self.0
                    .get(i as usize)
                    .copied()
                    .ok_or(tlog_tiles::Error::IndexesNotInTree)
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_are_c2sps_and_parse_back() {
        // 70,000 leaves: 273 full tiles at level 0 and a partial of 112; 1 full at level 1
        // and a partial of 17; a partial of 1 at level 2.
        let all = paths(70_000);
        for expected in [
            "tile/0/000",
            "tile/entries/000",
            "tile/0/272",
            "tile/0/273.p/112",
            "tile/entries/273.p/112",
            "tile/1/000",
            "tile/1/001.p/17",
            "tile/2/000.p/1",
        ] {
            assert!(all.iter().any(|p| p == expected), "{expected} in {all:?}");
        }
        assert_eq!(all.len(), 274 * 2 + 2 + 1);
        for path in &all {
            assert_eq!(&path_of(&parse(path).expect(path)), path);
        }
        assert!(parse("tile/0/1000").is_none() && parse("checkpoint").is_none());
        assert_eq!(
            path_of(&parse("tile/3/x001/x234/067.p/8").expect("deep")),
            "tile/3/x001/x234/067.p/8"
        );
    }
}
