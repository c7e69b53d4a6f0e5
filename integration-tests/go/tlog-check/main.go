// tlog-check verifies DbSync's transparency log with an implementation that is not ours:
// Go's golang.org/x/mod/sumdb/note (C2SP signed-note) and sumdb/tlog (RFC 6962 proofs).
//
// It reads a JSON file (the first argument) with two checkpoints, the checkpoint key, one leaf
// with its inclusion proof in the newer tree and the consistency proof between the trees, and
// checks every one; it also checks that an altered note, leaf and proof are refused. It prints
// "ok" and exits 0, or names what failed and exits 1.
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

func main() {
	if len(os.Args) != 2 {
		fail("usage: tlog-check INPUT.json")
	}
	raw, err := os.ReadFile(os.Args[1])
	if err != nil {
		fail("%v", err)
	}
	var in input
	if err := json.Unmarshal(raw, &in); err != nil {
		fail("%s: %v", os.Args[1], err)
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
