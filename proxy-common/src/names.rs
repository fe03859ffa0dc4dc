//! Service id → human-readable name (`namespace/name:port/PROTO`).
//!
//! The kernel never reads this map; it is there so that `proxy-agent services`
//! and `bpftool map dump` can say which Service a frontend belongs to from the
//! pinned maps alone.

pub const NAMES_MAP: &str = "proxy_names_v1";
/// One per frontend; no preallocation, so only used entries cost memory.
pub const NAMES_MAX_ENTRIES: u32 = 1_048_576;
pub const NAME_LEN: usize = 120;

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SvcName {
    /// UTF-8, NUL-padded.
    pub name: [u8; NAME_LEN],
}
const _: () = assert!(size_of::<SvcName>() == NAME_LEN);

impl SvcName {
    /// Builds a name, truncated to `NAME_LEN` bytes at a character boundary.
    #[must_use]
    pub fn new(s: &str) -> Self {
        let mut name = [0u8; NAME_LEN];
        let mut end = s.len().min(NAME_LEN);
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        name[..end].copy_from_slice(&s.as_bytes()[..end]);
        Self { name }
    }

    /// The name as text (up to the first NUL).
    #[must_use]
    pub fn as_str(&self) -> &str {
        let end = self.name.iter().position(|&b| b == 0).unwrap_or(NAME_LEN);
        core::str::from_utf8(&self.name[..end]).unwrap_or("?")
    }
}

crate::pod!(SvcName);
