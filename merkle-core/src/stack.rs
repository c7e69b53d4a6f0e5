//! Recursion that never overflows the stack: every recursive walk of a tree (scanning and
//! hashing a directory, refreshing a watched tree, diffing) goes one level deeper through
//! [`deeper`], which moves the rest of the walk onto a fresh stack segment when the current one
//! runs low. The walks are bounded by [`crate::MAX_DEPTH`], checked before they recurse; this
//! makes the bound safe whatever the thread's stack size and however rayon's work stealing
//! stacks jobs on one thread (debug builds use about 16 KiB of stack per level).

/// Stack that must be left before one more level runs on the current segment.
const RED_ZONE: usize = 256 * 1024;
/// The size of a segment added when the red zone is reached.
const SEGMENT: usize = 4 * 1024 * 1024;

/// Runs `f` (one level of a walk) on a stack with at least `RED_ZONE` bytes left.
pub fn deeper<R>(f: impl FnOnce() -> R) -> R {
    stacker::maybe_grow(RED_ZONE, SEGMENT, f)
}
