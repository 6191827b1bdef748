//! The device: context, stream, the embedded kernel module, memory, copies and launches.
//! Every failure (no driver, no GPU, wrong architecture, out of memory, a failed launch) is an
//! [`Error`], never a panic.

use crate::{Error, Result};
use cudarc::driver::{
    result, sys, CudaContext, CudaFunction, CudaGraph, CudaModule, CudaSlice, CudaStream,
    DevicePtr, DeviceRepr,
};
use std::collections::HashMap;
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
    funcs: Mutex<HashMap<String, CudaFunction>>,
    pub name: String,
    pub ordinal: usize,
    pub sm_count: usize,
    /// Launch with programmatic dependent launch (`DSV4_CUDA_PDL=0` turns it off).
    pdl: bool,
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
        let module = ctx
            .load_module(cudarc::nvrtc::Ptx::from_binary(FATBIN.to_vec()))
            .map_err(|e| Error::Arch(format!("loading dsv4's kernels on {name}: {e}")))?;
        let sm_count = ctx
            .attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
            .map_err(drv("reading the SM count"))? as usize;
        Ok(Arc::new(Gpu {
            ctx,
            stream,
            module,
            funcs: Mutex::new(HashMap::new()),
            name,
            ordinal,
            sm_count,
            pdl: std::env::var("DSV4_CUDA_PDL").map_or(true, |v| v != "0"),
        }))
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
        unsafe { result::memcpy_htod_async(dst, data, self.stream.cu_stream()) }
            .map_err(drv("copying to the GPU"))
    }

    /// Copies `out.len()` elements from `src` and waits for them.
    pub fn dtoh<T: Copy>(&self, src: u64, out: &mut [T]) -> Result<()> {
        if out.is_empty() {
            return Ok(());
        }
        unsafe { result::memcpy_dtoh_async(out, src, self.stream.cu_stream()) }
            .map_err(drv("copying from the GPU"))?;
        self.sync()
    }

    pub fn dtod(&self, dst: u64, src: u64, bytes: usize) -> Result<()> {
        if bytes == 0 {
            return Ok(());
        }
        unsafe { result::memcpy_dtod_async(dst, src, bytes, self.stream.cu_stream()) }
            .map_err(drv("copying on the GPU"))
    }

    pub fn memset(&self, dst: u64, value: u8, bytes: usize) -> Result<()> {
        unsafe { result::memset_d8_async(dst, value, bytes, self.stream.cu_stream()) }
            .map_err(drv("clearing GPU memory"))
    }

    /// Waits for all queued work; reports asynchronous kernel faults.
    pub fn sync(&self) -> Result<()> {
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
        self.stream
            .end_capture(sys::CUgraphInstantiate_flags(0))
            .map_err(drv("instantiating a CUDA graph"))?
            .ok_or_else(|| Error::Driver("a CUDA graph capture recorded nothing".into()))
    }

    fn func(&self, name: &str) -> Result<CudaFunction> {
        let mut f = self.funcs.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(func) = f.get(name) {
            return Ok(func.clone());
        }
        let func = self
            .module
            .load_function(name)
            .map_err(|e| Error::Driver(format!("kernel `{name}` is missing: {e}")))?;
        f.insert(name.to_string(), func.clone());
        Ok(func)
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
        let func = self.func(name)?;
        if smem > 48 * 1024 {
            func.set_attribute(
                sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                smem as i32,
            )
            .map_err(drv("raising the shared-memory limit"))?;
        }
        let mut params: Vec<*mut std::ffi::c_void> = args.iter().map(|a| a.param()).collect();
        // Programmatic dependent launch (see kernels/common.cuh): the next kernel may be
        // scheduled while this one finishes.
        let mut attr = sys::CUlaunchAttribute {
            id: sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION,
            pad: [0; 4],
            value: unsafe { std::mem::zeroed() },
        };
        attr.value.programmaticStreamSerializationAllowed = 1;
        let cfg = sys::CUlaunchConfig {
            gridDimX: grid.0,
            gridDimY: grid.1,
            gridDimZ: grid.2,
            blockDimX: block.0,
            blockDimY: block.1,
            blockDimZ: block.2,
            sharedMemBytes: smem,
            hStream: self.stream.cu_stream(),
            attrs: &mut attr,
            numAttrs: self.pdl as u32,
        };
        self.ctx
            .bind_to_thread()
            .map_err(drv("binding the CUDA context"))?;
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
        .map_err(|e| Error::Driver(format!("launching `{name}` {grid:?}x{block:?}: {e}")))
    }
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
