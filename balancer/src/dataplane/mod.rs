//! Loading, attaching and pinning the XDP program, and typed access to its maps.
//!
//! With a pin directory, maps and links live in bpffs: a new controller adopts them (same ABI)
//! and swaps its program in atomically through the pinned link, so established flows never
//! notice a restart. Rings are written through a shared mapping of the ring array (one memcpy),
//! then made live by flipping the service's `ring_half` (one map update).

use std::{
    collections::HashMap as StdHashMap,
    fs,
    os::fd::{AsFd, AsRawFd},
    path::{Path, PathBuf},
};

use aya::{
    Ebpf, EbpfError, EbpfLoader,
    maps::{Array, HashMap, Map, MapData, MapError, PerCpuArray},
    pin::PinError,
    programs::{
        ProgramError, Xdp,
        links::{FdLink, LinkError, PinnedLink},
        xdp::{XdpLink, XdpMode},
    },
};
use balancer_common::{
    ABI_VERSION, ALL_MAPS, Backend, Counters, Flow, FlowKey, Globals, IFMAC_SLOTS, IfMac,
    MAP_BACKEND_STATS, MAP_BACKENDS, MAP_FLOWS, MAP_GLOBALS, MAP_IFMACS, MAP_IFMACS_HIGH,
    MAP_MIRROR, MAP_MIRROR_STATS, MAP_PORTS, MAP_REASONS, MAP_RINGS, MAP_SERVICE_STATS,
    MAP_SERVICES, MAP_VLAN_PORTS, MAP_VLANS, MAX_BACKENDS, MAX_SERVICES, MirrorCounters,
    PORT_WORDS, PROGRAM_NAME, REASONS, RING_MAX, RING_WORDS, Reason, Service, ServiceKey, VlanDev,
    VlanIn, VlanPort, ring_index,
};
use tracing::{info, warn};

use crate::config;

pub mod counters;
pub mod maglev;
pub mod mirror;

/// What failed while loading, attaching, pinning or accessing the dataplane. The messages
/// name the step; the cause is the [`std::error::Error::source`] (print the whole chain,
/// e.g. with [`crate::api::chain`], to see both).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// bpffs could not be mounted on /sys/fs/bpf.
    #[error("mounting bpffs on /sys/fs/bpf")]
    MountBpffs(#[source] nix::Error),
    /// The pin directory could not be created.
    #[error("creating {}", path.display())]
    CreateDir {
        /// The directory.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The pin directory is not on a bpf filesystem.
    #[error("{} is not on a bpf filesystem", path.display())]
    NotBpffs {
        /// The directory.
        path: PathBuf,
    },
    /// The pin directory could not be listed.
    #[error("reading pin dir {}", path.display())]
    ReadPinDir {
        /// The directory.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// An eBPF object (`what`: the XDP or the pass object) could not be loaded.
    #[error("loading the {what} object")]
    LoadObject {
        /// Which object.
        what: &'static str,
        /// Why.
        #[source]
        source: EbpfError,
    },
    /// The object has no program of that name.
    #[error("program {0} missing from the object")]
    ProgramMissing(&'static str),
    /// `Dataplane::open_pinned` has maps only: there is no program to run or attach.
    #[error("no program loaded")]
    NoProgram,
    /// The kernel's verifier refused the XDP program.
    #[error("the kernel refused the XDP program ({io_error}); verifier log:\n{verifier_log}")]
    Verifier {
        /// The error of the load syscall.
        io_error: std::io::Error,
        /// The verifier's log.
        verifier_log: String,
    },
    /// A step on a program (loading, attaching, taking its link; `what` names it) failed.
    #[error("{what}")]
    Program {
        /// The step.
        what: String,
        /// Why.
        #[source]
        source: ProgramError,
    },
    /// A step on an XDP link (opening the pinned one, converting it; `what` names it) failed.
    #[error("{what}")]
    Link {
        /// The step.
        what: String,
        /// Why.
        #[source]
        source: LinkError,
    },
    /// A link could not be pinned.
    #[error("pinning {}", path.display())]
    PinLink {
        /// Where.
        path: PathBuf,
        /// Why.
        #[source]
        source: PinError,
    },
    /// The object has no map of that name.
    #[error("map {0} missing from the object")]
    MapMissing(String),
    /// A map is not of the type this controller expects.
    #[error("map {name} has an unexpected type")]
    MapType {
        /// The map.
        name: String,
        /// The conversion's error, when there was one.
        #[source]
        source: Option<MapError>,
    },
    /// `open_pinned` found no pinned dataplane.
    #[error("no dataplane pinned at {}", dir.display())]
    NotPinned {
        /// The pin directory.
        dir: PathBuf,
    },
    /// `open_pinned` found a dataplane of another ABI or flow-table size.
    #[error("pinned dataplane at {} is of another version: {why}", dir.display())]
    PinnedMismatch {
        /// The pin directory.
        dir: PathBuf,
        /// What differs.
        why: String,
    },
    /// A pinned map could not be opened.
    #[error("opening pinned map {name}")]
    OpenPinned {
        /// The map.
        name: String,
        /// Why.
        #[source]
        source: MapError,
    },
    /// A map read or write (`what` names it: "writing globals", …) failed.
    #[error("{what}")]
    Map {
        /// The access.
        what: &'static str,
        /// Why.
        #[source]
        source: MapError,
    },
    /// One of a batch of mirrored flow entries was refused.
    #[error("installing flow entry {index} of {total} (the ones before are written)")]
    InstallFlow {
        /// Its position, from 1.
        index: usize,
        /// The batch's size.
        total: usize,
        /// Why.
        #[source]
        source: MapError,
    },
    /// The mirror ring buffer was taken by an earlier `mirror_reader`.
    #[error("the mirror ring buffer is already taken")]
    MirrorTaken,
    /// A ring does not fit the ring array.
    #[error("ring out of range (service {id}, half {half}, {len} slots)")]
    RingOutOfRange {
        /// The service id.
        id: u32,
        /// The half.
        half: u32,
        /// The ring's size.
        len: usize,
    },
    /// The ring array could not be mapped.
    #[error("mmap of the ring map")]
    MmapRings(#[source] std::io::Error),
    /// The number of CPUs (for per-CPU values) could not be read.
    #[error("reading the number of possible CPUs ({what})")]
    NrCpus {
        /// The file or step aya names.
        what: &'static str,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A host look-up (the interface's index) failed.
    #[error(transparent)]
    Host(#[from] crate::host::Error),
}

/// A dataplane result.
pub type Result<T, E = Error> = std::result::Result<T, E>;

fn prog_err(what: impl Into<String>) -> impl FnOnce(ProgramError) -> Error {
    let what = what.into();
    move |source| Error::Program { what, source }
}

fn link_err(what: impl Into<String>) -> impl FnOnce(LinkError) -> Error {
    let what = what.into();
    move |source| Error::Link { what, source }
}

fn map_err(what: &'static str) -> impl FnOnce(MapError) -> Error {
    move |source| Error::Map { what, source }
}

/// Makes the hash map `map` hold exactly `want`: new and changed entries written, stale ones
/// removed (one already gone counts as removed). Returns how many entries changed.
fn sync_hash<K, V>(
    map: &mut HashMap<MapData, K, V>,
    want: &StdHashMap<K, V>,
    what: &'static str,
) -> Result<usize>
where
    K: aya::Pod + Eq + std::hash::Hash,
    V: aya::Pod + PartialEq,
{
    let old: StdHashMap<K, V> = map.iter().filter_map(Result::ok).collect();
    let mut changed = 0;
    for (k, v) in want {
        if old.get(k) != Some(v) {
            map.insert(k, v, 0).map_err(map_err(what))?;
            changed += 1;
        }
    }
    for k in old.keys().filter(|k| !want.contains_key(k)) {
        match map.remove(k) {
            Ok(()) | Err(MapError::KeyNotFound) => changed += 1,
            Err(e) => return Err(map_err(what)(e)),
        }
    }
    Ok(changed)
}

fn map_type(name: &str) -> impl FnOnce(MapError) -> Error + '_ {
    move |source| Error::MapType {
        name: name.to_string(),
        source: Some(source),
    }
}

fn zeroed_per_cpu() -> Result<aya::maps::PerCpuValues<Counters>> {
    let n = aya::util::nr_cpus().map_err(|(what, source)| Error::NrCpus { what, source })?;
    aya::maps::PerCpuValues::try_from(vec![Counters::default(); n]).map_err(|source| {
        Error::NrCpus {
            what: "a value per CPU",
            source,
        }
    })
}

/// The compiled XDP object, built by build.rs.
pub static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/balancer"));

/// A bare XDP_PASS object (for veth peers in labs), built by build.rs.
pub static PASS_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/pass"));

/// Attaches the bare pass program to `interface` in driver mode and pins its link at `pin`
/// (the peer of a veth the balancer transmits into needs an XDP program to receive frames).
pub fn attach_pass(interface: &str, pin: &Path) -> Result<()> {
    if let Some(dir) = pin.parent() {
        ensure_bpffs(dir)?;
    }
    if pin.exists() {
        return Ok(());
    }
    let mut ebpf = Ebpf::load(PASS_OBJECT).map_err(|source| Error::LoadObject {
        what: "pass",
        source,
    })?;
    let prog: &mut Xdp = ebpf
        .program_mut("pass")
        .ok_or(Error::ProgramMissing("pass"))?
        .try_into()
        .map_err(prog_err("pass is not an XDP program"))?;
    load_xdp(prog).map_err(prog_err("loading the pass program"))?;
    let id = prog
        .attach(interface, XdpMode::Driver)
        .map_err(prog_err(format!("attaching pass to {interface}")))?;
    let link = prog
        .take_link(id)
        .map_err(prog_err("taking the pass link"))?;
    let link = FdLink::try_from(link).map_err(link_err("pass link"))?;
    link.pin(pin).map_err(|source| Error::PinLink {
        path: pin.to_path_buf(),
        source,
    })?;
    Ok(())
}

/// How to load.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// Pin directory; `None` keeps everything private to this process (tests, benches).
    pub pin_path: Option<PathBuf>,
    /// Flow-table entries.
    pub flow_entries: u32,
}

/// The ring array, mapped into this process.
struct Rings {
    ptr: *mut u32,
    len: usize,
}

// SAFETY: the mapping is plain memory shared with the kernel; we only write through &mut self.
unsafe impl Send for Rings {}
unsafe impl Sync for Rings {}

impl Drop for Rings {
    fn drop(&mut self) {
        // SAFETY: ptr/len come from a successful mmap.
        unsafe { libc::munmap(self.ptr.cast(), self.len * 4) };
    }
}

/// A loaded program and its maps.
pub struct Dataplane {
    ebpf: Option<Ebpf>,
    services: HashMap<MapData, ServiceKey, Service>,
    backends: Array<MapData, Backend>,
    flows: HashMap<MapData, FlowKey, Flow>,
    svc_stats: PerCpuArray<MapData, Counters>,
    be_stats: PerCpuArray<MapData, Counters>,
    reasons: PerCpuArray<MapData, u64>,
    globals: Array<MapData, Globals>,
    /// The mirror ring buffer, until [`Dataplane::mirror_reader`] takes it.
    mirror: Option<Map>,
    mirror_stats: PerCpuArray<MapData, MirrorCounters>,
    /// Interface MACs by ifindex below [`IFMAC_SLOTS`] (all-zero: none recorded).
    ifmacs: Array<MapData, IfMac>,
    /// Interface MACs of a higher ifindex.
    ifmacs_high: HashMap<MapData, u32, IfMac>,
    vlans: HashMap<MapData, u32, VlanDev>,
    vlan_ports: HashMap<MapData, VlanPort, VlanIn>,
    ports: Array<MapData, u64>,
    /// What `ports` holds, read when the controller loads or adopts the maps (it is their only
    /// writer) and kept up to date, so a plan compares and writes without reading 1024 words
    /// each time. Empty for readers ([`Dataplane::open_pinned`]): they read the map.
    port_cache: Vec<u64>,
    rings: Rings,
    pin_path: Option<PathBuf>,
    /// True when the maps were adopted from a previous controller.
    pub adopted: bool,
}

fn take<T: TryFrom<Map, Error = MapError>>(ebpf: &mut Ebpf, name: &str) -> Result<T> {
    let map = ebpf
        .take_map(name)
        .ok_or_else(|| Error::MapMissing(name.to_string()))?;
    T::try_from(map).map_err(map_type(name))
}

/// Makes sure `dir` is on a bpffs, mounting one at /sys/fs/bpf when nothing is there.
fn ensure_bpffs(dir: &Path) -> Result<()> {
    const BPF_FS_MAGIC: i64 = 0xcafe4a11;
    let root = Path::new("/sys/fs/bpf");
    let is_bpffs = |p: &Path| {
        nix::sys::statfs::statfs(p)
            .map(|s| s.filesystem_type().0 == BPF_FS_MAGIC)
            .unwrap_or(false)
    };
    if dir.starts_with(root) && !is_bpffs(root) {
        fs::create_dir_all(root).ok();
        nix::mount::mount(
            Some("bpf"),
            root,
            Some("bpf"),
            nix::mount::MsFlags::empty(),
            None::<&str>,
        )
        .map_err(Error::MountBpffs)?;
        info!("mounted bpffs on /sys/fs/bpf");
    }
    fs::create_dir_all(dir).map_err(|source| Error::CreateDir {
        path: dir.to_path_buf(),
        source,
    })?;
    if !is_bpffs(dir) {
        return Err(Error::NotBpffs {
            path: dir.to_path_buf(),
        });
    }
    Ok(())
}

/// Loads an XDP program into the kernel, trying again when the verifier was interrupted: it
/// gives up with `EAGAIN` when a signal reaches the loading thread (a SIGHUP to the daemon,
/// a child exiting), and our program takes it seconds on a busy host. libbpf retries the
/// same way.
fn load_xdp(prog: &mut Xdp) -> std::result::Result<(), ProgramError> {
    const ATTEMPTS: usize = 5;
    let mut attempt = 1;
    loop {
        match prog.load() {
            Err(ProgramError::LoadError { io_error, .. })
                if io_error.raw_os_error() == Some(libc::EAGAIN) && attempt < ATTEMPTS =>
            {
                attempt += 1;
                warn!(
                    attempt,
                    "the verifier was interrupted: loading the program again"
                );
            }
            r => return r,
        }
    }
}

/// Why pinned state cannot be adopted, if it cannot.
fn pinned_mismatch(dir: &Path, flow_entries: u32) -> Option<String> {
    let g = dir.join(MAP_GLOBALS);
    if !g.exists() {
        return None;
    }
    let globals = match MapData::from_pin(&g)
        .map(Map::Array)
        .and_then(Array::<_, Globals>::try_from)
    {
        Ok(a) => a,
        Err(e) => return Some(format!("globals map unreadable: {e}")),
    };
    match globals.get(&0, 0) {
        Ok(v) if v.abi_version == ABI_VERSION => {}
        Ok(v) => {
            return Some(format!(
                "ABI {} pinned, {} here",
                v.abi_version, ABI_VERSION
            ));
        }
        Err(e) => return Some(format!("globals unreadable: {e}")),
    }
    match MapData::from_pin(dir.join(MAP_FLOWS)).and_then(|m| m.info()) {
        Ok(info) if info.max_entries() == flow_entries => None,
        Ok(info) => Some(format!(
            "flow table of {} entries pinned, {} configured",
            info.max_entries(),
            flow_entries
        )),
        Err(e) => Some(format!("flow table unreadable: {e}")),
    }
}

/// Removes every pinned object under `dir` (links first, which detaches the program).
pub fn remove_pins(dir: &Path) -> Result<()> {
    let Ok(entries) = fs::read_dir(dir) else {
        return Ok(());
    };
    for e in entries.flatten() {
        let p = e.path();
        let name = e.file_name().to_string_lossy().to_string();
        if name.starts_with("link-") {
            match PinnedLink::from_pin(&p) {
                Ok(l) => {
                    let _ = l.unpin();
                    info!(link = %p.display(), "xdp link removed");
                }
                Err(e) => warn!(link = %p.display(), error = %e, "cannot open pinned link"),
            }
        }
    }
    let entries = fs::read_dir(dir).map_err(|source| Error::ReadPinDir {
        path: dir.to_path_buf(),
        source,
    })?;
    for e in entries.flatten() {
        let _ = fs::remove_file(e.path());
    }
    let _ = fs::remove_dir(dir);
    Ok(())
}

impl Dataplane {
    /// Loads the program, adopting pinned maps when their layout matches.
    pub fn load(opts: &LoadOptions) -> Result<Self> {
        let mut adopted = false;
        let mut loader = EbpfLoader::new();
        loader.map_max_entries(MAP_FLOWS, opts.flow_entries);
        let pin_paths: Vec<(&str, PathBuf)> = match &opts.pin_path {
            Some(dir) => {
                ensure_bpffs(dir)?;
                if let Some(why) = pinned_mismatch(dir, opts.flow_entries) {
                    warn!(pin_path = %dir.display(), reason = %why, "pinned dataplane does not match: replacing it");
                    remove_pins(dir)?;
                    ensure_bpffs(dir)?;
                } else if dir.join(MAP_GLOBALS).exists() {
                    adopted = true;
                }
                ALL_MAPS.iter().map(|n| (*n, dir.join(n))).collect()
            }
            None => Vec::new(),
        };
        for (name, path) in &pin_paths {
            loader.map_pin_path(name, path.as_path());
        }
        let mut ebpf = loader.load(OBJECT).map_err(|source| Error::LoadObject {
            what: "XDP",
            source,
        })?;
        {
            let prog: &mut Xdp = ebpf
                .program_mut(PROGRAM_NAME)
                .ok_or(Error::ProgramMissing(PROGRAM_NAME))?
                .try_into()
                .map_err(prog_err(format!("{PROGRAM_NAME} is not an XDP program")))?;
            if let Err(e) = load_xdp(prog) {
                return Err(match e {
                    ProgramError::LoadError {
                        io_error,
                        verifier_log,
                    } => Error::Verifier {
                        io_error,
                        verifier_log: verifier_log.to_string(),
                    },
                    e => prog_err("loading the XDP program")(e),
                });
            }
        }
        let rings_map = ebpf
            .take_map(MAP_RINGS)
            .ok_or_else(|| Error::MapMissing(MAP_RINGS.to_string()))?;
        let Map::Array(rings_data) = &rings_map else {
            return Err(Error::MapType {
                name: MAP_RINGS.to_string(),
                source: None,
            });
        };
        let rings = map_rings(rings_data.fd().as_fd().as_raw_fd())?;
        drop(rings_map);
        let mut dp = Dataplane {
            services: take(&mut ebpf, MAP_SERVICES)?,
            backends: take(&mut ebpf, MAP_BACKENDS)?,
            flows: take(&mut ebpf, MAP_FLOWS)?,
            svc_stats: take(&mut ebpf, MAP_SERVICE_STATS)?,
            be_stats: take(&mut ebpf, MAP_BACKEND_STATS)?,
            reasons: take(&mut ebpf, MAP_REASONS)?,
            globals: take(&mut ebpf, MAP_GLOBALS)?,
            mirror: Some(
                ebpf.take_map(MAP_MIRROR)
                    .ok_or_else(|| Error::MapMissing(MAP_MIRROR.to_string()))?,
            ),
            mirror_stats: take(&mut ebpf, MAP_MIRROR_STATS)?,
            ifmacs: take(&mut ebpf, MAP_IFMACS)?,
            ifmacs_high: take(&mut ebpf, MAP_IFMACS_HIGH)?,
            vlans: take(&mut ebpf, MAP_VLANS)?,
            vlan_ports: take(&mut ebpf, MAP_VLAN_PORTS)?,
            port_cache: Vec::new(),
            ports: take(&mut ebpf, MAP_PORTS)?,
            ebpf: Some(ebpf),
            rings,
            pin_path: opts.pin_path.clone(),
            adopted,
        };
        // The controller's copy of the port filter (readers of open_pinned read the map).
        dp.port_cache = dp.port_words()?;
        if !adopted {
            dp.set_globals(Globals {
                abi_version: ABI_VERSION,
                ..Globals::default()
            })?;
        }
        Ok(dp)
    }

    /// Opens the maps pinned under `dir` (no program): for `balancer counters` and status.
    pub fn open_pinned(dir: &Path) -> Result<Self> {
        if !dir.join(MAP_GLOBALS).exists() {
            return Err(Error::NotPinned {
                dir: dir.to_path_buf(),
            });
        }
        let flow_entries = MapData::from_pin(dir.join(MAP_FLOWS))
            .map_err(|source| Error::OpenPinned {
                name: MAP_FLOWS.to_string(),
                source,
            })?
            .info()
            .map_err(map_err("reading the pinned flow table's size"))?
            .max_entries();
        if let Some(why) = pinned_mismatch(dir, flow_entries) {
            return Err(Error::PinnedMismatch {
                dir: dir.to_path_buf(),
                why,
            });
        }
        let open = |n: &str| -> Result<Map> {
            let data = MapData::from_pin(dir.join(n)).map_err(|source| Error::OpenPinned {
                name: n.to_string(),
                source,
            })?;
            Ok(match n {
                MAP_SERVICES | MAP_IFMACS_HIGH | MAP_VLANS | MAP_VLAN_PORTS => Map::HashMap(data),
                MAP_FLOWS => Map::LruHashMap(data),
                MAP_SERVICE_STATS | MAP_BACKEND_STATS | MAP_REASONS | MAP_MIRROR_STATS => {
                    Map::PerCpuArray(data)
                }
                MAP_MIRROR => Map::RingBuf(data),
                _ => Map::Array(data),
            })
        };
        let rings_map = open(MAP_RINGS)?;
        let Map::Array(rings_data) = &rings_map else {
            return Err(Error::MapType {
                name: MAP_RINGS.to_string(),
                source: None,
            });
        };
        let rings = map_rings(rings_data.fd().as_fd().as_raw_fd())?;
        Ok(Dataplane {
            services: HashMap::try_from(open(MAP_SERVICES)?).map_err(map_type(MAP_SERVICES))?,
            backends: Array::try_from(open(MAP_BACKENDS)?).map_err(map_type(MAP_BACKENDS))?,
            flows: HashMap::try_from(open(MAP_FLOWS)?).map_err(map_type(MAP_FLOWS))?,
            svc_stats: PerCpuArray::try_from(open(MAP_SERVICE_STATS)?)
                .map_err(map_type(MAP_SERVICE_STATS))?,
            be_stats: PerCpuArray::try_from(open(MAP_BACKEND_STATS)?)
                .map_err(map_type(MAP_BACKEND_STATS))?,
            reasons: PerCpuArray::try_from(open(MAP_REASONS)?).map_err(map_type(MAP_REASONS))?,
            globals: Array::try_from(open(MAP_GLOBALS)?).map_err(map_type(MAP_GLOBALS))?,
            mirror: Some(open(MAP_MIRROR)?),
            mirror_stats: PerCpuArray::try_from(open(MAP_MIRROR_STATS)?)
                .map_err(map_type(MAP_MIRROR_STATS))?,
            ifmacs: Array::try_from(open(MAP_IFMACS)?).map_err(map_type(MAP_IFMACS))?,
            ifmacs_high: HashMap::try_from(open(MAP_IFMACS_HIGH)?)
                .map_err(map_type(MAP_IFMACS_HIGH))?,
            vlans: HashMap::try_from(open(MAP_VLANS)?).map_err(map_type(MAP_VLANS))?,
            vlan_ports: HashMap::try_from(open(MAP_VLAN_PORTS)?)
                .map_err(map_type(MAP_VLAN_PORTS))?,
            port_cache: Vec::new(),
            ports: Array::try_from(open(MAP_PORTS)?).map_err(map_type(MAP_PORTS))?,
            ebpf: None,
            rings,
            pin_path: Some(dir.to_path_buf()),
            adopted: true,
        })
    }

    /// A bare XDP_PASS program from the same object, loaded, for benchmarks.
    pub fn baseline_program(&mut self) -> Result<&Xdp> {
        let ebpf = self.ebpf.as_mut().ok_or(Error::NoProgram)?;
        let prog: &mut Xdp = ebpf
            .program_mut("pass_baseline")
            .ok_or(Error::ProgramMissing("pass_baseline"))?
            .try_into()
            .map_err(prog_err("pass_baseline is not an XDP program"))?;
        if prog.fd().is_err() {
            load_xdp(prog).map_err(prog_err("loading the pass_baseline program"))?;
        }
        Ok(prog)
    }

    /// The program, for test runs.
    pub fn program(&self) -> Result<&Xdp> {
        self.ebpf
            .as_ref()
            .ok_or(Error::NoProgram)?
            .program(PROGRAM_NAME)
            .ok_or(Error::ProgramMissing(PROGRAM_NAME))?
            .try_into()
            .map_err(prog_err(format!("{PROGRAM_NAME} is not an XDP program")))
    }

    fn program_mut(&mut self) -> Result<&mut Xdp> {
        self.ebpf
            .as_mut()
            .ok_or(Error::NoProgram)?
            .program_mut(PROGRAM_NAME)
            .ok_or(Error::ProgramMissing(PROGRAM_NAME))?
            .try_into()
            .map_err(prog_err(format!("{PROGRAM_NAME} is not an XDP program")))
    }

    /// Attaches to `interface`: through the pinned link when there is one (atomic program
    /// swap), else a new link (driver mode, or skb mode as configured or as a fallback).
    ///
    /// First records the interface's MAC in `BLB_IFMACS`, so the program passes unicast
    /// frames addressed to another MAC (a switch flooding them) instead of forwarding them.
    /// A MAC that cannot be read is logged and that interface goes unchecked (its entry is
    /// removed): the check guards against flooded frames, it is no reason to refuse a start.
    pub fn attach(&mut self, interface: &str, mode: config::XdpMode) -> Result<()> {
        let ifindex = crate::host::net::ifindex(interface)?;
        match crate::host::net::interface_mac(interface) {
            Ok(mac) => {
                self.set_interface_mac(ifindex, Some(mac))?;
                info!(interface, mac = %fmt_mac(&mac), "frames to other unicast MACs are passed");
            }
            Err(e) => {
                self.set_interface_mac(ifindex, None)?;
                warn!(interface, error = %e, "interface MAC unknown: its frames' destination MAC is not checked");
            }
        }
        let link_pin = self
            .pin_path
            .as_ref()
            .map(|d| d.join(format!("link-{interface}")));
        if let Some(lp) = &link_pin
            && lp.exists()
        {
            let pinned =
                PinnedLink::from_pin(lp).map_err(link_err("opening the pinned XDP link"))?;
            let fd_link: FdLink = pinned.into();
            let xdp_link =
                XdpLink::try_from(fd_link).map_err(link_err("pinned link is not an XDP link"))?;
            let prog = self.program_mut()?;
            let id = prog
                .attach_to_link(xdp_link)
                .map_err(prog_err("swapping the program into the pinned link"))?;
            // The pin keeps the link; forget our handle so dropping it detaches nothing.
            let link = prog
                .take_link(id)
                .map_err(prog_err("taking the XDP link"))?;
            std::mem::forget(link);
            info!(
                interface,
                "xdp program swapped into the pinned link (flows untouched)"
            );
            return Ok(());
        }
        let try_mode = |prog: &mut Xdp, m: XdpMode| prog.attach(interface, m);
        let prog = self.program_mut()?;
        let id = match mode {
            config::XdpMode::Driver => {
                try_mode(prog, XdpMode::Driver).map_err(prog_err("attaching in driver mode"))?
            }
            config::XdpMode::Skb => {
                try_mode(prog, XdpMode::Skb).map_err(prog_err("attaching in skb mode"))?
            }
            config::XdpMode::Auto => match try_mode(prog, XdpMode::Driver) {
                Ok(id) => {
                    info!(interface, mode = "driver", "xdp attached");
                    id
                }
                Err(e) => {
                    warn!(interface, error = %e, "driver-mode XDP unavailable, falling back to skb mode");
                    try_mode(prog, XdpMode::Skb).map_err(prog_err("attaching in skb mode"))?
                }
            },
        };
        let link = prog
            .take_link(id)
            .map_err(prog_err("taking the XDP link"))?;
        match (link_pin, FdLink::try_from(link)) {
            (Some(lp), Ok(fd_link)) => {
                fd_link
                    .pin(&lp)
                    .map_err(|source| Error::PinLink { path: lp, source })?;
            }
            (None, Ok(fd_link)) => {
                // Private dataplane (tests): keep the link alive as long as this process.
                std::mem::forget(fd_link);
            }
            (_, Err(e)) => {
                warn!(interface, error = %e, "kernel gave a netlink XDP attachment: it stays until `balancer teardown`");
            }
        }
        Ok(())
    }

    /// Records (`Some`) or forgets (`None`) the MAC of interface `ifindex`: the program
    /// passes a unicast frame that came in on it addressed to another MAC. Without an entry
    /// it does not look at the destination MAC.
    pub fn set_interface_mac(&mut self, ifindex: u32, mac: Option<[u8; 6]>) -> Result<()> {
        let value = IfMac {
            mac: mac.unwrap_or_default(),
            pad: [0; 2],
        };
        if ifindex < IFMAC_SLOTS {
            // All-zero is "none recorded".
            return self
                .ifmacs
                .set(ifindex, value, 0)
                .map_err(map_err("writing the interface MAC"));
        }
        match mac {
            Some(_) => self
                .ifmacs_high
                .insert(ifindex, value, 0)
                .map_err(map_err("writing the interface MAC")),
            None => match self.ifmacs_high.remove(&ifindex) {
                Ok(()) | Err(aya::maps::MapError::KeyNotFound) => Ok(()),
                Err(e) => Err(map_err("removing the interface MAC")(e)),
            },
        }
    }

    /// The MAC recorded for interface `ifindex`, if any.
    fn interface_mac(&self, ifindex: u32) -> Option<[u8; 6]> {
        let m = if ifindex < IFMAC_SLOTS {
            self.ifmacs.get(&ifindex, 0).ok()
        } else {
            self.ifmacs_high.get(&ifindex, 0).ok()
        };
        m.map(|m| m.mac).filter(|m| *m != [0; 6])
    }

    /// Reads `interface`'s MAC again and records it when it changed since [`Self::attach`]
    /// (or the last call): returns the new MAC then. An interface whose MAC cannot be read
    /// keeps its entry (it is gone, or going: no frames come in on it).
    pub fn refresh_interface_mac(&mut self, interface: &str) -> Result<Option<[u8; 6]>> {
        let ifindex = crate::host::net::ifindex(interface)?;
        let Ok(mac) = crate::host::net::interface_mac(interface) else {
            return Ok(None);
        };
        if self.interface_mac(ifindex) == Some(mac) {
            return Ok(None);
        }
        self.set_interface_mac(ifindex, Some(mac))?;
        Ok(Some(mac))
    }

    /// The recorded interface MACs (ifindex → MAC).
    pub fn interface_macs(&self) -> StdHashMap<u32, [u8; 6]> {
        let low = self.ifmacs.iter().enumerate().filter_map(|(i, v)| {
            let mac = v.ok()?.mac;
            (mac != [0; 6]).then_some((u32::try_from(i).ok()?, mac))
        });
        let high = self
            .ifmacs_high
            .iter()
            .filter_map(Result::ok)
            .map(|(k, v)| (k, v.mac));
        low.chain(high).collect()
    }

    /// Makes `BLB_VLANS` hold exactly `devs` (VLAN device ifindex → trunk, VLAN id and MAC)
    /// and `BLB_VLAN_PORTS` the same devices by (trunk, VLAN id): new and changed entries are
    /// written, stale ones removed. Returns how many devices changed.
    pub fn set_vlans(&mut self, devs: &StdHashMap<u32, VlanDev>) -> Result<usize> {
        let ports: StdHashMap<VlanPort, VlanIn> = devs
            .iter()
            .map(|(ifindex, d)| {
                let port = VlanPort {
                    parent: d.parent,
                    vid: d.vid,
                    pad: 0,
                };
                let dev = VlanIn {
                    ifindex: *ifindex,
                    mac: d.mac,
                    pad: [0; 2],
                };
                (port, dev)
            })
            .collect();
        // Ports first: a device is looked up by its tag only once it is known by its index.
        sync_hash(&mut self.vlan_ports, &ports, "a VLAN port")?;
        sync_hash(&mut self.vlans, devs, "a VLAN device")
    }

    /// The recorded VLAN devices (ifindex → trunk and VLAN id).
    pub fn vlans(&self) -> StdHashMap<u32, VlanDev> {
        self.vlans.iter().filter_map(Result::ok).collect()
    }

    /// Writes the globals.
    pub fn set_globals(&mut self, g: Globals) -> Result<()> {
        self.globals
            .set(0, g, 0)
            .map_err(map_err("writing globals"))
    }

    /// The words of `BLB_PORTS` (bit `port % 64` of word `port / 64`: the program looks at
    /// TCP/UDP frames to that destination port), as last read or written.
    pub fn port_words(&self) -> Result<Vec<u64>> {
        if self.port_cache.len() == PORT_WORDS as usize {
            return Ok(self.port_cache.clone());
        }
        (0..PORT_WORDS)
            .map(|i| {
                self.ports
                    .get(&i, 0)
                    .map_err(map_err("reading the port filter"))
            })
            .collect()
    }

    /// Writes the words of `BLB_PORTS` that differ from `words` (one word at a time: a
    /// reader sees each word old or new).
    pub fn set_port_words(&mut self, words: &[u64]) -> Result<()> {
        if self.port_cache.len() != PORT_WORDS as usize {
            self.port_cache = self.port_words()?;
        }
        for (i, w) in (0u32..).zip(words) {
            if self.port_cache.get(i as usize) != Some(w) {
                self.ports
                    .set(i, *w, 0)
                    .map_err(map_err("writing the port filter"))?;
                if let Some(c) = self.port_cache.get_mut(i as usize) {
                    *c = *w;
                }
            }
        }
        Ok(())
    }

    /// Reads the globals.
    pub fn globals(&self) -> Result<Globals> {
        self.globals.get(&0, 0).map_err(map_err("reading globals"))
    }

    /// Inserts or replaces a service (its `ring_half` must already hold a ring).
    pub fn put_service(&mut self, key: &ServiceKey, svc: &Service) -> Result<()> {
        self.services
            .insert(key, svc, 0)
            .map_err(map_err("writing the service map"))
    }

    /// Removes a service: its VIP goes to the kernel again.
    pub fn remove_service(&mut self, key: &ServiceKey) -> Result<()> {
        match self.services.remove(key) {
            Ok(()) | Err(aya::maps::MapError::KeyNotFound) => Ok(()),
            Err(e) => Err(map_err("removing a service")(e)),
        }
    }

    /// Every service in the map.
    pub fn services(&self) -> Vec<(ServiceKey, Service)> {
        self.services.iter().filter_map(Result::ok).collect()
    }

    /// Writes a backend slot.
    pub fn put_backend(&mut self, idx: u32, be: &Backend) -> Result<()> {
        self.backends
            .set(idx, be, 0)
            .map_err(map_err("writing the backend array"))
    }

    /// Every backend slot that is in use.
    pub fn backends(&self) -> Vec<(u32, Backend)> {
        (0..MAX_BACKENDS)
            .filter_map(|i| self.backends.get(&i, 0).ok().map(|b| (i, b)))
            .filter(|(_, b)| b.used != 0 || b.generation != 0)
            .collect()
    }

    /// Copies a ring into half `half` of service `id` (not live until the service flips).
    pub fn write_ring(&mut self, id: u32, half: u32, table: &[u32]) -> Result<()> {
        let out_of_range = Error::RingOutOfRange {
            id,
            half,
            len: table.len(),
        };
        if id >= MAX_SERVICES || half > 1 || table.len() > RING_MAX as usize {
            return Err(out_of_range);
        }
        let start = ring_index(id, half, 0) as usize;
        if start + table.len() > self.rings.len {
            return Err(out_of_range);
        }
        // SAFETY: bounds checked above; the kernel only reads this half (it is not live).
        unsafe {
            std::ptr::copy_nonoverlapping(table.as_ptr(), self.rings.ptr.add(start), table.len());
        }
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        Ok(())
    }

    /// Reads a ring half back (tests, status).
    pub fn read_ring(&self, id: u32, half: u32, size: u32) -> Vec<u32> {
        let start = ring_index(id, half, 0) as usize;
        let n = (size as usize).min(RING_MAX as usize);
        // SAFETY: within the mapping.
        unsafe { std::slice::from_raw_parts(self.rings.ptr.add(start), n).to_vec() }
    }

    /// Summed per-CPU counters of a service.
    pub fn service_counters(&self, id: u32) -> Counters {
        sum(self
            .svc_stats
            .get(&id, 0)
            .ok()
            .map(|v| v.iter().copied().collect()))
    }

    /// Summed per-CPU counters of a backend.
    pub fn backend_counters(&self, idx: u32) -> Counters {
        sum(self
            .be_stats
            .get(&idx, 0)
            .ok()
            .map(|v| v.iter().copied().collect()))
    }

    /// Zeroes a backend's counters (when its slot is given to another backend).
    pub fn reset_backend_counters(&mut self, idx: u32) -> Result<()> {
        let zero = zeroed_per_cpu()?;
        self.be_stats
            .set(idx, zero, 0)
            .map_err(map_err("resetting backend counters"))
    }

    /// Zeroes a service's counters (when its id is given to another service).
    pub fn reset_service_counters(&mut self, id: u32) -> Result<()> {
        let zero = zeroed_per_cpu()?;
        self.svc_stats
            .set(id, zero, 0)
            .map_err(map_err("resetting service counters"))
    }

    /// Summed per-CPU reason counters.
    pub fn reasons(&self) -> Vec<(Reason, u64)> {
        (0..REASONS)
            .map(|i| {
                let v = self.reasons.get(&i, 0).map(|v| v.iter().sum()).unwrap_or(0);
                (Reason::ALL[i as usize], v)
            })
            .collect()
    }

    /// Number of flow-table entries (walks the table: for status, not for the hot path).
    pub fn flow_count(&self) -> usize {
        self.flows.keys().filter(Result::is_ok).count()
    }

    /// Every flow-table entry (tests).
    pub fn flows(&self) -> StdHashMap<FlowKey, Flow> {
        self.flows.iter().filter_map(Result::ok).collect()
    }

    /// One flow-table entry, if present.
    pub fn flow(&self, key: &FlowKey) -> Option<Flow> {
        self.flows.get(key, 0).ok()
    }

    /// Removes one flow-table entry (a mirrored delete; tests: one half of a flow lost).
    pub fn remove_flow(&mut self, key: &FlowKey) -> Result<()> {
        self.flows
            .remove(key)
            .map_err(map_err("removing a flow entry"))
    }

    /// Writes one flow-table entry (tests: a port held by another flow).
    pub fn put_flow(&mut self, key: &FlowKey, flow: &Flow) -> Result<()> {
        self.flows
            .insert(key, flow, 0)
            .map_err(map_err("writing a flow entry"))
    }

    /// One expiry pass over the flow table (the daemon runs [`crate::control::flow_expiry::Collector`]).
    pub fn sweep_flows(
        &mut self,
        t: crate::control::flow_expiry::Timeouts,
        now: u32,
    ) -> crate::control::flow_expiry::Sweep {
        crate::control::flow_expiry::sweep(&mut self.flows, t, now)
    }
}

/// `aa:bb:cc:dd:ee:ff`.
pub(crate) fn fmt_mac(m: &[u8; 6]) -> String {
    format!(
        "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
        m[0], m[1], m[2], m[3], m[4], m[5]
    )
}

fn map_rings(fd: i32) -> Result<Rings> {
    // The kernel stores array values in 8-byte strides: the ring array's values are pairs of
    // slots, so the mapping is one flat run of u32 slots.
    let len = RING_WORDS as usize;
    // SAFETY: mapping a BPF_F_MMAPABLE array of `len` u32 values, shared with the kernel.
    let ptr = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len * 4,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            fd,
            0,
        )
    };
    if ptr == libc::MAP_FAILED {
        return Err(Error::MmapRings(std::io::Error::last_os_error()));
    }
    Ok(Rings {
        ptr: ptr.cast(),
        len,
    })
}

fn sum(v: Option<Vec<Counters>>) -> Counters {
    let mut c = Counters::default();
    for x in v.unwrap_or_default() {
        c.packets += x.packets;
        c.bytes += x.bytes;
        c.new_flows += x.new_flows;
        c.resets += x.resets;
        c.drops += x.drops;
        c.refused += x.refused;
        c.syn_retries += x.syn_retries;
    }
    c
}
