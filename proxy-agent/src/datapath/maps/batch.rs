//! `BPF_MAP_UPDATE_BATCH`, `BPF_MAP_DELETE_BATCH` and `BPF_MAP_LOOKUP_BATCH`
//! (Linux 5.6) on a map's fd, through the raw bpf(2) syscall: aya 0.14 has
//! no batch API.
//!
//! One call writes (or deletes) many entries. The kernel
//! (`generic_map_update_batch` / `generic_map_delete_batch` in
//! kernel/bpf/syscall.c, the batch operations of hash, LRU hash, array and
//! LPM trie maps) takes the entries one by one in order, exactly as the
//! per-entry commands would, stops at the first that fails and writes back
//! in `attr.batch.count` how many it handled before that one. A map type
//! without the operation answers `ENOTSUPP` (524, a kernel-internal errno
//! that leaks to user space); a kernel without the command answers `EINVAL`.
//! Neither touches the count.
use std::{
    io, mem,
    os::fd::{AsRawFd as _, BorrowedFd},
};

use aya::Pod;
use aya_obj::generated::{bpf_attr, bpf_cmd};

/// Why a batch stopped.
#[derive(Debug)]
pub(super) struct Stopped {
    /// Entries handled (written, or deleted) before the one that failed;
    /// the ones after it were not tried.
    pub done: usize,
    pub error: io::Error,
    /// The kernel has no such batch operation for this map (nothing was
    /// done): write entry by entry instead.
    pub unsupported: bool,
}

/// The kernel's `ENOTSUPP`: no batch operation for this map type. Not a
/// user-space errno, so libc does not name it.
const ENOTSUPP: i32 = 524;

/// Entries per bpf(2) call at most (the count is a u32; smaller calls keep
/// each one short).
const MAX_PER_CALL: usize = 1 << 16;

/// The bpf(2) calls a batch of `entries` takes (if nothing stops it).
pub(super) fn calls(entries: usize) -> u64 {
    entries.div_ceil(MAX_PER_CALL) as u64
}

/// One batch command over `count` entries at `keys` (and `values`).
fn call(cmd: bpf_cmd, fd: BorrowedFd<'_>, keys: *const u8, values: *const u8, count: usize) -> Result<(), Stopped> {
    let n = u32::try_from(count).expect("callers pass at most MAX_PER_CALL entries");
    // SAFETY: bpf_attr is a union of plain integer structs: all zeroes is
    // a valid value (and the kernel requires the unused bytes to be zero).
    let mut attr: bpf_attr = unsafe { mem::zeroed() };
    // (Writing a union's field is safe; reading one is not.)
    attr.batch.keys = keys as u64;
    attr.batch.values = values as u64;
    attr.batch.count = n;
    attr.batch.map_fd = u32::try_from(fd.as_raw_fd()).expect("fds are non-negative");
    // SAFETY: `attr` is a valid bpf_attr for this command; `keys` (and
    // `values`) point at `count` entries of the map's key (value) size,
    // which the typed aya map they come from has checked; the kernel only
    // reads them, and writes `attr.batch.count`.
    let rc = unsafe { libc::syscall(libc::SYS_bpf, cmd as libc::c_long, &raw mut attr, mem::size_of::<bpf_attr>()) };
    if rc == 0 {
        return Ok(());
    }
    let error = io::Error::last_os_error();
    // SAFETY: reads the integer the kernel wrote back (or ours).
    let reported = unsafe { attr.batch.count } as usize;
    // The kernel resets the count before its first entry; an error before
    // that leaves ours in place: nothing was done.
    let untouched = reported >= count;
    let unsupported = untouched && matches!(error.raw_os_error(), Some(libc::EINVAL | libc::EOPNOTSUPP | ENOTSUPP));
    Err(Stopped { done: if untouched { 0 } else { reported }, error, unsupported })
}

/// Writes `keys[i]` → `values[i]` in order (`BPF_ANY`, as the per-entry
/// update of aya's maps).
pub(super) fn update<K: Pod, V: Pod>(fd: BorrowedFd<'_>, keys: &[K], values: &[V]) -> Result<(), Stopped> {
    assert_eq!(keys.len(), values.len(), "one value per key");
    let mut at = 0;
    while at < keys.len() {
        let end = keys.len().min(at + MAX_PER_CALL);
        call(bpf_cmd::BPF_MAP_UPDATE_BATCH, fd, keys[at..end].as_ptr().cast(), values[at..end].as_ptr().cast(), end - at)
            .map_err(|s| Stopped { done: at + s.done, ..s })?;
        at = end;
    }
    Ok(())
}

/// Deletes `keys` in order. An absent key counts as deleted (as for the
/// reconciler's per-entry deletes): the kernel stops at it with `ENOENT`,
/// and the batch goes on after it.
pub(super) fn delete<K: Pod>(fd: BorrowedFd<'_>, keys: &[K]) -> Result<(), Stopped> {
    let mut at = 0;
    while at < keys.len() {
        let end = keys.len().min(at + MAX_PER_CALL);
        match call(bpf_cmd::BPF_MAP_DELETE_BATCH, fd, keys[at..end].as_ptr().cast(), std::ptr::null(), end - at) {
            Ok(()) => at = end,
            Err(s) if !s.unsupported && s.error.raw_os_error() == Some(libc::ENOENT) => at += s.done + 1,
            Err(s) => return Err(Stopped { done: at + s.done, ..s }),
        }
    }
    Ok(())
}

/// Entries a lookup batch asks for at first (grown when a hash bucket holds
/// more, `ENOSPC`).
const LOOKUP_CHUNK: usize = 4096;

/// Every entry of a hash map, a few thousand per bpf(2) call
/// (`BPF_MAP_LOOKUP_BATCH`; the per-entry walk takes two calls per entry).
/// The kernel hands out whole buckets, resuming from the bucket index it
/// returns in `out_batch`, and answers `ENOENT` with the last entries.
pub(super) fn lookup_all<K: Pod, V: Pod>(fd: BorrowedFd<'_>) -> Result<Vec<(K, V)>, Stopped> {
    let mut out = Vec::new();
    let mut chunk = LOOKUP_CHUNK;
    // The hash map's resume token: a bucket index (u32).
    let (mut token, mut next) = (0u32, 0u32);
    let mut first = true;
    loop {
        // SAFETY: map keys and values are plain integers (`Pod`): all
        // zeroes is a value. (Zeroed, not uninitialised: whatever count the
        // kernel reports, nothing read is uninitialised.)
        let (zk, zv): (K, V) = unsafe { (mem::zeroed(), mem::zeroed()) };
        let (mut keys, mut values) = (vec![zk; chunk], vec![zv; chunk]);
        // SAFETY: see `call`.
        let mut attr: bpf_attr = unsafe { mem::zeroed() };
        attr.batch.in_batch = if first { 0 } else { (&raw const token) as u64 };
        attr.batch.out_batch = (&raw mut next) as u64;
        attr.batch.keys = keys.as_mut_ptr() as u64;
        attr.batch.values = values.as_mut_ptr() as u64;
        attr.batch.count = u32::try_from(chunk).expect("chunks fit u32");
        attr.batch.map_fd = u32::try_from(fd.as_raw_fd()).expect("fds are non-negative");
        // SAFETY: the kernel writes at most `count` keys and values of the
        // map's sizes (checked by the typed aya map) into the buffers, and
        // the token into `next`; it only reads `token`. (It resumes only
        // from tokens it returned with success, so it never answers ENOENT
        // before writing the count back.)
        let rc = unsafe { libc::syscall(libc::SYS_bpf, bpf_cmd::BPF_MAP_LOOKUP_BATCH as libc::c_long, &raw mut attr, mem::size_of::<bpf_attr>()) };
        let error = (rc != 0).then(io::Error::last_os_error);
        let errno = error.as_ref().and_then(io::Error::raw_os_error);
        // SAFETY: reads the integer the kernel wrote back.
        let n = (unsafe { attr.batch.count } as usize).min(chunk);
        if matches!(errno, None | Some(libc::ENOENT)) {
            out.extend(keys[..n].iter().copied().zip(values[..n].iter().copied()));
        }
        match (errno, error) {
            (None, _) => {
                token = next;
                first = false;
            }
            (Some(libc::ENOENT), _) => return Ok(out),
            // A bucket holds more entries than we asked for: ask for more.
            (Some(libc::ENOSPC), _) if chunk < 1 << 20 => chunk *= 2,
            (_, Some(error)) => {
                let unsupported = out.is_empty() && matches!(errno, Some(libc::EINVAL | libc::EOPNOTSUPP | ENOTSUPP));
                return Err(Stopped { done: out.len(), error, unsupported });
            }
            (Some(_), None) => unreachable!("an errno comes with an error"),
        }
    }
}
