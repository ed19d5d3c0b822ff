//! The allocator every tandem process uses (mimalloc: fewer bytes per small allocation and a
//! faster start than the system allocator, for a store that holds millions of small strings),
//! and the two settings tandem changes in how it gets memory.
//!
//! This is the workspace's only `unsafe` code: mimalloc's options can be set only through its C
//! interface or its environment variables, and a component run alone under a service manager
//! would otherwise have to be given the variable by hand. It also holds [`prefetch`], the one
//! processor hint the store's row lookups use, which Rust offers only as an `unsafe` intrinsic.

#![deny(unsafe_code)]

pub use mimalloc::MiMalloc;

/// The variable that sets the same option from outside; when it is set, it wins.
pub const PURGE_DELAY_VAR: &str = "MIMALLOC_PURGE_DELAY";

/// How long freed memory stays with the allocator before it goes back to the system, in ms.
///
/// mimalloc's default is 10 ms, shorter than a group commit's cycle: every batch's buffers then
/// fault in freshly zeroed pages where the last batch's had just been returned, and the kernel's
/// page zeroing became up to a third of a store's commit thread (docs/PERFORMANCE.md). A second
/// keeps the pages of a busy process's working set, and an idle one still gives them back.
pub const PURGE_DELAY_MS: i64 = 1_000;

/// mimalloc's `mi_option_purge_delay`: the same position in the option enums of mimalloc 2 and 3
/// (`mimalloc.h` of both, as vendored by `libmimalloc-sys`), which does not export it.
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// The variable that keeps transparent huge pages on when it is set (mimalloc reads it too:
/// `MIMALLOC_ALLOW_THP=1` gives mimalloc's own behaviour back).
pub const ALLOW_THP_VAR: &str = "MIMALLOC_ALLOW_THP";

/// What [`tune`] left in force.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tuning {
    /// mimalloc's purge delay, in ms.
    pub purge_delay_ms: i64,
    /// Whether the kernel may still give the process transparent huge pages.
    pub huge_pages: bool,
}

/// Sets the purge delay to [`PURGE_DELAY_MS`] unless [`PURGE_DELAY_VAR`] is set, and turns
/// transparent huge pages off for the process unless [`ALLOW_THP_VAR`] is set. Call it first
/// thing in `main`, before any other thread starts: mimalloc's option setters are not
/// thread-safe.
///
/// Why no huge pages: mimalloc asks for them on its arenas, so every first touch of a 2 MiB
/// range had the kernel zero all of it, and memory mimalloc gave back and took again came back
/// 2 MiB at a time. A tandem process's memory churns (event batches, memtables, frames), and
/// that zeroing was a quarter of a store's CPU in a pair: without huge pages the single path
/// went from 735–817 k to 921–944 k events/s and the pair from 447–471 k to 562–592 k
/// (docs/PERFORMANCE.md). The flag is inherited: the processes `tandem up` starts have it too.
pub fn tune() -> Tuning {
    if std::env::var_os(PURGE_DELAY_VAR).is_none() {
        set_purge_delay(PURGE_DELAY_MS);
    }
    if std::env::var_os(ALLOW_THP_VAR).is_none() {
        disable_huge_pages();
    }
    Tuning {
        purge_delay_ms: purge_delay(),
        huge_pages: huge_pages(),
    }
}

#[cfg(target_os = "linux")]
fn disable_huge_pages() {
    if let Err(e) = nix::sys::prctl::set_thp_disable(true) {
        // Only slower, not wrong: say so once, where the process's log will show it.
        eprintln!(
            "tandem: cannot turn transparent huge pages off ({e}); memory-heavy work will be slower"
        );
    }
}

#[cfg(not(target_os = "linux"))]
fn disable_huge_pages() {}

#[cfg(target_os = "linux")]
fn huge_pages() -> bool {
    !nix::sys::prctl::get_thp_disable().unwrap_or(false)
}

#[cfg(not(target_os = "linux"))]
fn huge_pages() -> bool {
    false
}

#[allow(unsafe_code)]
fn set_purge_delay(ms: i64) {
    // SAFETY: `mi_option_set` takes an option number and a value and only stores the value;
    // the number is mimalloc's own for this option, and `tune`'s contract keeps other threads
    // from reading the options meanwhile.
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, ms as _) }
}

#[allow(unsafe_code)]
fn purge_delay() -> i64 {
    // SAFETY: reads one option by mimalloc's own number for it.
    (unsafe { libmimalloc_sys::mi_option_get(MI_OPTION_PURGE_DELAY) }) as i64
}

/// Asks the processor to start loading the cache line at `at` while the caller goes on with
/// other work. A table of a million entries misses the cache on nearly every one it touches; a
/// plain load issued early (`std::hint::black_box`) still holds up the instructions after it
/// once the processor's window of them fills, where a prefetch retires at once. A hint only:
/// nothing is read or written, and an address that maps nothing is ignored.
#[inline(always)]
pub fn prefetch<T>(at: *const T) {
    #[cfg(target_arch = "x86_64")]
    #[allow(unsafe_code)]
    // SAFETY: PREFETCHT0 neither reads nor writes memory as far as the program can tell and
    // never faults, whatever the address; SSE, which it needs, is part of every x86_64.
    unsafe {
        core::arch::x86_64::_mm_prefetch::<{ core::arch::x86_64::_MM_HINT_T0 }>(at.cast())
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = at;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_purge_delay_and_huge_pages_are_tuned_unless_the_environment_sets_them() {
        // The option number is right if mimalloc reads back what was set, and its default
        // (10 ms) was there before: a wrong number would be another option's value.
        let wanted = match std::env::var(PURGE_DELAY_VAR) {
            Ok(value) => value.parse().expect("a number in MIMALLOC_PURGE_DELAY"),
            Err(_) => {
                assert_eq!(purge_delay(), 10, "mimalloc's default purge delay");
                PURGE_DELAY_MS
            }
        };
        // One test, not two: `tune` changes what the other would read first.
        let keep_huge_pages = std::env::var_os(ALLOW_THP_VAR).is_some();
        let tuning = tune();
        assert_eq!(tuning.purge_delay_ms, wanted);
        if cfg!(target_os = "linux") {
            assert_eq!(tuning.huge_pages, keep_huge_pages, "{tuning:?}");
        }
    }
}
