//! Gives the operating system back the memory a burst of connects freed.
//!
//! A restore or a fleet-wide reconnect allocates and frees a great deal per tenant (handshakes, logins, the
//! engine's connect graph) on every worker thread. glibc's allocator keeps what was freed inside its arenas, so
//! the host stays resident at the burst's high-water mark long after the sessions have settled: about a fifth
//! of an idle session's RSS was such freed memory (docs/benchmarks.md). Once the sessions' states have been
//! quiet for a moment, one `malloc_trim(0)` hands those pages back. It runs on a blocking thread: glibc walks
//! and locks every arena in turn, which takes milliseconds on a large heap.

use std::time::Duration;

use tokio::sync::broadcast::{self, error::RecvError};

use crate::session::StateChange;

/// How long the sessions' states must be quiet after a change before the allocator is trimmed.
pub const QUIET: Duration = Duration::from_secs(2);

/// Trims the allocator once every time a run of state changes on `changes` has been followed by [`QUIET`].
/// Ends when the channel closes. Does nothing where the allocator has no such call (anything but glibc).
pub fn start_trimmer(mut changes: broadcast::Receiver<StateChange>) {
    if !TRIM_SUPPORTED {
        return;
    }
    tokio::spawn(async move {
        loop {
            // Wait for the first change of a burst ...
            if let Err(RecvError::Closed) = changes.recv().await {
                return;
            }
            // ... and for the burst to end.
            loop {
                match tokio::time::timeout(QUIET, changes.recv()).await {
                    Err(_quiet) => break,
                    Ok(Err(RecvError::Closed)) => return,
                    Ok(_) => {}
                }
            }
            let released = tokio::task::spawn_blocking(trim).await.unwrap_or(false);
            metrics::counter!("wakeeper_allocator_trims_total").increment(1);
            tracing::debug!(released, "gave freed memory back to the operating system");
        }
    });
}

const TRIM_SUPPORTED: bool = cfg!(all(target_os = "linux", target_env = "gnu"));

/// Returns the free pages of every glibc arena to the system; whether anything was released.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[expect(unsafe_code, reason = "malloc_trim is a C function; the crate's one unsafe call")]
pub fn trim() -> bool {
    // SAFETY: malloc_trim takes no pointer and has no precondition; glibc serialises it with every other
    // allocator call, so it is sound from any thread at any time.
    unsafe { libc::malloc_trim(0) == 1 }
}

/// Elsewhere the allocator returns memory itself or has no such call.
#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
pub fn trim() -> bool {
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trimming_after_freeing_a_burst_gives_memory_back() {
        if !TRIM_SUPPORTED {
            return;
        }
        // Many small blocks (below the mmap threshold, so they live in the arena), then free all but the last:
        // the freed ones sit below a live block, where only a trim returns them.
        let mut blocks: Vec<Vec<u8>> = (0..20_000).map(|i| vec![i as u8; 1024]).collect();
        let last = blocks.pop();
        drop(blocks);
        assert!(trim(), "freed arena pages were not released");
        drop(last);
    }
}
