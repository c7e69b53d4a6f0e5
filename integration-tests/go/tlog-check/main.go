// tlog-check verifies DbSync's transparency log with an implementation that is not ours:
// Go's golang.org/x/mod/sumdb/note (C2SP signed-note) and sumdb/tlog (RFC 6962 proofs, tiles).
//
// `tlog-check proofs INPUT.json` reads two checkpoints, the checkpoint key, one leaf with its
// inclusion proof in the newer tree and the consistency proof between the trees, and checks
// every one; it also checks that an altered note, leaf and proof are refused.
//
// `tlog-check tiles DIR VERIFIER_KEY` reads a log exported as C2SP tlog-tiles (`merklectl
// export-log DIR`): the checkpoint's signature, the tree rebuilt from the entry bundles against
// its root, and every hash tile against the rebuilt hashes.
//
// It prints "ok: ..." and exits 0, or names what failed and exits 1.
//
// Build offline with Debian's packages: GO111MODULE=off GOPATH=/usr/share/gocode go build.
package main

import (
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"os"
	"strconv"
	"strings"

	"golang.org/x/mod/sumdb/note"
	"golang.org/x/mod/sumdb/tlog"
)

type input struct {
	VerifierKey string   `json:"verifier_key"`
	Origin      string   `json:"origin"`
	OldNote     string   `json:"old_note"`
	Note        string   `json:"note"`
	LeafIndex   int64    `json:"leaf_index"`
	RecordHash  string   `json:"record_hash"`
	Inclusion   []string `json:"inclusion"`
	Consistency []string `json:"consistency"`
}

type checkpoint struct {
	origin string
	size   int64
	root   tlog.Hash
}

func fail(format string, args ...interface{}) {
	fmt.Fprintf(os.Stderr, "tlog-check: "+format+"\n", args...)
	os.Exit(1)
}

// open verifies the note's signature and parses its C2SP tlog-checkpoint text.
func open(text string, verifiers note.Verifiers) (checkpoint, error) {
	n, err := note.Open([]byte(text), verifiers)
	if err != nil {
		return checkpoint{}, err
	}
	lines := strings.SplitN(n.Text, "\n", 4)
	if len(lines) < 4 {
		return checkpoint{}, fmt.Errorf("a checkpoint has at least three lines: %q", n.Text)
	}
	size, err := strconv.ParseInt(lines[1], 10, 64)
	if err != nil {
		return checkpoint{}, fmt.Errorf("tree size %q: %v", lines[1], err)
	}
	root, err := base64.StdEncoding.DecodeString(lines[2])
	if err != nil || len(root) != tlog.HashSize {
		return checkpoint{}, fmt.Errorf("root hash %q: not 32 bytes of base64", lines[2])
	}
	var h tlog.Hash
	copy(h[:], root)
	return checkpoint{origin: lines[0], size: size, root: h}, nil
}

func hashes(list []string) []tlog.Hash {
	out := make([]tlog.Hash, len(list))
	for i, s := range list {
		b, err := hex.DecodeString(s)
		if err != nil || len(b) != tlog.HashSize {
			fail("proof hash %d %q: not 32 bytes of hex", i, s)
		}
		copy(out[i][:], b)
	}
	return out
}

// c2sp is the C2SP tlog-tiles path of a tile (sumdb's own paths are tile/8/L/N, tile/8/data/N).
func c2sp(t tlog.Tile) string {
	p := t.Path()
	if rest := strings.TrimPrefix(p, "tile/8/data/"); rest != p {
		return "tile/entries/" + rest
	}
	return "tile/" + strings.TrimPrefix(p, "tile/8/")
}

// checkTiles rebuilds the tree from the entry bundles with sumdb/tlog, checks its root against
// the signed checkpoint and every hash tile against the rebuilt hashes. (It does not lean on
// tlog.TileHashReader, which does not authenticate every full tile it reads.)
func checkTiles(dir, key string) {
	verifier, err := note.NewVerifier(key)
	if err != nil {
		fail("verifier key %q: %v", key, err)
	}
	text, err := os.ReadFile(dir + "/checkpoint")
	if err != nil {
		fail("%v", err)
	}
	cp, err := open(string(text), note.VerifierList(verifier))
	if err != nil {
		fail("checkpoint: %v", err)
	}
	var stored []tlog.Hash
	reader := tlog.HashReaderFunc(func(indexes []int64) ([]tlog.Hash, error) {
		out := make([]tlog.Hash, len(indexes))
		for i, x := range indexes {
			if x < 0 || x >= int64(len(stored)) {
				return nil, fmt.Errorf("hash %d not stored", x)
			}
			out[i] = stored[x]
		}
		return out, nil
	})
	for start := int64(0); start < cp.size; start += 256 {
		end := start + 256
		if end > cp.size {
			end = cp.size
		}
		bundle := tlog.Tile{H: 8, L: -1, N: start / 256, W: int(end - start)}
		data, err := os.ReadFile(dir + "/" + c2sp(bundle))
		if err != nil {
			fail("%v", err)
		}
		for n := start; n < end; n++ {
			if len(data) < 2 || len(data) < 2+(int(data[0])<<8|int(data[1])) {
				fail("%s: too short", c2sp(bundle))
			}
			size := int(data[0])<<8 | int(data[1])
			hashes, err := tlog.StoredHashes(n, data[2:2+size], reader)
			if err != nil {
				fail("leaf %d: %v", n, err)
			}
			stored = append(stored, hashes...)
			data = data[2+size:]
		}
		if len(data) != 0 {
			fail("%s: bytes after its %d entries", c2sp(bundle), end-start)
		}
	}
	root, err := tlog.TreeHash(cp.size, reader)
	if err != nil || root != cp.root {
		fail("the entries do not hash to the checkpoint's root: %v", err)
	}
	// NewTiles lists every width a partial tile had as the log grew; C2SP keeps the last one.
	widest := map[[2]int64]int{}
	for _, t := range tlog.NewTiles(8, 0, cp.size) {
		key := [2]int64{int64(t.L), t.N}
		if t.W > widest[key] {
			widest[key] = t.W
		}
	}
	tiles := 0
	for _, t := range tlog.NewTiles(8, 0, cp.size) {
		if t.W != widest[[2]int64{int64(t.L), t.N}] {
			continue
		}
		want, err := tlog.ReadTileData(t, reader)
		if err != nil {
			fail("%s: %v", c2sp(t), err)
		}
		got, err := os.ReadFile(dir + "/" + c2sp(t))
		if err != nil {
			fail("%v", err)
		}
		if string(got) != string(want) {
			fail("%s: its hashes are not the entries'", c2sp(t))
		}
		tiles++
	}
	fmt.Printf("ok: %d leaves in tiles, the tree rebuilt from the entries has the root signed by %s, all %d tiles match\n",
		cp.size, verifier.Name(), tiles)
}

func main() {
	if len(os.Args) == 4 && os.Args[1] == "tiles" {
		checkTiles(os.Args[2], os.Args[3])
		return
	}
	if len(os.Args) != 3 || os.Args[1] != "proofs" {
		fail("usage: tlog-check proofs INPUT.json | tlog-check tiles DIR VERIFIER_KEY")
	}
	raw, err := os.ReadFile(os.Args[2])
	if err != nil {
		fail("%v", err)
	}
	var in input
	if err := json.Unmarshal(raw, &in); err != nil {
		fail("%s: %v", os.Args[2], err)
	}
	verifier, err := note.NewVerifier(in.VerifierKey)
	if err != nil {
		fail("verifier key %q: %v", in.VerifierKey, err)
	}
	verifiers := note.VerifierList(verifier)
	old, err := open(in.OldNote, verifiers)
	if err != nil {
		fail("older checkpoint: %v", err)
	}
	cur, err := open(in.Note, verifiers)
	if err != nil {
		fail("newer checkpoint: %v", err)
	}
	if old.origin != in.Origin || cur.origin != in.Origin {
		fail("origins %q and %q, expected %q", old.origin, cur.origin, in.Origin)
	}
	record, err := hex.DecodeString(in.RecordHash)
	if err != nil {
		fail("record hash %q: %v", in.RecordHash, err)
	}
	leaf := tlog.RecordHash(record)
	inclusion := hashes(in.Inclusion)
	if err := tlog.CheckRecord(inclusion, cur.size, cur.root, in.LeafIndex, leaf); err != nil {
		fail("inclusion of leaf %d in the tree of %d: %v", in.LeafIndex, cur.size, err)
	}
	consistency := hashes(in.Consistency)
	if err := tlog.CheckTree(consistency, cur.size, cur.root, old.size, old.root); err != nil {
		fail("consistency of %d with %d: %v", old.size, cur.size, err)
	}

	// What was altered must be refused.
	altered := strings.Replace(in.Note, "\n"+strconv.FormatInt(cur.size, 10)+"\n", "\n"+strconv.FormatInt(cur.size+1, 10)+"\n", 1)
	if _, err := open(altered, verifiers); err == nil {
		fail("a checkpoint with an altered size verified")
	}
	other := tlog.RecordHash(append([]byte("not "), record...))
	if tlog.CheckRecord(inclusion, cur.size, cur.root, in.LeafIndex, other) == nil {
		fail("another leaf verified with the proof")
	}
	if len(consistency) > 0 {
		bad := append([]tlog.Hash(nil), consistency...)
		bad[0][0] ^= 1
		if tlog.CheckTree(bad, cur.size, cur.root, old.size, old.root) == nil {
			fail("an altered consistency proof verified")
		}
	}
	fmt.Printf("ok: checkpoints of %d and %d leaves signed by %s, leaf %d included, consistent\n",
		old.size, cur.size, verifier.Name(), in.LeafIndex)
}
