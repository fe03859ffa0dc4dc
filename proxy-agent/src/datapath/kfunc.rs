//! kfunc calls in the eBPF object, made loadable.
//!
//! bpf-linker 0.13 links a call to an `extern "C"` kernel function (a
//! kfunc, here `bpf_sock_destroy`) as a plain BPF-to-BPF call to an
//! undefined symbol, and aya 0.14 has no kfunc support: it would fail to
//! relocate the call. So before loading, every call instruction whose
//! relocation names an undefined symbol is rewritten into what the kernel
//! expects of a kfunc call: `src_reg = BPF_PSEUDO_KFUNC_CALL` (2), `off = 0`
//! (the function is in vmlinux BTF), `imm` = its BTF id on this kernel.
//! aya then leaves the instruction alone. A kfunc this kernel lacks gets id
//! 0: only its program fails to load, and the agent runs without it.
use std::{collections::BTreeSet, sync::OnceLock};

use aya::Btf;
use aya_obj::btf::BtfKind;
use object::{Object as _, ObjectSection as _, ObjectSymbol as _, RelocationTarget};

/// `BPF_PSEUDO_KFUNC_CALL` in the `src_reg` nibble of a call instruction.
const SRC_REG_KFUNC: u8 = 2 << 4;
/// `BPF_JMP | BPF_CALL`.
const OP_CALL: u8 = 0x85;

/// The embedded object with its kfunc calls patched for this kernel, and
/// which kfuncs this kernel lacks. Computed once; 8-byte aligned (the ELF
/// parser reads headers in place).
pub fn patched_object(raw: &[u8]) -> (&'static [u8], &'static [String]) {
    static PATCHED: OnceLock<(Box<[u64]>, usize, Vec<String>)> = OnceLock::new();
    let (words, len, missing) = PATCHED.get_or_init(|| {
        let mut bytes = raw.to_vec();
        let btf = Btf::from_sys_fs().ok();
        let missing = patch(&mut bytes, btf.as_ref());
        let mut words = vec![0u64; bytes.len().div_ceil(8)].into_boxed_slice();
        // SAFETY: the u64 buffer is at least bytes.len() bytes long.
        unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), words.as_mut_ptr().cast::<u8>(), bytes.len()) };
        (words, bytes.len(), missing)
    });
    // SAFETY: the buffer lives for the program's life (static OnceLock) and
    // holds `len` initialised bytes.
    let bytes = unsafe { std::slice::from_raw_parts(words.as_ptr().cast::<u8>(), *len) };
    (bytes, missing.as_slice())
}

/// Patches `elf` in place; returns the kfuncs not found in `btf`.
fn patch(elf: &mut [u8], btf: Option<&Btf>) -> Vec<String> {
    let mut patches: Vec<(usize, u32)> = Vec::new();
    let mut missing: BTreeSet<String> = BTreeSet::new();
    if let Ok(obj) = object::File::parse(&*elf) {
        for section in obj.sections() {
            let Some((sec_off, _)) = section.file_range() else { continue };
            for (rel_off, rel) in section.relocations() {
                let RelocationTarget::Symbol(idx) = rel.target() else { continue };
                let Ok(sym) = obj.symbol_by_index(idx) else { continue };
                if !sym.is_undefined() {
                    continue;
                }
                let Ok(name) = sym.name() else { continue };
                let id = btf.and_then(|b| b.id_by_type_name_kind(name, BtfKind::Func).ok());
                if id.is_none() {
                    missing.insert(name.to_owned());
                }
                let Ok(off) = usize::try_from(sec_off + rel_off) else { continue };
                patches.push((off, id.unwrap_or(0)));
            }
        }
    }
    for (off, id) in patches {
        let Some(ins) = elf.get_mut(off..off + 8) else { continue };
        if ins[0] != OP_CALL {
            continue;
        }
        ins[1] = SRC_REG_KFUNC;
        ins[2..4].copy_from_slice(&0i16.to_le_bytes());
        ins[4..8].copy_from_slice(&id.to_le_bytes());
    }
    missing.into_iter().collect()
}
