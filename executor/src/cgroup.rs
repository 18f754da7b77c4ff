//! One cgroup per step, on cgroup v1, v2 or a hybrid of both.
//!
//! The step's cgroup is `<hierarchy>/<our own cgroup>/<parent>/<id>` in each
//! hierarchy used: on v1 the `memory`, `cpu`, `pids`, `freezer` and
//! `devices` hierarchies (when mounted), on v2 the unified hierarchy — on a
//! hybrid host only when no v1 `freezer` is there to kill with or a limit
//! needs a controller only v2 offers. Nesting under the caller's own cgroup
//! keeps any limit the caller is under. A limit goes to the v1 hierarchy
//! that has its controller, else to v2 when the unified hierarchy offers
//! it. Killing uses `cgroup.kill` (v2) or freeze + SIGKILL of every listed
//! process (v1).
//!
//! **Entering.** Writing a process's pid to `cgroup.procs` takes a
//! process-wide lock whose first writer waits for an RCU grace period: 5–20
//! ms per step on the kernels we measured, most of a `RUN true`. A thread
//! that writes `0` to a v1 `tasks` file moves itself alone, without that
//! lock (Linux ≥ 5.19), and a process it forks starts where it is. So the
//! thread that starts the sandbox steps into the step's v1 cgroups, starts
//! it and steps back ([`StepCgroup::enter_thread`]); only the unified
//! hierarchy, which moves whole processes, still gets the pid written.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// Failures of cgroup handling.
#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    /// A cgroup file could not be written or read.
    #[error("cgroup {path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// A limit was asked for but no hierarchy offers its controller.
    #[error("cgroup controller {0} is not available on this host")]
    NoController(&'static str),
    /// Limits were asked for, but kiln runs rootless and no cgroup it may
    /// write (a delegated cgroup v2 subtree) is there to hold them.
    #[error(
        "--memory, --cpus and --pids-limit need a cgroup kiln may write: kiln runs rootless and \
         cannot create {path} ({source}); run kiln in a delegated cgroup v2 subtree (e.g. \
         `systemd-run --user --scope -p Delegate=yes kiln ...`), or build without limits"
    )]
    NotDelegated {
        /// The cgroup that could not be created.
        path: PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// Processes survived the kill.
    #[error("cgroup {0}: processes still alive after kill")]
    NotEmpty(PathBuf),
}

/// Limits for a step's cgroup.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Limits {
    /// Memory limit in bytes (swap is limited to the same total).
    pub memory: Option<i64>,
    /// CPU quota (µs per period).
    pub cpu_quota: Option<i64>,
    /// CPU period (µs), default 100000.
    pub cpu_period: Option<u64>,
    /// CPU shares (v1) / weight (v2).
    pub cpu_shares: Option<u64>,
    /// Maximum number of processes.
    pub pids: Option<i64>,
}

impl Limits {
    /// The limits an OCI spec's `linux.resources` asks for.
    pub fn from_spec(spec: &oci_spec::runtime::Spec) -> Limits {
        let mut l = Limits::default();
        let Some(r) = spec.linux().as_ref().and_then(|l| l.resources().as_ref()) else {
            return l;
        };
        if let Some(m) = r.memory() {
            l.memory = m.limit().filter(|v| *v > 0);
        }
        if let Some(c) = r.cpu() {
            l.cpu_quota = c.quota().filter(|v| *v > 0);
            l.cpu_period = c.period();
            l.cpu_shares = c.shares();
        }
        if let Some(p) = r.pids() {
            if p.limit() > 0 {
                l.pids = Some(p.limit());
            }
        }
        l
    }
}

#[derive(Debug, Clone)]
enum Kind {
    V1 { controllers: Vec<String> },
    V2,
}

#[derive(Debug, Clone)]
struct Hierarchy {
    kind: Kind,
    /// Where this process's own cgroup is on disk.
    own_dir: PathBuf,
}

fn io_err(path: &Path, source: std::io::Error) -> CgroupError {
    CgroupError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// The hierarchies mounted here that we use, with our own cgroup in each.
fn discover() -> Result<Vec<Hierarchy>, CgroupError> {
    let mi = Path::new("/proc/self/mountinfo");
    let mountinfo = fs::read_to_string(mi).map_err(|e| io_err(mi, e))?;
    let pc = Path::new("/proc/self/cgroup");
    let own = fs::read_to_string(pc).map_err(|e| io_err(pc, e))?;
    let wanted = ["memory", "cpu", "pids", "freezer", "devices"];
    let mut out = Vec::new();
    for line in mountinfo.lines() {
        let Some((pre, post)) = line.split_once(" - ") else {
            continue;
        };
        let pre: Vec<&str> = pre.split(' ').collect();
        let post: Vec<&str> = post.split(' ').collect();
        let (Some(root), Some(mnt), Some(fstype)) = (pre.get(3), pre.get(4), post.first()) else {
            continue;
        };
        // A hierarchy listed but hidden (a tmpfs mounted over
        // /sys/fs/cgroup, a mount namespace that dropped it) is not there.
        if !is_cgroupfs(Path::new(mnt), *fstype == "cgroup2") {
            continue;
        }
        let rel = |own_path: &str| -> PathBuf {
            let stripped = own_path.strip_prefix(root).unwrap_or(own_path);
            Path::new(mnt).join(stripped.trim_start_matches('/'))
        };
        match *fstype {
            "cgroup2" => {
                let Some(p) = own.lines().find_map(|l| l.strip_prefix("0::")) else {
                    continue;
                };
                if out.iter().any(|h: &Hierarchy| matches!(h.kind, Kind::V2)) {
                    continue;
                }
                out.push(Hierarchy {
                    kind: Kind::V2,
                    own_dir: rel(p),
                });
            }
            "cgroup" => {
                let opts = post.get(2).copied().unwrap_or("");
                let ctrls: Vec<String> = opts
                    .split(',')
                    .filter(|o| wanted.contains(o) || *o == "cpuacct")
                    .map(str::to_string)
                    .collect();
                if !ctrls.iter().any(|c| wanted.contains(&c.as_str())) {
                    continue;
                }
                // Find our path in this hierarchy from /proc/self/cgroup.
                let p = own.lines().find_map(|l| {
                    let mut it = l.splitn(3, ':');
                    let _id = it.next()?;
                    let cs = it.next()?;
                    let path = it.next()?;
                    let set: Vec<&str> = cs.split(',').collect();
                    ctrls
                        .iter()
                        .all(|c| set.contains(&c.as_str()))
                        .then_some(path)
                });
                let Some(p) = p else { continue };
                if out.iter().any(|h| match &h.kind {
                    Kind::V1 { controllers } => controllers == &ctrls,
                    Kind::V2 => false,
                }) {
                    continue;
                }
                out.push(Hierarchy {
                    kind: Kind::V1 { controllers: ctrls },
                    own_dir: rel(p),
                });
            }
            _ => {}
        }
    }
    Ok(out)
}

/// Whether `path` is the root of a mounted cgroup (v1) or cgroup2 file
/// system (mountinfo escapes such as `\040` are not undone: such a path
/// is simply not used).
fn is_cgroupfs(path: &Path, v2: bool) -> bool {
    const CGROUP_SUPER_MAGIC: i64 = 0x0027_e0eb;
    const CGROUP2_SUPER_MAGIC: i64 = 0x6367_7270;
    let Ok(c) = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()) else {
        return false;
    };
    // SAFETY: valid C string, zeroed out-struct.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    if unsafe { libc::statfs(c.as_ptr(), &mut st) } != 0 {
        return false;
    }
    let want = if v2 {
        CGROUP2_SUPER_MAGIC
    } else {
        CGROUP_SUPER_MAGIC
    };
    st.f_type as i64 == want
}

/// Docker's default device allow-list.
const DEFAULT_DEVICE_RULES: &[&str] = &[
    "c *:* m",
    "b *:* m",
    "c 1:3 rwm",
    "c 1:5 rwm",
    "c 1:7 rwm",
    "c 1:8 rwm",
    "c 1:9 rwm",
    "c 5:0 rwm",
    "c 5:1 rwm",
    "c 5:2 rwm",
    "c 136:* rwm",
    "c 10:200 rwm",
];

/// Remove step cgroups left by executor processes that died (e.g.
/// SIGKILLed, so they could not clean up). Step ids start with the pid of
/// the process that created them; only ids whose process is gone are
/// touched. A step's processes may still be exiting when the next run
/// looks (their sandbox died with its executor): whatever is left in such
/// a cgroup is killed, and its removal retried for a moment.
fn sweep_stale(parent: &Path) {
    for e in fs::read_dir(parent).into_iter().flatten().flatten() {
        if !e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
            continue;
        }
        if !stale_owner(&e.file_name().to_string_lossy()) {
            continue;
        }
        let dir = e.path();
        let deadline = Instant::now() + Duration::from_millis(500);
        loop {
            match fs::remove_dir(&dir) {
                Ok(()) => break,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => break,
                Err(_) if Instant::now() < deadline => {
                    for pid in listed_procs(&dir) {
                        let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
                    }
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err(_) => break,
            }
        }
    }
}

/// The pids in a cgroup directory's `cgroup.procs`.
fn listed_procs(dir: &Path) -> Vec<i32> {
    fs::read_to_string(dir.join("cgroup.procs"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect()
}

/// Whether a step id's creating process no longer exists.
pub(crate) fn stale_owner(id: &str) -> bool {
    let Some(pid) = id.split('-').next().and_then(|p| p.parse::<u32>().ok()) else {
        return false;
    };
    pid != std::process::id() && !Path::new("/proc").join(pid.to_string()).exists()
}

/// One step's cgroup, in every hierarchy used.
#[derive(Debug)]
pub struct StepCgroup {
    dirs: Vec<(Kind, PathBuf)>,
    /// This process's own cgroup in the same hierarchy as `dirs[i]`.
    own: Vec<PathBuf>,
}

/// The calling thread inside a step's v1 cgroups (see
/// [`StepCgroup::enter_thread`]); [`ThreadInside::leave`] takes it back.
#[derive(Debug)]
pub struct ThreadInside<'a> {
    cg: &'a StepCgroup,
    /// Indexes into `cg.dirs` of the hierarchies the thread is in (none
    /// once it has left).
    entered: Vec<usize>,
}

/// Writes `0` to `dir/tasks`: moves the calling thread (alone) there.
fn move_this_thread(dir: &Path) -> Result<(), CgroupError> {
    write(&dir.join("tasks"), "0")
}

impl ThreadInside<'_> {
    /// Moves the thread back to the cgroups it came from, and says which
    /// hierarchies it had entered (a process it started meanwhile is in
    /// the step's cgroup there).
    pub fn leave(mut self) -> Result<Vec<usize>, CgroupError> {
        let entered = std::mem::take(&mut self.entered);
        self.cg.leave(&entered)?;
        Ok(entered)
    }
}

impl Drop for ThreadInside<'_> {
    fn drop(&mut self) {
        let _ = self.cg.leave(&self.entered);
    }
}

fn write(path: &Path, value: &str) -> Result<(), CgroupError> {
    fs::write(path, value).map_err(|e| io_err(path, e))
}

impl StepCgroup {
    /// Create `<own>/<parent>/<id>` in each hierarchy and apply `limits`.
    pub fn create(parent: &str, id: &str, limits: &Limits) -> Result<StepCgroup, CgroupError> {
        let hier = discover()?;
        let mut cg = StepCgroup {
            dirs: Vec::new(),
            own: Vec::new(),
        };
        let rootless = kiln_fs::idmap::IdMaps::current().in_userns;
        let mut refused: Option<(PathBuf, std::io::Error)> = None;
        let v1_has = |c: &str| {
            hier.iter().any(|h| match &h.kind {
                Kind::V1 { controllers } => controllers.iter().any(|x| x == c),
                Kind::V2 => false,
            })
        };
        // v1 hierarchies first: whether the unified one is needed depends
        // on which of them could be used.
        let mut order: Vec<&Hierarchy> = hier.iter().collect();
        order.sort_by_key(|h| matches!(h.kind, Kind::V2));
        for h in order {
            sweep_stale(&h.own_dir.join(parent));
            if matches!(h.kind, Kind::V2) && !cg.needs_v2(limits, &v1_has) {
                continue;
            }
            let dir = h.own_dir.join(parent).join(id);
            if let Err(e) = fs::create_dir_all(&dir) {
                // A hierarchy we cannot write to (read-only, not delegated)
                // is skipped unless a limit needs it: the step still runs,
                // its pid namespace still takes every process down with it,
                // and devices are closed by nodev mounts, not cgroups.
                // Rootless, the hierarchies not delegated to us are
                // skipped even with limits: a delegated one may hold them.
                if limits != &Limits::default() && !rootless {
                    let _ = cg.remove();
                    return Err(io_err(&dir, e));
                }
                refused.get_or_insert((dir, e));
                continue;
            }
            cg.dirs.push((h.kind.clone(), dir));
            cg.own.push(h.own_dir.clone());
        }
        let res = cg
            .restrict_devices()
            .and_then(|()| cg.apply(limits, &v1_has, &hier));
        if let Err(e) = res {
            let _ = cg.remove();
            return Err(match (e, refused) {
                (CgroupError::NoController(_), Some((path, source))) if rootless => {
                    CgroupError::NotDelegated { path, source }
                }
                (e, _) => e,
            });
        }
        Ok(cg)
    }

    /// Whether the unified hierarchy is needed beside the v1 directories
    /// made so far: to kill with when no v1 `freezer` could be used, or
    /// for a limit whose controller no v1 hierarchy has.
    fn needs_v2(&self, l: &Limits, v1_has: &dyn Fn(&str) -> bool) -> bool {
        self.v1_dir("freezer").is_none()
            || (l.memory.is_some() && !v1_has("memory"))
            || (l.pids.is_some() && !v1_has("pids"))
            || ((l.cpu_quota.is_some() || l.cpu_shares.is_some()) && !v1_has("cpu"))
    }

    /// Moves the calling thread into the step's v1 cgroups (see the
    /// module notes): a process it forks before [`ThreadInside::leave`]
    /// starts in them, without the grace-period wait of
    /// [`StepCgroup::add_except`]. Hierarchies the thread cannot leave again (its
    /// own cgroup there not writable) are not entered; nor is any when one
    /// fails — [`StepCgroup::add_except`] then writes the pid.
    pub fn enter_thread(&self) -> ThreadInside<'_> {
        let mut inside = ThreadInside {
            cg: self,
            entered: Vec::new(),
        };
        let v1: Vec<usize> = (0..self.dirs.len())
            .filter(|&i| matches!(self.dirs[i].0, Kind::V1 { .. }))
            .collect();
        // Moving to where the thread already is proves the way back.
        if v1.iter().any(|&i| move_this_thread(&self.own[i]).is_err()) {
            return inside;
        }
        for i in v1 {
            if move_this_thread(&self.dirs[i].1).is_err() {
                let _ = self.leave(&std::mem::take(&mut inside.entered));
                return inside;
            }
            inside.entered.push(i);
        }
        inside
    }

    /// Moves the calling thread back from the hierarchies `entered`.
    fn leave(&self, entered: &[usize]) -> Result<(), CgroupError> {
        let mut first_err = None;
        for &i in entered {
            // A retry: a failure here would leave a kiln thread in the
            // step's cgroup (its devices rules, its kill).
            let r = move_this_thread(&self.own[i]).or_else(|_| move_this_thread(&self.own[i]));
            if let Err(e) = r {
                first_err.get_or_insert(e);
            }
        }
        first_err.map_or(Ok(()), Err)
    }

    fn v1_dir(&self, controller: &str) -> Option<&Path> {
        self.dirs.iter().find_map(|(k, d)| match k {
            Kind::V1 { controllers } if controllers.iter().any(|c| c == controller) => {
                Some(d.as_path())
            }
            _ => None,
        })
    }

    fn v2_dir(&self) -> Option<&Path> {
        self.dirs.iter().find_map(|(k, d)| match k {
            Kind::V2 => Some(d.as_path()),
            _ => None,
        })
    }

    /// The v2 dir, with `controller` enabled down the path to it.
    fn v2_with(&self, controller: &'static str, hier: &[Hierarchy]) -> Result<&Path, CgroupError> {
        let dir = self.v2_dir().ok_or(CgroupError::NoController(controller))?;
        let own = hier
            .iter()
            .find(|h| matches!(h.kind, Kind::V2))
            .map(|h| h.own_dir.clone())
            .ok_or(CgroupError::NoController(controller))?;
        let avail = fs::read_to_string(own.join("cgroup.controllers")).unwrap_or_default();
        if !avail.split_whitespace().any(|c| c == controller) {
            return Err(CgroupError::NoController(controller));
        }
        // Enable in own and every level between own and the step.
        let mut p = own.clone();
        let rel = dir.strip_prefix(&own).unwrap_or(dir);
        for comp in rel.components() {
            write(&p.join("cgroup.subtree_control"), &format!("+{controller}"))?;
            p.push(comp);
        }
        Ok(dir)
    }

    fn apply(
        &self,
        l: &Limits,
        v1_has: &dyn Fn(&str) -> bool,
        hier: &[Hierarchy],
    ) -> Result<(), CgroupError> {
        if let Some(mem) = l.memory {
            if v1_has("memory") {
                let d = self
                    .v1_dir("memory")
                    .ok_or(CgroupError::NoController("memory"))?;
                write(&d.join("memory.limit_in_bytes"), &mem.to_string())?;
                let sw = d.join("memory.memsw.limit_in_bytes");
                if sw.exists() {
                    write(&sw, &mem.to_string())?;
                }
            } else {
                let d = self.v2_with("memory", hier)?;
                write(&d.join("memory.max"), &mem.to_string())?;
                let sw = d.join("memory.swap.max");
                if sw.exists() {
                    write(&sw, "0")?;
                }
            }
        }
        if let Some(p) = l.pids {
            let d = if v1_has("pids") {
                self.v1_dir("pids")
                    .ok_or(CgroupError::NoController("pids"))?
            } else {
                self.v2_with("pids", hier)?
            };
            write(&d.join("pids.max"), &p.to_string())?;
        }
        if l.cpu_quota.is_some() || l.cpu_shares.is_some() {
            let period = l.cpu_period.unwrap_or(100_000);
            if v1_has("cpu") {
                let d = self.v1_dir("cpu").ok_or(CgroupError::NoController("cpu"))?;
                if let Some(q) = l.cpu_quota {
                    write(&d.join("cpu.cfs_period_us"), &period.to_string())?;
                    write(&d.join("cpu.cfs_quota_us"), &q.to_string())?;
                }
                if let Some(s) = l.cpu_shares {
                    write(&d.join("cpu.shares"), &s.to_string())?;
                }
            } else {
                let d = self.v2_with("cpu", hier)?;
                if let Some(q) = l.cpu_quota {
                    write(&d.join("cpu.max"), &format!("{q} {period}"))?;
                }
                if let Some(s) = l.cpu_shares {
                    // runc's conversion of shares [2..262144] to weight [1..10000].
                    let w = 1 + ((s.clamp(2, 262_144) - 2) * 9999) / 262_142;
                    write(&d.join("cpu.weight"), &w.to_string())?;
                }
            }
        }
        Ok(())
    }

    /// Docker's default device rules (v1 `devices` controller): nothing but
    /// the standard character devices may be opened; mknod stays allowed.
    /// A second line of defence only: the sandbox's mounts are `nodev`
    /// (see `rootfs`), which holds on v2 and cgroup-less hosts too. (No v2
    /// BPF device program is attached.)
    fn restrict_devices(&self) -> Result<(), CgroupError> {
        let Some(d) = self.v1_dir("devices") else {
            return Ok(());
        };
        write(&d.join("devices.deny"), "a")?;
        for rule in DEFAULT_DEVICE_RULES {
            write(&d.join("devices.allow"), rule)?;
        }
        Ok(())
    }

    /// Move process `pid` into the cgroup (`cgroup.procs`) in every
    /// hierarchy but those `entered` (indexes [`ThreadInside::leave`]
    /// returned: it started there already).
    pub fn add_except(&self, pid: u32, entered: &[usize]) -> Result<(), CgroupError> {
        for (i, (_, d)) in self.dirs.iter().enumerate() {
            if !entered.contains(&i) {
                write(&d.join("cgroup.procs"), &pid.to_string())?;
            }
        }
        Ok(())
    }

    /// The processes in the cgroup — never this one: a kiln thread that
    /// could not leave a step's cgroup lists kiln itself there.
    fn procs(&self) -> Vec<i32> {
        let me = std::process::id() as i32;
        let mut v: Vec<i32> = self
            .dirs
            .iter()
            .flat_map(|(_, d)| listed_procs(d))
            .filter(|&p| p != me)
            .collect();
        v.sort_unstable();
        v.dedup();
        v
    }

    /// Kill every process in the cgroup and wait until it is empty.
    pub fn kill_all(&self) -> Result<(), CgroupError> {
        let deadline = Instant::now() + Duration::from_secs(10);
        if let Some(d) = self.v2_dir() {
            let k = d.join("cgroup.kill");
            if k.exists() {
                write(&k, "1")?;
            }
        }
        let freezer = self.v1_dir("freezer").map(Path::to_path_buf);
        loop {
            let procs = self.procs();
            if procs.is_empty() {
                return Ok(());
            }
            // Freeze so nothing forks between listing and killing.
            if let Some(f) = &freezer {
                let _ = fs::write(f.join("freezer.state"), "FROZEN");
            }
            for p in self.procs() {
                let _ = kill(Pid::from_raw(p), Signal::SIGKILL);
            }
            if let Some(f) = &freezer {
                let _ = fs::write(f.join("freezer.state"), "THAWED");
            }
            if Instant::now() > deadline {
                let d = self
                    .dirs
                    .first()
                    .map(|(_, d)| d.clone())
                    .unwrap_or_default();
                return Err(CgroupError::NotEmpty(d));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Kill everything and remove the cgroup directories.
    pub fn remove(&self) -> Result<(), CgroupError> {
        let killed = self.kill_all();
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut last = None;
        for (_, d) in &self.dirs {
            loop {
                match fs::remove_dir(d) {
                    Ok(()) => break,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => break,
                    Err(e) if Instant::now() < deadline => {
                        let _ = e;
                        std::thread::sleep(Duration::from_millis(10));
                    }
                    Err(e) => {
                        last = Some(io_err(d, e));
                        break;
                    }
                }
            }
        }
        killed?;
        match last {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// The directories of this cgroup (one per hierarchy).
    pub fn paths(&self) -> Vec<PathBuf> {
        self.dirs.iter().map(|(_, d)| d.clone()).collect()
    }
}
