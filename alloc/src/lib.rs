//! The allocator every tandem process uses (mimalloc: fewer bytes per small allocation and a
//! faster start than the system allocator, for a store that holds millions of small strings),
//! and the one setting tandem changes in it.
//!
//! This is the workspace's only `unsafe` code: mimalloc's options can be set only through its C
//! interface or its environment variables, and a component run alone under a service manager
//! would otherwise have to be given the variable by hand.

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

/// Sets the purge delay to [`PURGE_DELAY_MS`] unless [`PURGE_DELAY_VAR`] is set. Call it first
/// thing in `main`, before any other thread starts: mimalloc's option setters are not
/// thread-safe. Returns the delay in force.
pub fn tune() -> i64 {
    if std::env::var_os(PURGE_DELAY_VAR).is_none() {
        set_purge_delay(PURGE_DELAY_MS);
    }
    purge_delay()
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_purge_delay_is_the_tuned_one_or_the_environments() {
        // The option number is right if mimalloc reads back what was set, and its default
        // (10 ms) was there before: a wrong number would be another option's value.
        let wanted = match std::env::var(PURGE_DELAY_VAR) {
            Ok(value) => value.parse().expect("a number in MIMALLOC_PURGE_DELAY"),
            Err(_) => {
                assert_eq!(purge_delay(), 10, "mimalloc's default purge delay");
                PURGE_DELAY_MS
            }
        };
        assert_eq!(tune(), wanted);
    }
}
