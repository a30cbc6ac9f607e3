//! The global allocator of the `offline` binary: the system allocator, counting per thread the
//! bytes live, their peak and the largest single allocation. `hostile_input` measures decoders
//! with it and `cluster_wire` proves that a lying length header allocates nothing; a binary has
//! one global allocator, so both modules share this one. Counters are thread-local, so tests
//! running in parallel threads do not disturb each other's measurements.
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
}

fn grew(by: isize, size: usize) -> bool {
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
