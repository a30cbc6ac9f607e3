//! The global allocator of the `offline` binary: the system allocator, counting per thread the
//! bytes live, their peak, the largest single allocation, and the number of allocations and bytes
//! allocated in all. `hostile_input` and `domain_parse` measure decoders with it ([`measure`]) and
//! `cluster_wire` proves that a lying length header allocates nothing; a binary has one global
//! allocator, so the modules share this one. Counters are thread-local, so tests running in
//! parallel threads do not disturb each other's measurements.
//!
//! The counts are the tests' measure of work: for a given input they are the same on every run
//! and every machine load (unlike wall time), so a test can assert that a decoder's work grows
//! linearly with its input, which a quadratic blow-up that allocates as it goes fails.
//!
//! It also aborts the test binary (rather than the machine) if one thread ever holds more than
//! [`HARD_CAP`] bytes.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

/// One thread holding more than this is a runaway decoder: abort instead of exhausting the host.
const HARD_CAP: isize = 3 << 30;

/// The allocator: [`System`], counting on the calling thread.
struct Measuring;

thread_local! {
    /// Bytes this thread allocated and has not freed (memory freed by another thread makes it
    /// drift; a measurement takes the difference from its start).
    pub static LIVE: Cell<isize> = const { Cell::new(0) };
    /// The highest `LIVE` since a measurement reset it.
    pub static PEAK: Cell<isize> = const { Cell::new(0) };
    /// The largest single allocation (or reallocation) since a measurement reset it.
    pub static LARGEST: Cell<usize> = const { Cell::new(0) };
    /// Allocations and reallocations made by this thread, ever (a measurement takes differences).
    pub static ALLOCATIONS: Cell<u64> = const { Cell::new(0) };
    /// Bytes requested by those calls, ever: a reallocation counts its new size, as it may copy.
    pub static ALLOCATED: Cell<u64> = const { Cell::new(0) };
}

fn grew(by: isize, size: usize) -> bool {
    let _ = ALLOCATIONS.try_with(|n| n.set(n.get() + 1));
    let _ = ALLOCATED.try_with(|n| n.set(n.get() + size as u64));
    let live = LIVE
        .try_with(|l| {
            let v = l.get() + by;
            l.set(v);
            v
        })
        .unwrap_or(0);
    let _ = PEAK.try_with(|p| p.set(p.get().max(live)));
    let _ = LARGEST.try_with(|m| m.set(m.get().max(size)));
    live <= HARD_CAP
}

unsafe impl GlobalAlloc for Measuring {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if !grew(layout.size() as isize, layout.size()) {
            return std::ptr::null_mut();
        }
        // SAFETY: forwarded unchanged to the system allocator.
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if !grew(layout.size() as isize, layout.size()) {
            return std::ptr::null_mut();
        }
        // SAFETY: forwarded unchanged to the system allocator.
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        let _ = LIVE.try_with(|l| l.set(l.get() - layout.size() as isize));
        // SAFETY: forwarded unchanged to the system allocator.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if !grew(new_size as isize - layout.size() as isize, new_size) {
            return std::ptr::null_mut();
        }
        // SAFETY: forwarded unchanged to the system allocator.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOC: Measuring = Measuring;

/// What a closure allocated on this thread.
#[derive(Debug, Clone, Copy)]
pub struct Usage {
    /// Most bytes live at once, above what was live before.
    pub peak: usize,
    /// The largest single allocation (or reallocation).
    pub largest: usize,
    /// Allocations and reallocations made.
    pub allocations: u64,
    /// Bytes requested in all (a reallocation counts its new size).
    pub allocated: u64,
}

/// Runs `f` and returns its result and what it allocated on this thread.
pub fn measure<T>(f: impl FnOnce() -> T) -> (T, Usage) {
    let base = LIVE.with(Cell::get);
    PEAK.with(|p| p.set(base));
    LARGEST.with(|m| m.set(0));
    let (count, bytes) = (ALLOCATIONS.with(Cell::get), ALLOCATED.with(Cell::get));
    let out = f();
    let usage = Usage {
        peak: (PEAK.with(Cell::get) - base).max(0) as usize,
        largest: LARGEST.with(Cell::get),
        allocations: ALLOCATIONS.with(Cell::get) - count,
        allocated: ALLOCATED.with(Cell::get) - bytes,
    };
    (out, usage)
}

/// Runs `f` and returns its result and the bytes it left allocated on this thread: what the
/// result keeps alive (when `f` frees its temporaries and allocates nothing else that stays).
pub fn retained<T>(f: impl FnOnce() -> T) -> (T, usize) {
    let base = LIVE.with(Cell::get);
    let out = f();
    let kept = (LIVE.with(Cell::get) - base).max(0) as usize;
    (out, kept)
}

/// Asserts that the work of `small` (for an input of `small_len` bytes) and `large` (for
/// `large_len` bytes) grew about linearly: both counts by less than twice the input's ratio. For
/// an input 4 times larger a linear decoder does about 4 times the work and a quadratic one 16
/// times, so the bound (8) sits between the two with room for constant costs on either side.
pub fn assert_linear(
    what: &str,
    (small_len, small): (usize, Usage),
    (large_len, large): (usize, Usage),
) {
    let ratio = large_len as f64 / small_len as f64;
    assert!(
        ratio >= 2.0,
        "{what}: inputs of {small_len} and {large_len} bytes are too close to tell"
    );
    let grew = |a: u64, b: u64| b as f64 / (a.max(1)) as f64;
    let (count, bytes) = (
        grew(small.allocations, large.allocations),
        grew(small.allocated, large.allocated),
    );
    assert!(
        count < 2.0 * ratio && bytes < 2.0 * ratio,
        "{what}: input {ratio:.1}x larger, allocations {count:.1}x, bytes allocated {bytes:.1}x \
         (not linear)\n{small_len} bytes: {small:?}\n{large_len} bytes: {large:?}"
    );
}
