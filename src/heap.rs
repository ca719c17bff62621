//! The process heap, given back.

/// Returns the heap's free pages to the system. A sync's or a transfer's buffers (chunks read
/// and in flight, QUIC's buffers, the re-chunk workers' reads) are freed when it ends, but
/// glibc keeps them in the arena of each thread that touched them: without this, a daemon
/// keeps the peak of its busiest moment resident for good, though its live heap is the chunk
/// index (`scripts/bench-primaries`, `scripts/soak`).
pub fn give_back() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim only walks glibc's own arenas.
    unsafe {
        libc::malloc_trim(0);
    }
}
