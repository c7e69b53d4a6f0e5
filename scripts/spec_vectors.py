#!/usr/bin/env python3
"""An independent implementation of docs/merkle-spec.md (version 1), written from the text
alone, that computes the test vectors of section 9 and checks them against the document.

Usage: scripts/spec_vectors.py            print the vectors
       scripts/spec_vectors.py --check    compare with docs/merkle-spec.md (exit 1 on mismatch)
"""
import hashlib
import os
import re
import struct
import sys

FILE, EXEC, DIR, LINK = 1, 2, 3, 4
CONTENT, FULL = 1, 2


def h(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def file_leaf(content: bytes) -> bytes:
    return h(b"\x00" + content)


def link_leaf(target: bytes) -> bytes:
    return h(b"\x02" + target)


def node(entries, profile=CONTENT) -> bytes:
    """entries: list of (name bytes, kind, child digest, (perm, uid, gid) or None)."""
    out = bytes([0x01, profile]) + struct.pack(">I", len(entries))
    for name, kind, child, meta in sorted(entries, key=lambda e: e[0]):
        out += bytes([kind]) + struct.pack(">I", len(name)) + name + child
        if profile == FULL:
            out += struct.pack(">III", *meta)
    return h(out)


def record(source, sequence, root, profile, build_id, micros, stats, previous):
    """Section 10.1: the record hash."""
    def s(text):
        b = text.encode()
        return struct.pack(">I", len(b)) + b
    out = b"merkle-record-v1" + s(source) + struct.pack(">Q", sequence) + root
    out += bytes([profile]) + s(build_id) + struct.pack(">q", micros)
    out += b"".join(struct.pack(">Q", n) for n in stats)
    out += b"\x00" if previous is None else b"\x01" + previous
    return h(out)


def checkpoint(kind, source, sequence, record_hash, actor=""):
    """Section 10.2: the checkpoint hash (version 2 when it names an actor)."""
    def s(text):
        b = text.encode()
        return struct.pack(">I", len(b)) + b
    body = s(kind) + s(source) + struct.pack(">Q", sequence) + record_hash
    if actor:
        return h(b"merkle-checkpoint-v2" + body + s(actor))
    return h(b"merkle-checkpoint-v1" + body)


def history():
    root = node([(b"hello.txt", FILE, file_leaf(b"hello\n"), None)])
    r1 = record("docs", 1, root, CONTENT, "b-1", 1764000000000000, (1, 1, 0, 0, 6), None)
    r2 = record("docs", 2, root, CONTENT, "b-2", 1764000060000000, (1, 1, 0, 0, 6), r1)
    return {
        "record 1": r1,
        "record 2": r2,
        "head checkpoint": checkpoint("head", "docs", 2, r2),
        "pruned checkpoint": checkpoint("pruned", "docs", 1, r1, "alice (admin)"),
    }


def vectors():
    ab = node([(b"c.txt", FILE, file_leaf(b"c\n"), None)])
    a = node([(b"b", DIR, ab, None), (b"d.txt", FILE, file_leaf(b"d\n"), None)])
    return {
        "1": node([]),
        "2": node([(b"hello.txt", FILE, file_leaf(b"hello\n"), None)]),
        "3": node([(b"run.sh", EXEC, file_leaf(b"#!/bin/sh\necho hi\n"), None)]),
        "4": node([(b"link", LINK, link_leaf(b"target/file.txt"), None)]),
        "5": node([
            (b"A", FILE, file_leaf(b"1"), None),
            (b"a", DIR, a, None),
            (b"b", FILE, file_leaf(b""), None),
            (b"e", DIR, node([]), None),
        ]),
        "6": node([(b"f\xffo", FILE, file_leaf(b"x"), None)]),
        "7": node([(b"hello.txt", FILE, file_leaf(b"hello\n"), (0o640, 1000, 1000))], FULL),
        "file leaf of": file_leaf(b"hello\n"),
        "symlink leaf of": link_leaf(b"target/file.txt"),
        "node of directory": ab,
        **history(),
    }


def documented(spec: str):
    section = spec[spec.index("## 9. Test vectors"):]
    found = {}
    for line in section.splitlines():
        m = re.match(r"^- (record 1|record 2|head checkpoint|pruned checkpoint)\b.*`([0-9a-f]{64})`$", line)
        if m:
            found[m.group(1)] = m.group(2)
    for line in section.splitlines():
        m = re.match(r"^\| (\d) \|.*`([0-9a-f]{64})` \|$", line)
        if m:
            found[m.group(1)] = m.group(2)
        m = re.match(r"^- (file leaf of|symlink leaf of|node of directory).*`([0-9a-f]{64})`$", line)
        if m:
            found[m.group(1)] = m.group(2)
    return found


def main():
    computed = {k: v.hex() for k, v in vectors().items()}
    if "--check" not in sys.argv:
        for k, v in computed.items():
            print(f"{k}: {v}")
        return 0
    spec_path = os.path.join(os.path.dirname(__file__), "..", "docs", "merkle-spec.md")
    with open(spec_path, encoding="utf-8") as f:
        doc = documented(f.read())
    bad = [k for k in computed if doc.get(k) != computed[k]]
    for k in bad:
        print(f"vector {k!r}: document says {doc.get(k)}, this implementation computes {computed[k]}")
    print(f"spec vectors: {len(computed) - len(bad)} passed, {len(bad)} failed")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
