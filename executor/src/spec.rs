//! Building Docker-like runtime specs for build steps.

use oci_spec::runtime::{
    LinuxBuilder, LinuxCapabilitiesBuilder, LinuxNamespace, LinuxNamespaceBuilder,
    LinuxNamespaceType, ProcessBuilder, RootBuilder, Spec, UserBuilder,
};

use crate::caps::{capabilities_of, DEFAULT_CAPS};
use crate::init::DEFAULT_PATH;
use crate::rootfs::{DEFAULT_MASKED_PATHS, DEFAULT_READONLY_PATHS};

/// Network of a step.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum NetworkMode {
    /// The host's network namespace (BuildKit's default without CNI).
    #[default]
    Host,
    /// A fresh network namespace with only `lo` up.
    None,
}

fn ns(typ: LinuxNamespaceType) -> Option<LinuxNamespace> {
    LinuxNamespaceBuilder::default().typ(typ).build().ok()
}

/// A Docker-like spec for running `args` as root in `/`: Docker's default
/// capabilities and seccomp profile (the `linux.seccomp` section of
/// [`crate::default_seccomp`]; set it to `None` to run unconfined),
/// no_new_privs off, hostname `kiln`, mount/pid/uts/ipc/cgroup
/// namespaces (host network), runc's masked and read-only paths, default
/// PATH. Adjust with the oci-spec setters.
///
/// ```
/// let spec = kiln_executor::default_spec(vec!["/bin/sh".into(), "-c".into(), "echo hi".into()]);
/// assert_eq!(spec.hostname().as_deref(), Some("kiln"));
/// assert!(spec.linux().as_ref().unwrap().seccomp().is_some());
/// ```
pub fn default_spec(args: Vec<String>) -> Spec {
    let caps = LinuxCapabilitiesBuilder::default()
        .bounding(capabilities_of(DEFAULT_CAPS))
        .effective(capabilities_of(DEFAULT_CAPS))
        .permitted(capabilities_of(DEFAULT_CAPS))
        .inheritable(capabilities_of(0))
        .ambient(capabilities_of(0))
        .build()
        .ok();
    let mut process = ProcessBuilder::default()
        .args(args)
        .env(vec![format!("PATH={DEFAULT_PATH}")])
        .cwd("/")
        .no_new_privileges(false)
        .build()
        .unwrap_or_default();
    process.set_capabilities(caps);
    process.set_rlimits(None);
    if let Ok(u) = UserBuilder::default().uid(0u32).gid(0u32).build() {
        process.set_user(u);
    }
    let namespaces: Vec<LinuxNamespace> = [
        LinuxNamespaceType::Mount,
        LinuxNamespaceType::Pid,
        LinuxNamespaceType::Uts,
        LinuxNamespaceType::Ipc,
        LinuxNamespaceType::Cgroup,
    ]
    .into_iter()
    .filter_map(ns)
    .collect();
    let linux = LinuxBuilder::default()
        .namespaces(namespaces)
        .masked_paths(
            DEFAULT_MASKED_PATHS
                .iter()
                .map(|s| s.to_string())
                .collect::<Vec<_>>(),
        )
        .readonly_paths(
            DEFAULT_READONLY_PATHS
                .iter()
                .map(|s| s.to_string())
                .collect::<Vec<_>>(),
        )
        .seccomp(crate::seccomp::default_seccomp())
        .build()
        .ok();
    let mut spec = Spec::default();
    spec.set_process(Some(process));
    // Build steps write to their rootfs.
    spec.set_root(
        RootBuilder::default()
            .path("rootfs")
            .readonly(false)
            .build()
            .ok(),
    );
    spec.set_hostname(Some("kiln".into()));
    spec.set_linux(linux);
    spec.set_mounts(Some(Vec::new()));
    spec
}

/// Set the network of `spec`: `None` adds a fresh network namespace, `Host`
/// removes it.
pub fn set_network(spec: &mut Spec, mode: NetworkMode) {
    let mut linux = spec.linux().clone().unwrap_or_default();
    let mut list = linux.namespaces().clone().unwrap_or_default();
    list.retain(|n| n.typ() != LinuxNamespaceType::Network);
    if mode == NetworkMode::None {
        list.extend(ns(LinuxNamespaceType::Network));
    }
    linux.set_namespaces(Some(list));
    spec.set_linux(Some(linux));
}
