//! The device: context, stream, the embedded kernel module, memory, copies and launches.
//! Every failure (no driver, no GPU, wrong architecture, out of memory, a failed launch) is an
//! [`Error`], never a panic.

use crate::{Error, Result};
use cudarc::driver::{
    result, sys, CudaContext, CudaEvent, CudaFunction, CudaGraph, CudaModule, CudaSlice,
    CudaStream, DevicePtr, DeviceRepr, PinnedHostSlice,
};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

static FATBIN: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/kernels.fatbin"));

/// Device memory owned by the backend; `ptr` is its raw address for kernel arguments.
pub struct DevBuf {
    _mem: CudaSlice<u8>,
    pub ptr: u64,
    pub bytes: usize,
}

impl DevBuf {
    /// Address of element `i` of a buffer of `T`.
    pub fn at<T>(&self, i: usize) -> u64 {
        self.ptr + (i * std::mem::size_of::<T>()) as u64
    }
}

/// One GPU with its stream and kernels.
pub struct Gpu {
    pub ctx: Arc<CudaContext>,
    pub stream: Arc<CudaStream>,
    module: Arc<CudaModule>,
    /// Loaded kernels, with the dynamic shared memory each is allowed so far.
    funcs: Mutex<HashMap<String, (CudaFunction, u32)>>,
    /// Kernels allowed clusters of more than 8 blocks (a per-kernel attribute, set once).
    wide_clusters: Mutex<std::collections::HashSet<String>>,
    pub name: String,
    pub ordinal: usize,
    pub sm_count: usize,
    /// Launch with programmatic dependent launch (`DSV4_CUDA_PDL=0` turns it off).
    pdl: bool,
    /// One-token GEMVs on long-lived warps (`gemv_stream_*`; `DSV4_CUDA_STREAM=0` turns it off).
    pub stream_gemv: bool,
    /// Few-token products streamed through shared memory by bulk copies (`kernels/gemv_bulk.cu`;
    /// `DSV4_CUDA_BULK=0` turns it off).
    pub bulk: bool,
    /// Rows per warp of the dense bulk-copy kernels (1, 2 or 4; 0: by row length), from
    /// `DSV4_CUDA_BULK_RPW`, for comparisons.
    pub bulk_rpw: usize,
    /// Decode batches of 3 up to this many tokens take the bulk-copy tensor-core kernels
    /// (`gemv_bulk_tc_*`): [`crate::ops::BULK_TC_DEFAULT_TOKENS`], or
    /// `DSV4_CUDA_BULK_TC_TOKENS` (up to [`crate::ops::BULK_TC_MAX_TOKENS`]; 0 or
    /// `DSV4_CUDA_BULK_TC=0` keeps the SIMT GEMVs), for comparisons.
    pub bulk_tc_tokens: usize,
    /// ... from this many tokens: 3 (fewer take the SIMT bulk kernels, faster there: one token
    /// on these measured 2.13 against 1.78 ms per 8-layer step; tests lower it).
    pub bulk_tc_min: usize,
    /// Shared-memory stages of the dense bulk-copy kernels: 4, or 2–6 from
    /// `DSV4_CUDA_BULK_STAGES` (with fewer, two launches fit on an SM; with more, a launch
    /// requests more of its matrix before the kernel ahead of it ends: comparisons).
    pub bulk_stages: usize,
    /// Multi-token products of BF16/FP8/FP4 weights on the tensor cores (`kernels/gemm_tc.cu`;
    /// `DSV4_CUDA_TC=0` keeps the SIMT GEMMs, for A/B comparisons).
    pub tc: bool,
    /// Inputs per K step of the tensor-core kernels: 64, or 32 with `DSV4_CUDA_TC_BK=32` (the
    /// `_k32` kernels), and tokens per block of the dense ones: 128, or 64 with
    /// `DSV4_CUDA_TC_TOKENS=64` (`_n64`); for comparisons.
    pub tc_bk: usize,
    pub tc_tokens: usize,
    /// Neither of those two variables is set: prefill GEMMs take the measured best shape.
    pub tc_shape_default: bool,
    /// Whether prefill's narrow products take the tensor cores from a quarter-SM grid of the
    /// tiles launched (`narrow_tc`), and f32 rows of at most 24 their own kernel
    /// (`gemm_f32_narrow`, `narrow_f32`). `DSV4_CUDA_NARROW=1` turns both on, `tc` or `f32`
    /// one. Off: half a block per SM counted at 128 tokens per tile, the GEMV for the f32 rows
    /// (stop 40 measured the first `gemm_f32_narrow` slower; its rewrite is not yet measured).
    narrow_tc: AtomicBool,
    narrow_f32: AtomicBool,
    /// Tensor-core GEMMs of more than 64 tokens split the activations into bf16 parts once
    /// (`tc_split_x`) and run the `_xs` kernels on them (same results, bit for bit);
    /// On by default (8-layer prefill +3.5–4.3%, H200); `DSV4_CUDA_TC_XS=0` or
    /// [`Gpu::set_tc_xs`] turns it off.
    tc_xs: AtomicBool,
    /// The routed experts of decode batches (FP4) on the tensor cores (`kernels/moe_tc.cu`);
    /// `DSV4_CUDA_MOE_TC=0` or [`Gpu::set_moe_tc`] keeps the SIMT per-pair kernels.
    moe_tc: AtomicBool,
    /// The largest decode batch whose routed experts take those kernels:
    /// [`crate::ops::MOE_TC_MAX_TOKENS`], or `DSV4_CUDA_MOE_TC_TOKENS` for comparisons.
    pub moe_tc_tokens: usize,
    /// Decode batches of up to this many tokens stream their routed FP4 experts through bulk
    /// copies into the tensor-core kernels of `kernels/moe_bulk.cu`:
    /// [`crate::ops::MOE_BULK_MAX_TOKENS`], `DSV4_CUDA_MOE_BULK_TOKENS` (0: never) or
    /// [`Gpu::set_moe_bulk_tokens`].
    moe_bulk_tokens: AtomicUsize,
    /// The pre-split planes, grown on demand (never inside a graph capture: only prefill-sized
    /// GEMMs use them).
    xs_buf: Mutex<Option<DevBuf>>,
    /// Per-launch timing (`set_profile`): events around every launch, PDL off.
    profile: Mutex<Option<Profile>>,
    /// Diagnostics only: kernels whose names start with one of these are not launched
    /// (`DSV4_CUDA_SKIP=hc_mix,rope`), so a step's time without them shows what they cost on
    /// its critical path. Every result is wrong while it is set.
    skip: Vec<String>,
    /// Diagnostics: kernels whose names start with one of these launch without programmatic
    /// dependent launch (`DSV4_CUDA_NOPDL=moe_up_bulk`): they start only once the kernel before
    /// has finished, rather than holding SMs while they wait for it. Results are unchanged.
    no_pdl: Vec<String>,
    /// Decode steps run independent work (the shared expert beside the routed ones) on a side
    /// stream, a parallel branch of the captured graph; `DSV4_CUDA_BRANCHES=0` or
    /// [`Gpu::set_branches`] keeps everything on one stream.
    branches: AtomicBool,
    side: Branch,
    /// Page-locked staging for results read back (the logits), grown on demand up to
    /// [`PINNED_MAX_FLOATS`]: the copy runs at full PCIe speed and the caller copies it once.
    pinned: Mutex<Option<PinnedHostSlice<f32>>>,
    /// `DSV4_CUDA_PINNED=0` reads back through pageable memory only (for comparisons).
    pinned_on: bool,
    /// Preferred shared-memory carveout (percent of the unified L1/shared array) set on every
    /// kernel (`DSV4_CUDA_CARVEOUT`). An SM changes its carveout only when idle, so kernels
    /// that prefer different splits cannot overlap under programmatic dependent launch.
    carveout: Option<i32>,
}

/// A stream that forks from the main stream and joins it again: a parallel branch of a
/// captured graph.
struct Branch {
    stream: Arc<CudaStream>,
    fork_ev: CudaEvent,
    join_ev: CudaEvent,
    /// Launches and copies go to this stream (inside [`Branch::run`]). One flag per branch:
    /// a model queues work from one thread at a time (the server's engine thread).
    active: AtomicBool,
    /// Work queued here since the last [`Branch::join`].
    pending: AtomicBool,
}

impl Branch {
    fn new(ctx: &Arc<CudaContext>) -> Result<Self> {
        let event = || ctx.new_event(None).map_err(drv("creating an event"));
        Ok(Branch {
            stream: ctx.new_stream().map_err(drv("creating a stream"))?,
            fork_ev: event()?,
            join_ev: event()?,
            active: AtomicBool::new(false),
            pending: AtomicBool::new(false),
        })
    }

    /// Runs `f` with its work queued here, after everything queued on `main` so far.
    fn run<R>(&self, main: &CudaStream, f: impl FnOnce() -> Result<R>) -> Result<R> {
        self.fork_ev
            .record(main)
            .map_err(drv("recording an event"))?;
        self.stream
            .wait(&self.fork_ev)
            .map_err(drv("waiting for an event"))?;
        // Back on the main stream however `f` ends (an error, or a panic the caller survives).
        struct Back<'a>(&'a Branch);
        impl Drop for Back<'_> {
            fn drop(&mut self) {
                self.0.active.store(false, Ordering::Relaxed);
                self.0.pending.store(true, Ordering::Relaxed);
            }
        }
        let _back = Back(self);
        self.active.store(true, Ordering::Relaxed);
        f()
    }

    /// Makes `main`'s next work wait for what was queued here.
    fn join(&self, main: &CudaStream) -> Result<()> {
        if self.pending.swap(false, Ordering::Relaxed) {
            self.join_ev
                .record(&self.stream)
                .map_err(drv("recording an event"))?;
            main.wait(&self.join_ev)
                .map_err(drv("waiting for an event"))?;
        }
        Ok(())
    }
}

/// Largest read-back staged in page-locked memory (64 MB: 128 rows of Flash's vocabulary);
/// larger ones go through pageable memory.
pub const PINNED_MAX_FLOATS: usize = 16 << 20;

/// Launches recorded by the profiler: (label, bytes streamed if known, start, end).
#[derive(Default)]
struct Profile {
    launches: Vec<(String, usize, sys::CUevent, sys::CUevent)>,
    tag: Option<(String, usize)>,
}

// SAFETY: the events are plain driver handles, used only under the Gpu's mutex with its
// context bound.
unsafe impl Send for Profile {}

/// One profiled launch: its label (kernel name and grid, or the tag its caller gave), the
/// weight bytes it streams when the caller said, and its time.
#[derive(Clone, Debug)]
pub struct ProfiledLaunch {
    pub label: String,
    pub bytes: usize,
    pub ms: f64,
}

fn drv(what: &str) -> impl Fn(result::DriverError) -> Error + '_ {
    move |e| Error::Driver(format!("{what}: {e}"))
}

impl Gpu {
    /// Opens GPU `ordinal`: checks the driver library, the device count and the architecture,
    /// then loads the kernels.
    pub fn open(ordinal: usize) -> Result<Arc<Gpu>> {
        if !unsafe { sys::is_culib_present() } {
            return Err(Error::NoDriver(
                "the CUDA driver library (libcuda.so) was not found; install the NVIDIA driver \
                 or add its directory to LD_LIBRARY_PATH"
                    .into(),
            ));
        }
        result::init().map_err(|e| Error::NoDriver(format!("cuInit failed: {e}")))?;
        let count = CudaContext::device_count().map_err(drv("counting GPUs"))?;
        if count <= 0 {
            return Err(Error::NoDevice("no CUDA GPU is visible".into()));
        }
        if ordinal >= count as usize {
            return Err(Error::NoDevice(format!(
                "cuda:{ordinal} requested but only {count} GPU(s) are visible"
            )));
        }
        let ctx = CudaContext::new(ordinal).map_err(drv("creating the CUDA context"))?;
        let (major, minor) = ctx
            .compute_capability()
            .map_err(drv("reading the compute capability"))?;
        let name = ctx.name().unwrap_or_else(|_| "unknown GPU".into());
        if major < 9 {
            return Err(Error::Arch(format!(
                "{name} has compute capability {major}.{minor}; dsv4's kernels are built for \
                 Hopper (9.0) and newer"
            )));
        }
        // One stream, no cross-stream hazards: skip cudarc's per-buffer event bookkeeping
        // (it must be off for graph capture too). A created stream, since the legacy default
        // stream cannot be captured.
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx.new_stream().map_err(drv("creating a stream"))?;
        let side = Branch::new(&ctx)?;
        // DSV4_CUDA_FATBIN swaps in another build of the kernels (same argument layouts), so
        // kernel variants can be compared under one binary.
        let fatbin = match std::env::var_os("DSV4_CUDA_FATBIN") {
            Some(path) => std::fs::read(&path).map_err(|e| {
                Error::Driver(format!("reading DSV4_CUDA_FATBIN {}: {e}", path.display()))
            })?,
            None => FATBIN.to_vec(),
        };
        let module = ctx
            .load_module(cudarc::nvrtc::Ptx::from_binary(fatbin))
            .map_err(|e| Error::Arch(format!("loading dsv4's kernels on {name}: {e}")))?;
        let sm_count = ctx
            .attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
            .map_err(drv("reading the SM count"))? as usize;
        let narrow = std::env::var("DSV4_CUDA_NARROW").ok();
        let narrow = narrow.as_deref();
        Ok(Arc::new(Gpu {
            ctx,
            stream,
            module,
            funcs: Mutex::new(HashMap::new()),
            wide_clusters: Mutex::new(Default::default()),
            name,
            ordinal,
            sm_count,
            pdl: std::env::var("DSV4_CUDA_PDL").map_or(true, |v| v != "0"),
            profile: Mutex::new(None),
            stream_gemv: std::env::var("DSV4_CUDA_STREAM").map_or(true, |v| v != "0"),
            bulk: std::env::var("DSV4_CUDA_BULK").map_or(true, |v| v != "0"),
            bulk_tc_tokens: if std::env::var("DSV4_CUDA_BULK_TC").is_ok_and(|v| v == "0") {
                0
            } else {
                env_num("DSV4_CUDA_BULK_TC_TOKENS", |_: &usize| true)
                    .unwrap_or(crate::ops::BULK_TC_DEFAULT_TOKENS)
                    .min(crate::ops::BULK_TC_MAX_TOKENS)
            },
            bulk_tc_min: 3,
            bulk_rpw: env_num("DSV4_CUDA_BULK_RPW", |r| [1, 2, 4].contains(r)).unwrap_or(0),
            bulk_stages: env_num("DSV4_CUDA_BULK_STAGES", |n| (2..=6).contains(n)).unwrap_or(4),
            tc: std::env::var("DSV4_CUDA_TC").map_or(true, |v| v != "0"),
            tc_bk: if std::env::var("DSV4_CUDA_TC_BK").is_ok_and(|v| v == "32") {
                32
            } else {
                64
            },
            tc_tokens: if std::env::var("DSV4_CUDA_TC_TOKENS").is_ok_and(|v| v == "64") {
                64
            } else {
                128
            },
            tc_shape_default: std::env::var_os("DSV4_CUDA_TC_BK").is_none()
                && std::env::var_os("DSV4_CUDA_TC_TOKENS").is_none(),
            narrow_tc: AtomicBool::new(narrow.is_some_and(|v| v == "1" || v == "tc")),
            narrow_f32: AtomicBool::new(narrow.is_some_and(|v| v == "1" || v == "f32")),
            tc_xs: AtomicBool::new(std::env::var("DSV4_CUDA_TC_XS").map_or(true, |v| v != "0")),
            moe_tc_tokens: env_num("DSV4_CUDA_MOE_TC_TOKENS", |_: &usize| true)
                .unwrap_or(crate::ops::MOE_TC_MAX_TOKENS),
            moe_tc: AtomicBool::new(std::env::var("DSV4_CUDA_MOE_TC").map_or(true, |v| v != "0")),
            moe_bulk_tokens: AtomicUsize::new(
                env_num("DSV4_CUDA_MOE_BULK_TOKENS", |_: &usize| true)
                    .unwrap_or(crate::ops::MOE_BULK_MAX_TOKENS),
            ),
            xs_buf: Mutex::new(None),
            skip: name_prefixes("DSV4_CUDA_SKIP"),
            no_pdl: name_prefixes("DSV4_CUDA_NOPDL"),
            branches: AtomicBool::new(
                std::env::var("DSV4_CUDA_BRANCHES").map_or(true, |v| v != "0"),
            ),
            side,
            pinned: Mutex::new(None),
            pinned_on: std::env::var("DSV4_CUDA_PINNED").map_or(true, |v| v != "0"),
            carveout: env_num("DSV4_CUDA_CARVEOUT", |p| (0..=100).contains(p)),
        }))
    }

    /// Whether the tensor-core GEMMs pre-split their activations (see `tc_xs`).
    pub fn tc_xs(&self) -> bool {
        self.tc_xs.load(Ordering::Relaxed)
    }

    pub fn set_tc_xs(&self, on: bool) {
        self.tc_xs.store(on, Ordering::Relaxed);
    }

    /// Whether prefill's narrow products take the tensor cores from a small grid (see the field).
    pub fn narrow_tc(&self) -> bool {
        self.narrow_tc.load(Ordering::Relaxed)
    }

    /// Whether prefill's f32 rows of at most 24 take `gemm_f32_narrow` (see the field).
    pub fn narrow_f32(&self) -> bool {
        self.narrow_f32.load(Ordering::Relaxed)
    }

    /// Both narrow-product paths on or off (tests compare them).
    pub fn set_narrow(&self, on: bool) {
        self.narrow_tc.store(on, Ordering::Relaxed);
        self.narrow_f32.store(on, Ordering::Relaxed);
    }

    /// Whether decode batches run the routed FP4 experts on the tensor cores (see `moe_tc`).
    pub fn moe_tc(&self) -> bool {
        self.moe_tc.load(Ordering::Relaxed)
    }

    pub fn set_moe_tc(&self, on: bool) {
        self.moe_tc.store(on, Ordering::Relaxed);
    }

    /// The largest decode batch whose routed experts take the bulk-copy kernels (see
    /// `moe_bulk_tokens`).
    pub fn moe_bulk_tokens(&self) -> usize {
        self.moe_bulk_tokens.load(Ordering::Relaxed)
    }

    pub fn set_moe_bulk_tokens(&self, tokens: usize) {
        self.moe_bulk_tokens.store(tokens, Ordering::Relaxed);
    }

    /// Device scratch of at least `bytes` for the pre-split activations, valid until the next
    /// call (all work is on the one stream, and a replaced buffer is freed in stream order);
    /// `None` when it cannot be allocated (the caller keeps the in-block split).
    pub fn tc_scratch(&self, bytes: usize) -> Option<u64> {
        let mut buf = self.xs_buf.lock().unwrap_or_else(|p| p.into_inner());
        if buf.as_ref().is_none_or(|b| b.bytes < bytes) {
            // Free the old one first (stream-ordered) so both need not fit at once.
            *buf = None;
            // Some headroom, so slowly growing sizes do not reallocate each time.
            *buf = Some(self.alloc(bytes + bytes / 8).ok()?);
        }
        buf.as_ref().map(|b| b.ptr)
    }

    /// (free, total) device memory in bytes.
    pub fn mem_info(&self) -> Result<(usize, usize)> {
        self.ctx.mem_get_info().map_err(drv("reading memory info"))
    }

    /// Uninitialized device memory (at least one byte so every buffer has an address).
    pub fn alloc(&self, bytes: usize) -> Result<DevBuf> {
        let mem = unsafe { self.stream.alloc::<u8>(bytes.max(1)) }.map_err(|e| {
            let free = self.mem_info().map(|m| m.0).unwrap_or(0);
            Error::OutOfMemory(format!(
                "allocating {:.1} MiB on {} failed ({e}); {:.1} MiB free",
                bytes as f64 / 1048576.0,
                self.name,
                free as f64 / 1048576.0
            ))
        })?;
        let ptr = mem.device_ptr(&self.stream).0;
        Ok(DevBuf {
            _mem: mem,
            ptr,
            bytes,
        })
    }

    pub fn alloc_zeros(&self, bytes: usize) -> Result<DevBuf> {
        let b = self.alloc(bytes)?;
        self.memset(b.ptr, 0, bytes)?;
        Ok(b)
    }

    /// A device copy of `data`.
    pub fn upload<T: Copy>(&self, data: &[T]) -> Result<DevBuf> {
        let bytes = std::mem::size_of_val(data);
        let b = self.alloc(bytes)?;
        self.htod(b.ptr, data)?;
        Ok(b)
    }

    pub fn htod<T: Copy>(&self, dst: u64, data: &[T]) -> Result<()> {
        if data.is_empty() {
            return Ok(());
        }
        self.bind()?;
        unsafe { result::memcpy_htod_async(dst, data, self.cur()) }
            .map_err(drv("copying to the GPU"))
    }

    /// Reads `n` floats at `src` once the queued work is done and hands them to `f`, through
    /// the page-locked staging buffer when they fit (else, or when no page-locked memory can
    /// be had, through pageable memory).
    pub fn dtoh_with<R>(&self, src: u64, n: usize, f: impl FnOnce(&[f32]) -> R) -> Result<R> {
        if n == 0 {
            self.sync()?;
            return Ok(f(&[]));
        }
        let mut guard = self.pinned.lock().unwrap_or_else(|p| p.into_inner());
        let staged = n <= PINNED_MAX_FLOATS && self.pinned_on;
        if staged && guard.as_ref().is_none_or(|p| p.len() < n) {
            *guard = None;
            // Grown by powers of two (a decode batch grows a request at a time). Flags 0:
            // cached memory the CPU reads fast (cudarc's default is write-combined).
            let len = n.next_power_of_two().clamp(1 << 16, PINNED_MAX_FLOATS);
            *guard = unsafe { self.ctx.alloc_pinned_with_flags::<f32>(len, 0) }.ok();
        }
        match guard.as_mut().filter(|_| staged) {
            Some(buf) => {
                let host = &mut buf
                    .as_mut_slice()
                    .map_err(drv("reading page-locked host memory"))?[..n];
                self.dtoh(src, &mut *host)?;
                Ok(f(host))
            }
            None => {
                let mut v = vec![0f32; n];
                self.dtoh(src, &mut v)?;
                Ok(f(&v))
            }
        }
    }

    /// Copies `out.len()` elements from `src` and waits for them.
    pub fn dtoh<T: Copy>(&self, src: u64, out: &mut [T]) -> Result<()> {
        if out.is_empty() {
            return Ok(());
        }
        self.bind()?;
        unsafe { result::memcpy_dtoh_async(out, src, self.cur()) }
            .map_err(drv("copying from the GPU"))?;
        self.sync()
    }

    pub fn dtod(&self, dst: u64, src: u64, bytes: usize) -> Result<()> {
        if bytes == 0 {
            return Ok(());
        }
        self.bind()?;
        unsafe { result::memcpy_dtod_async(dst, src, bytes, self.cur()) }
            .map_err(drv("copying on the GPU"))
    }

    pub fn memset(&self, dst: u64, value: u8, bytes: usize) -> Result<()> {
        self.bind()?;
        unsafe { result::memset_d8_async(dst, value, bytes, self.cur()) }
            .map_err(drv("clearing GPU memory"))
    }

    pub fn branches(&self) -> bool {
        self.branches.load(Ordering::Relaxed)
    }

    pub fn set_branches(&self, on: bool) {
        self.branches.store(on, Ordering::Relaxed);
    }

    /// Whether work is being queued on the side stream (inside [`Gpu::on_side`]).
    pub fn is_on_side(&self) -> bool {
        self.side.active.load(Ordering::Relaxed)
    }

    /// Makes the context current on the calling thread (the server's engine thread is not the
    /// one that opened the GPU); the raw driver calls below need it.
    fn bind(&self) -> Result<()> {
        self.ctx
            .bind_to_thread()
            .map_err(drv("binding the CUDA context"))
    }

    /// The stream work is queued on now: the side stream inside [`Gpu::on_side`].
    fn cur(&self) -> sys::CUstream {
        if self.side.active.load(Ordering::Relaxed) {
            self.side.stream.cu_stream()
        } else {
            self.stream.cu_stream()
        }
    }

    /// Queues `f`'s launches and copies on the side stream, after everything queued so far and
    /// beside what is queued next, until [`Gpu::join_side`] makes the main stream wait for
    /// them. (Under capture this is a parallel branch of the graph.)
    pub fn on_side<R>(&self, f: impl FnOnce() -> Result<R>) -> Result<R> {
        self.side.run(&self.stream, f)
    }

    /// Makes the main stream's next work wait for the side stream's.
    pub fn join_side(&self) -> Result<()> {
        self.side.join(&self.stream)
    }

    /// Waits for all queued work; reports asynchronous kernel faults.
    pub fn sync(&self) -> Result<()> {
        self.join_side()?;
        self.stream
            .synchronize()
            .map_err(drv("a GPU kernel failed"))
    }

    /// Starts recording this thread's launches on the stream into a graph instead of running
    /// them; nothing that synchronizes or allocates may happen until [`Gpu::end_capture`].
    pub fn begin_capture(&self) -> Result<()> {
        self.stream
            .begin_capture(sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
            .map_err(drv("starting a CUDA graph capture"))
    }

    /// Ends a capture; the graph replays the recorded launches with their recorded arguments.
    pub fn end_capture(&self) -> Result<CudaGraph> {
        self.join_side()?;
        self.stream
            .end_capture(sys::CUgraphInstantiate_flags(0))
            .map_err(drv("instantiating a CUDA graph"))?
            .ok_or_else(|| Error::Driver("a CUDA graph capture recorded nothing".into()))
    }

    /// Times every launch from now on with events around it (launches serialized: no PDL, and
    /// no graph capture may run meanwhile), until [`Gpu::take_profile`].
    pub fn set_profile(&self, on: bool) {
        *self.profile.lock().unwrap_or_else(|p| p.into_inner()) = on.then(Profile::default);
    }

    pub fn profiling(&self) -> bool {
        self.profile
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_some()
    }

    /// Names the next launch in the profile (with the bytes it streams); no-op when off.
    pub fn tag(&self, label: impl FnOnce() -> (String, usize)) {
        if let Some(p) = self
            .profile
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_mut()
        {
            p.tag = Some(label());
        }
    }

    /// Waits for the profiled launches and returns their times in launch order; profiling
    /// stays on with an empty record.
    pub fn take_profile(&self) -> Result<Vec<ProfiledLaunch>> {
        self.sync()?;
        let launches = match self
            .profile
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_mut()
        {
            Some(p) => std::mem::take(&mut p.launches),
            None => return Ok(Vec::new()),
        };
        let mut out = Vec::with_capacity(launches.len());
        for (label, bytes, a, b) in launches {
            let ms = unsafe { result::event::elapsed(a, b) }.map_err(drv("reading an event"));
            unsafe {
                let _ = result::event::destroy(a);
                let _ = result::event::destroy(b);
            }
            out.push(ProfiledLaunch {
                label,
                bytes,
                ms: ms? as f64,
            });
        }
        Ok(out)
    }

    /// Kernel `name`, allowed at least `smem` bytes of dynamic shared memory (the limit is
    /// raised once per kernel, not per launch).
    fn func(&self, name: &str, smem: u32) -> Result<CudaFunction> {
        let mut f = self.funcs.lock().unwrap_or_else(|p| p.into_inner());
        if !f.contains_key(name) {
            let func = self
                .module
                .load_function(name)
                .map_err(|e| Error::Driver(format!("kernel `{name}` is missing: {e}")))?;
            if let Some(p) = self.carveout {
                func.set_attribute(
                    sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_PREFERRED_SHARED_MEMORY_CARVEOUT,
                    p,
                )
                .map_err(drv("setting the shared-memory carveout"))?;
            }
            // Without raising, a launch may take 48 KB less the kernel's static arrays.
            let allowed = func
                .get_attribute(
                    sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                )
                .map_err(drv("reading a kernel's shared-memory limit"))?;
            f.insert(name.to_string(), (func, allowed.max(0) as u32));
        }
        let (func, allowed) = f.get_mut(name).expect("inserted above");
        if smem > *allowed {
            func.set_attribute(
                sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                smem as i32,
            )
            .map_err(drv("raising the shared-memory limit"))?;
            *allowed = smem;
        }
        Ok(func.clone())
    }

    /// Launches kernel `name` with `args` (each a `&T: DeviceRepr`).
    pub fn launch(
        &self,
        name: &str,
        grid: (u32, u32, u32),
        block: (u32, u32, u32),
        smem: u32,
        args: &[&dyn Arg],
    ) -> Result<()> {
        self.launch_full(name, grid, block, smem, args, true, 1)
    }

    /// [`Gpu::launch`] without programmatic dependent launch: the kernel takes no SM before
    /// the one queued before it has finished. For kernels that can do nothing before their
    /// wait and whose blocks would hold SMs that a parallel branch could use meanwhile.
    pub fn launch_after(
        &self,
        name: &str,
        grid: (u32, u32, u32),
        block: (u32, u32, u32),
        smem: u32,
        args: &[&dyn Arg],
    ) -> Result<()> {
        self.launch_full(name, grid, block, smem, args, false, 1)
    }

    /// [`Gpu::launch`] in thread-block clusters of `cluster` blocks along x (sm_90; up to 16).
    pub fn launch_cluster(
        &self,
        name: &str,
        grid: (u32, u32, u32),
        block: (u32, u32, u32),
        smem: u32,
        cluster: u32,
        args: &[&dyn Arg],
    ) -> Result<()> {
        self.launch_full(name, grid, block, smem, args, true, cluster)
    }

    /// Whether the device can hold at least one cluster of `cluster` blocks of kernel `name`
    /// at once (a cluster's blocks must share a GPC; 16 blocks of 1024 threads may not fit).
    pub fn cluster_fits(&self, name: &str, block: u32, smem: u32, cluster: u32) -> Result<bool> {
        let func = self.cluster_func(name, smem, cluster)?;
        let mut attr = cluster_attr(cluster);
        let cfg = sys::CUlaunchConfig {
            gridDimX: cluster,
            gridDimY: 1,
            gridDimZ: 1,
            blockDimX: block,
            blockDimY: 1,
            blockDimZ: 1,
            sharedMemBytes: smem,
            hStream: self.cur(),
            attrs: &mut attr,
            numAttrs: 1,
        };
        let mut n: std::ffi::c_int = 0;
        self.bind()?;
        // SAFETY: `cfg` and `attr` outlive the call, which only reads them.
        let r = unsafe { sys::cuOccupancyMaxActiveClusters(&mut n, func.cu_function(), &cfg) };
        Ok(r == sys::CUresult::CUDA_SUCCESS && n >= 1)
    }

    /// Kernel `name` (see [`Gpu::func`]), allowed clusters of `cluster` blocks.
    fn cluster_func(&self, name: &str, smem: u32, cluster: u32) -> Result<CudaFunction> {
        let func = self.func(name, smem)?;
        if cluster > 8 {
            let mut wide = self.wide_clusters.lock().unwrap_or_else(|p| p.into_inner());
            if !wide.contains(name) {
                func.set_attribute(
                    sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_NON_PORTABLE_CLUSTER_SIZE_ALLOWED,
                    1,
                )
                .map_err(drv("allowing clusters of more than 8 blocks"))?;
                wide.insert(name.to_string());
            }
        }
        Ok(func)
    }

    #[allow(clippy::too_many_arguments)]
    fn launch_full(
        &self,
        name: &str,
        grid: (u32, u32, u32),
        block: (u32, u32, u32),
        smem: u32,
        args: &[&dyn Arg],
        pdl: bool,
        cluster: u32,
    ) -> Result<()> {
        if self.skip.iter().any(|p| name.starts_with(p.as_str())) {
            return Ok(());
        }
        let func = self.cluster_func(name, smem, cluster)?;
        let mut params: Vec<*mut std::ffi::c_void> = args.iter().map(|a| a.param()).collect();
        // Programmatic dependent launch (see kernels/common.cuh): the next kernel may be
        // scheduled while this one finishes.
        let mut pdl_attr = sys::CUlaunchAttribute {
            id: sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION,
            pad: [0; 4],
            value: unsafe { std::mem::zeroed() },
        };
        pdl_attr.value.programmaticStreamSerializationAllowed = 1;
        // The cluster shape first, so that leaving PDL out is a shorter count.
        let mut attrs = [cluster_attr(cluster), pdl_attr];
        let first = usize::from(cluster <= 1);
        self.bind()?;
        let mut prof = self.profile.lock().unwrap_or_else(|p| p.into_inner());
        let events = match prof.as_mut() {
            Some(p) => {
                let ev = || {
                    result::event::create(sys::CUevent_flags::CU_EVENT_DEFAULT)
                        .map_err(drv("creating an event"))
                };
                let (a, b) = (ev()?, ev()?);
                let (label, bytes) = p
                    .tag
                    .take()
                    .unwrap_or_else(|| (format!("{name} {grid:?}"), 0));
                p.launches.push((label, bytes, a, b));
                unsafe { result::event::record(a, self.cur()) }
                    .map_err(drv("recording an event"))?;
                Some(b)
            }
            None => None,
        };
        let cfg = sys::CUlaunchConfig {
            gridDimX: grid.0,
            gridDimY: grid.1,
            gridDimZ: grid.2,
            blockDimX: block.0,
            blockDimY: block.1,
            blockDimZ: block.2,
            sharedMemBytes: smem,
            hStream: self.cur(),
            attrs: attrs[first..].as_mut_ptr(),
            numAttrs: (2 - first) as u32
                - u32::from(
                    !(self.pdl
                        && pdl
                        && events.is_none()
                        && !self.no_pdl.iter().any(|p| name.starts_with(p.as_str()))),
                ),
        };
        // SAFETY: `params` points at one live value per kernel parameter, in order, with the
        // layout the kernel declares (the `Arg` types mirror the CUDA structs).
        unsafe {
            sys::cuLaunchKernelEx(
                &cfg,
                func.cu_function(),
                params.as_mut_ptr(),
                std::ptr::null_mut(),
            )
        }
        .result()
        .map_err(|e| {
            Error::Driver(format!(
                "launching `{name}` {grid:?}x{block:?} with {smem} B of dynamic shared memory: {e}"
            ))
        })?;
        if let Some(b) = events {
            unsafe { result::event::record(b, self.cur()) }.map_err(drv("recording an event"))?;
        }
        drop(prof);
        Ok(())
    }
}

/// The launch attribute for clusters of `blocks` blocks along x.
fn cluster_attr(blocks: u32) -> sys::CUlaunchAttribute {
    let mut a = sys::CUlaunchAttribute {
        id: sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_CLUSTER_DIMENSION,
        pad: [0; 4],
        value: unsafe { std::mem::zeroed() },
    };
    a.value.clusterDim.x = blocks;
    a.value.clusterDim.y = 1;
    a.value.clusterDim.z = 1;
    a
}

/// The value of numeric tuning variable `var` when it is set, parses and `ok` accepts it; a value
/// that does not is reported on stderr and ignored (the setting keeps its default) rather than
/// failing the model, since these variables only tune speed.
pub(crate) fn env_num<T: std::str::FromStr>(var: &str, ok: impl Fn(&T) -> bool) -> Option<T> {
    tuning_value(var, std::env::var(var).ok(), ok).unwrap_or_else(|msg| {
        eprintln!("dsv4: {msg}");
        None
    })
}

/// [`env_num`]'s decision for the value `v` of `var`: the number, none when unset, or why the
/// value is ignored.
fn tuning_value<T: std::str::FromStr>(
    var: &str,
    v: Option<String>,
    ok: impl Fn(&T) -> bool,
) -> std::result::Result<Option<T>, String> {
    let Some(v) = v else { return Ok(None) };
    match v.trim().parse::<T>() {
        Ok(n) if ok(&n) => Ok(Some(n)),
        _ => Err(format!(
            "ignoring {var}={v:?}: not a value it takes (its default stays)"
        )),
    }
}

/// The comma-separated kernel-name prefixes of environment variable `var` (none when unset).
fn name_prefixes(var: &str) -> Vec<String> {
    std::env::var(var)
        .map(|v| {
            v.split(',')
                .filter(|p| !p.is_empty())
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default()
}

/// A kernel argument.
pub trait Arg {
    /// Address of the value, as `cuLaunchKernelEx` takes it.
    fn param(&self) -> *mut std::ffi::c_void;
}

impl<T: DeviceRepr> Arg for T {
    fn param(&self) -> *mut std::ffi::c_void {
        self as *const T as *mut std::ffi::c_void
    }
}

#[cfg(test)]
mod tests {
    use super::tuning_value;

    #[test]
    fn tuning_values_parse_or_are_reported() {
        let stages = |v: &str| tuning_value("S", Some(v.into()), |n: &usize| (2..=4).contains(n));
        assert_eq!(stages("3"), Ok(Some(3)));
        assert_eq!(stages(" 4 "), Ok(Some(4)));
        let err = stages("five").unwrap_err();
        assert!(
            err.contains("S=\"five\"") && err.contains("default"),
            "{err}"
        );
        assert!(stages("9").is_err(), "out of range");
        assert_eq!(tuning_value("S", None, |_: &usize| true), Ok(None));
    }
}
