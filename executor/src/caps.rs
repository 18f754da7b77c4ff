//! Linux capabilities: names, Docker's default set, and applying the five
//! sets (bounding, effective, permitted, inheritable, ambient) in the init.

use oci_spec::runtime::{Capabilities, Capability};

/// Docker's default capability set: CHOWN, DAC_OVERRIDE, FOWNER, FSETID,
/// KILL, SETGID, SETUID, SETPCAP, NET_BIND_SERVICE, NET_RAW, SYS_CHROOT,
/// MKNOD, AUDIT_WRITE, SETFCAP (`CapEff 00000000a80425fb` for root).
pub const DEFAULT_CAPS: u64 = 0xa804_25fb;

const NAMES: &[(&str, u32)] = &[
    ("CAP_CHOWN", 0),
    ("CAP_DAC_OVERRIDE", 1),
    ("CAP_DAC_READ_SEARCH", 2),
    ("CAP_FOWNER", 3),
    ("CAP_FSETID", 4),
    ("CAP_KILL", 5),
    ("CAP_SETGID", 6),
    ("CAP_SETUID", 7),
    ("CAP_SETPCAP", 8),
    ("CAP_LINUX_IMMUTABLE", 9),
    ("CAP_NET_BIND_SERVICE", 10),
    ("CAP_NET_BROADCAST", 11),
    ("CAP_NET_ADMIN", 12),
    ("CAP_NET_RAW", 13),
    ("CAP_IPC_LOCK", 14),
    ("CAP_IPC_OWNER", 15),
    ("CAP_SYS_MODULE", 16),
    ("CAP_SYS_RAWIO", 17),
    ("CAP_SYS_CHROOT", 18),
    ("CAP_SYS_PTRACE", 19),
    ("CAP_SYS_PACCT", 20),
    ("CAP_SYS_ADMIN", 21),
    ("CAP_SYS_BOOT", 22),
    ("CAP_SYS_NICE", 23),
    ("CAP_SYS_RESOURCE", 24),
    ("CAP_SYS_TIME", 25),
    ("CAP_SYS_TTY_CONFIG", 26),
    ("CAP_MKNOD", 27),
    ("CAP_LEASE", 28),
    ("CAP_AUDIT_WRITE", 29),
    ("CAP_AUDIT_CONTROL", 30),
    ("CAP_SETFCAP", 31),
    ("CAP_MAC_OVERRIDE", 32),
    ("CAP_MAC_ADMIN", 33),
    ("CAP_SYSLOG", 34),
    ("CAP_WAKE_ALARM", 35),
    ("CAP_BLOCK_SUSPEND", 36),
    ("CAP_AUDIT_READ", 37),
    ("CAP_PERFMON", 38),
    ("CAP_BPF", 39),
    ("CAP_CHECKPOINT_RESTORE", 40),
];

/// Capability number of a `CAP_*` name.
pub fn cap_number(name: &str) -> Option<u32> {
    let upper = name.to_ascii_uppercase();
    let full = if upper.starts_with("CAP_") {
        upper
    } else {
        format!("CAP_{upper}")
    };
    NAMES.iter().find(|(n, _)| *n == full).map(|(_, b)| *b)
}

/// The `CAP_*` name of one oci-spec capability.
fn oci_name(cap: &Capability) -> String {
    serde_json::to_value(cap)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_else(|| format!("{cap:?}"))
}

/// A bit mask for an oci-spec capability set; unknown names are an error.
pub(crate) fn mask_of(set: &Capabilities) -> Result<u64, String> {
    let mut m = 0u64;
    for c in set {
        let name = oci_name(c);
        let bit = cap_number(&name).ok_or(name)?;
        m |= 1 << bit;
    }
    Ok(m)
}

/// The oci-spec set for a mask (for building specs).
pub fn capabilities_of(mask: u64) -> Capabilities {
    NAMES
        .iter()
        .filter(|(_, b)| mask & (1 << b) != 0)
        .filter_map(|(n, _)| serde_json::from_value(serde_json::Value::String((*n).into())).ok())
        .collect()
}

/// Drop every capability not in `keep` from the bounding set: every
/// number a capability set can hold (the kernel's EINVAL for those it
/// does not know is ignored). Nothing is read to find how many there are:
/// inside the sandbox, `/proc/sys/kernel/cap_last_cap` is a path the
/// step's mounts could have chosen the content of.
pub(crate) fn drop_bounding(keep: u64) -> nix::Result<()> {
    for cap in 0..=63u32 {
        if keep & (1 << cap) == 0 {
            // SAFETY: plain prctl with integer arguments.
            let r = unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap as libc::c_ulong, 0, 0, 0) };
            if r != 0 {
                let e = nix::Error::last();
                if e != nix::Error::EINVAL {
                    return Err(e);
                }
            }
        }
    }
    Ok(())
}

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: i32,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

/// Set effective, permitted and inheritable sets of this thread.
pub(crate) fn capset(effective: u64, permitted: u64, inheritable: u64) -> nix::Result<()> {
    const V3: u32 = 0x2008_0522;
    let mut hdr = CapHeader {
        version: V3,
        pid: 0,
    };
    let mut data = [CapData::default(); 2];
    for (i, d) in data.iter_mut().enumerate() {
        let shift = 32 * i as u32;
        d.effective = (effective >> shift) as u32;
        d.permitted = (permitted >> shift) as u32;
        d.inheritable = (inheritable >> shift) as u32;
    }
    // SAFETY: header and two data words as capset(2) wants for version 3.
    let r = unsafe {
        libc::syscall(
            libc::SYS_capset,
            &mut hdr as *mut CapHeader,
            data.as_mut_ptr(),
        )
    };
    if r != 0 {
        return Err(nix::Error::last());
    }
    Ok(())
}

/// Replace the ambient set by `ambient`.
pub(crate) fn set_ambient(ambient: u64) -> nix::Result<()> {
    // SAFETY: plain prctl with integer arguments.
    let r = unsafe {
        libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL as libc::c_ulong,
            0,
            0,
            0,
        )
    };
    if r != 0 {
        return Err(nix::Error::last());
    }
    for cap in 0..64u32 {
        if ambient & (1 << cap) != 0 {
            // SAFETY: as above.
            let r = unsafe {
                libc::prctl(
                    libc::PR_CAP_AMBIENT,
                    libc::PR_CAP_AMBIENT_RAISE as libc::c_ulong,
                    cap as libc::c_ulong,
                    0,
                    0,
                )
            };
            if r != 0 {
                return Err(nix::Error::last());
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_mask_matches_docker() {
        let names = [
            "CHOWN",
            "DAC_OVERRIDE",
            "FOWNER",
            "FSETID",
            "KILL",
            "SETGID",
            "SETUID",
            "SETPCAP",
            "NET_BIND_SERVICE",
            "NET_RAW",
            "SYS_CHROOT",
            "MKNOD",
            "AUDIT_WRITE",
            "SETFCAP",
        ];
        let m = names
            .iter()
            .map(|n| 1u64 << cap_number(n).unwrap())
            .fold(0, |a, b| a | b);
        assert_eq!(m, DEFAULT_CAPS);
    }

    #[test]
    fn oci_set_round_trips() {
        let set = capabilities_of(DEFAULT_CAPS);
        assert_eq!(set.len(), 14);
        assert_eq!(mask_of(&set).unwrap(), DEFAULT_CAPS);
    }
}
