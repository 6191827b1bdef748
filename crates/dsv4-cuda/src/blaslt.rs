//! FP8 GEMMs on the tensor cores through cuBLASLt (loaded at run time; everything else in the
//! backend works without it). `Y[M, N] = Xq[M, K] · Wq[N, K]ᵀ` with DeepSeek's block scaling:
//! the weight's f32 scale per 128×128 block (`BLK128x128_32F`) and the activations' power-of-two
//! scale per token per 128 inputs (`VEC128_32F`, from `act_quant_fp8`). With the official
//! profile's activation quantization this is exactly `fp8_gemm` of DeepSeek's inference code
//! (fp32 accumulation), NUMERICS.md §1.4/§2.5.
//!
//! cuBLAS is column-major, so the row-major product is computed as `Yᵀ = W · Xᵀ`: operand A is
//! the weight (`[N, K]` row-major = K×N column-major, transposed), B the activation codes, D
//! `Yᵀ` (N×M column-major = `Y` row-major). Layout rules (Hopper, CUDA 13): FP8 needs the "TN"
//! form and 16-byte aligned leading dimensions; the activation scales are `[K/128, M]` with M
//! contiguous; the weight scales `[N/128, K/128]` row-major with each row padded to a multiple
//! of 4 floats; M is padded to a multiple of 4 (cuBLASLt refuses fewer than 4 rows).

use crate::gpu::{DevBuf, Gpu};
use crate::weights::{Fmt, GpuLinear};
use crate::{Error, Result};
use cudarc::cublaslt::result as lt;
use cudarc::cublaslt::sys;
use std::collections::HashMap;
use std::ffi::c_void;
use std::sync::{Arc, Mutex};

/// cuBLASLt workspace (NVIDIA's recommendation for Hopper).
pub const WORKSPACE_BYTES: usize = 32 << 20;
/// Row alignment of the token dimension: cuBLASLt's block-scaled kernels take M ≥ 4, and with
/// M a multiple of 4 the activation-scale layout is the same whether or not it pads its rows.
pub const M_ALIGN: usize = 4;
/// Heuristic candidates asked for per shape, and the smallest M whose plan times them.
const AUTOTUNE_CANDIDATES: usize = 8;
pub const AUTOTUNE_MIN_M: usize = 256;
/// Floats per row of the weight scales as cuBLASLt reads them (rows padded to 16 bytes).
pub const SCALE_ROW_ALIGN: usize = 4;

/// How the operands are scaled.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Scaling {
    /// One f32 per operand (or none: 1.0); the peak-rate reference.
    Tensor,
    /// DeepSeek's: weights per 128×128 block, activations per token per 128 inputs.
    Block,
}

/// Element type of the output.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum OutType {
    F32,
    Bf16,
}

impl OutType {
    pub fn bytes(self) -> usize {
        match self {
            OutType::F32 => 4,
            OutType::Bf16 => 2,
        }
    }
    fn cuda(self) -> sys::cudaDataType {
        match self {
            OutType::F32 => sys::cudaDataType::CUDA_R_32F,
            OutType::Bf16 => sys::cudaDataType::CUDA_R_16BF,
        }
    }
}

/// One FP8 GEMM: `d[m, n] (row stride ldd) = x[m, k] · w[n, k]ᵀ`, codes row-major with row
/// stride `k` (a multiple of 16). Scale pointers: for [`Scaling::Block`] the weight's
/// `[ceil(n/128), ceil(k/128)]` f32 with rows padded to [`SCALE_ROW_ALIGN`] (as
/// [`Fp8TcWeight`] holds them) and the activations' `[ceil(k/128), m]`; for [`Scaling::Tensor`] single f32 values or 0 (meaning 1.0).
#[derive(Clone, Copy, Debug)]
pub struct Fp8Gemm {
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub w: u64,
    pub w_scale: u64,
    pub x: u64,
    pub x_scale: u64,
    pub d: u64,
    pub ldd: usize,
    pub out: OutType,
    pub scaling: Scaling,
    /// Hopper's fast FP8 accumulation (no periodic promotion to fp32): faster, less exact.
    pub fast_accum: bool,
}

#[derive(Clone, Copy, PartialEq, Eq, Hash)]
struct Key {
    m: usize,
    n: usize,
    k: usize,
    ldd: usize,
    out: OutType,
    scaling: Scaling,
    fast_accum: bool,
}

/// Descriptors and the chosen algorithm of one shape.
struct Plan {
    desc: sys::cublasLtMatmulDesc_t,
    a: sys::cublasLtMatrixLayout_t,
    b: sys::cublasLtMatrixLayout_t,
    d: sys::cublasLtMatrixLayout_t,
    algo: sys::cublasLtMatmulAlgo_t,
    ws: usize,
}

impl Drop for Plan {
    fn drop(&mut self) {
        // Destruction failures leak a descriptor at worst; nothing to report them to.
        unsafe {
            let _ = lt::destroy_matrix_layout(self.a);
            let _ = lt::destroy_matrix_layout(self.b);
            let _ = lt::destroy_matrix_layout(self.d);
            let _ = lt::destroy_matmul_desc(self.desc);
        }
    }
}

fn lt_err(what: &str) -> impl Fn(lt::CublasError) -> Error + '_ {
    move |e| Error::Driver(format!("cuBLASLt {what}: {e}"))
}

unsafe fn set_desc<T>(
    desc: sys::cublasLtMatmulDesc_t,
    attr: sys::cublasLtMatmulDescAttributes_t,
    v: &T,
) -> Result<()> {
    lt::set_matmul_desc_attribute(
        desc,
        attr,
        v as *const T as *const c_void,
        std::mem::size_of::<T>(),
    )
    .map_err(lt_err("setting a matmul attribute"))
}

unsafe fn set_scale_pointers(desc: sys::cublasLtMatmulDesc_t, g: &Fp8Gemm) -> Result<()> {
    use sys::cublasLtMatmulDescAttributes_t as A;
    if g.scaling == Scaling::Block || g.w_scale != 0 {
        set_desc(desc, A::CUBLASLT_MATMUL_DESC_A_SCALE_POINTER, &g.w_scale)?;
    }
    if g.scaling == Scaling::Block || g.x_scale != 0 {
        set_desc(desc, A::CUBLASLT_MATMUL_DESC_B_SCALE_POINTER, &g.x_scale)?;
    }
    Ok(())
}

/// The cuBLASLt handle of one GPU, its workspace and the plans of the shapes seen so far.
pub struct BlasLt {
    gpu: Arc<Gpu>,
    handle: sys::cublasLtHandle_t,
    pref: sys::cublasLtMatmulPreference_t,
    workspace: DevBuf,
    plans: Mutex<HashMap<Key, Plan>>,
    autotune: std::sync::atomic::AtomicBool,
}

// The handle and descriptors are plain host objects; every use goes through `&self` on the one
// stream of `gpu`, and the plan cache (whose descriptors `gemm` mutates) sits behind a mutex.
unsafe impl Send for BlasLt {}
unsafe impl Sync for BlasLt {}

impl BlasLt {
    /// Loads cuBLASLt (a clear [`Error::NoDriver`] if the library is missing) and creates the
    /// handle and workspace.
    pub fn new(gpu: Arc<Gpu>) -> Result<Self> {
        if !unsafe { sys::is_culib_present() } {
            return Err(Error::NoDriver(
                "cuBLASLt (libcublasLt.so) was not found; the FP8 tensor-core GEMMs need it: \
                 install the CUDA toolkit's cuBLAS (or the nvidia-cublas wheel) and add its lib \
                 directory to LD_LIBRARY_PATH"
                    .into(),
            ));
        }
        gpu.ctx
            .bind_to_thread()
            .map_err(|e| Error::Driver(format!("binding the CUDA context: {e}")))?;
        let handle = lt::create_handle().map_err(lt_err("creating the handle"))?;
        let pref = lt::create_matmul_pref().map_err(lt_err("creating a preference"))?;
        let ws = WORKSPACE_BYTES;
        unsafe {
            lt::set_matmul_pref_attribute(
                pref,
                sys::cublasLtMatmulPreferenceAttributes_t::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                &ws as *const usize as *const c_void,
                std::mem::size_of::<usize>(),
            )
            .map_err(lt_err("setting the workspace size"))?;
        }
        let workspace = gpu.alloc(ws)?;
        Ok(BlasLt {
            gpu,
            handle,
            pref,
            workspace,
            plans: Mutex::new(HashMap::new()),
            autotune: std::sync::atomic::AtomicBool::new(true),
        })
    }

    pub fn gpu(&self) -> &Arc<Gpu> {
        &self.gpu
    }

    fn plan(&self, key: Key, g: &Fp8Gemm) -> Result<Plan> {
        use sys::cublasLtMatmulDescAttributes_t as A;
        use sys::cublasLtMatmulMatrixScale_t as S;
        let f8 = sys::cudaDataType::CUDA_R_8F_E4M3;
        let desc = lt::create_matmul_desc(
            sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
            sys::cudaDataType::CUDA_R_32F,
        )
        .map_err(lt_err("creating a matmul descriptor"))?;
        // Owned from here on so that an error below frees what was made.
        let mut plan = Plan {
            desc,
            a: std::ptr::null_mut(),
            b: std::ptr::null_mut(),
            d: std::ptr::null_mut(),
            algo: unsafe { std::mem::zeroed() },
            ws: 0,
        };
        unsafe {
            set_desc(desc, A::CUBLASLT_MATMUL_DESC_TRANSA, &1i32)?;
            set_desc(desc, A::CUBLASLT_MATMUL_DESC_TRANSB, &0i32)?;
            if key.fast_accum {
                set_desc(desc, A::CUBLASLT_MATMUL_DESC_FAST_ACCUM, &1i8)?;
            }
            // The block modes need their scale pointers present when the algorithm is chosen
            // (a null one is an invalid value); each call sets its own again.
            set_scale_pointers(desc, g)?;
            if key.scaling == Scaling::Block {
                set_desc(
                    desc,
                    A::CUBLASLT_MATMUL_DESC_A_SCALE_MODE,
                    &(S::CUBLASLT_MATMUL_MATRIX_SCALE_BLK128x128_32F as u32),
                )?;
                set_desc(
                    desc,
                    A::CUBLASLT_MATMUL_DESC_B_SCALE_MODE,
                    &(S::CUBLASLT_MATMUL_MATRIX_SCALE_VEC128_32F as u32),
                )?;
            }
        }
        let layout = |t, rows: usize, cols: usize, ld: usize| {
            lt::create_matrix_layout(t, rows as u64, cols as u64, ld as i64)
                .map_err(lt_err("creating a matrix layout"))
        };
        plan.a = layout(f8, key.k, key.n, key.k)?;
        plan.b = layout(f8, key.k, key.m, key.k)?;
        plan.d = layout(key.out.cuda(), key.n, key.m, key.ldd)?;
        let mut cands: Vec<sys::cublasLtMatmulHeuristicResult_t> =
            vec![unsafe { std::mem::zeroed() }; AUTOTUNE_CANDIDATES];
        let mut found = 0i32;
        let st = unsafe {
            sys::cublasLtMatmulAlgoGetHeuristic(
                self.handle,
                desc,
                plan.a,
                plan.b,
                plan.d,
                plan.d,
                self.pref,
                cands.len() as i32,
                cands.as_mut_ptr(),
                &mut found,
            )
        };
        cands.truncate(found.max(0) as usize);
        cands.retain(|c| c.state == sys::cublasStatus_t::CUBLAS_STATUS_SUCCESS);
        if st != sys::cublasStatus_t::CUBLAS_STATUS_SUCCESS || cands.is_empty() {
            return Err(Error::Unsupported(format!(
                "cuBLASLt has no FP8 {:?}-scaled kernel for M={} N={} K={} ({st:?})",
                key.scaling, key.m, key.n, key.k
            )));
        }
        plan.algo = cands[0].algo;
        plan.ws = cands[0].workspaceSize;
        // The heuristic's first choice is not always the fastest for the narrow-K shapes:
        // time the candidates on this call's own operands (D is rewritten by the call itself).
        let tune = self.autotune.load(std::sync::atomic::Ordering::Relaxed)
            && key.m >= AUTOTUNE_MIN_M
            && cands.len() > 1;
        if tune {
            let mut best = f32::INFINITY;
            for c in &cands {
                let t = self.time_algo(&plan, c, g);
                if let Ok(t) = t {
                    if t < best {
                        best = t;
                        plan.algo = c.algo;
                        plan.ws = c.workspaceSize;
                    }
                }
            }
        }
        Ok(plan)
    }

    /// Milliseconds of one run of `g` with candidate `c` (median of 3 after a warm-up).
    fn time_algo(
        &self,
        p: &Plan,
        c: &sys::cublasLtMatmulHeuristicResult_t,
        g: &Fp8Gemm,
    ) -> Result<f32> {
        use cudarc::driver::sys::CUevent_flags;
        let ev = || {
            self.gpu
                .ctx
                .new_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
                .map_err(|e| Error::Driver(format!("creating an event: {e}")))
        };
        let (start, end) = (ev()?, ev()?);
        let mut t = Vec::new();
        for i in 0..4 {
            start
                .record(&self.gpu.stream)
                .map_err(|e| Error::Driver(format!("recording an event: {e}")))?;
            self.launch(p, &c.algo, c.workspaceSize, g)?;
            end.record(&self.gpu.stream)
                .map_err(|e| Error::Driver(format!("recording an event: {e}")))?;
            let ms = start
                .elapsed_ms(&end)
                .map_err(|e| Error::Driver(format!("timing a GEMM: {e}")))?;
            if i > 0 {
                t.push(ms);
            }
        }
        t.sort_by(f32::total_cmp);
        Ok(t[1])
    }

    /// Whether new plans of at least [`AUTOTUNE_MIN_M`] rows time the heuristic's candidates
    /// (default on). Tuning synchronizes the stream: make the plans before any graph capture.
    pub fn set_autotune(&self, on: bool) {
        self.autotune
            .store(on, std::sync::atomic::Ordering::Relaxed);
    }

    fn launch(
        &self,
        p: &Plan,
        algo: &sys::cublasLtMatmulAlgo_t,
        ws: usize,
        g: &Fp8Gemm,
    ) -> Result<()> {
        unsafe {
            // The scale pointers change per call (per-call activation scales); cheap host writes.
            set_scale_pointers(p.desc, g)?;
            let (alpha, beta) = (1f32, 0f32);
            lt::matmul(
                self.handle,
                p.desc,
                &alpha as *const f32 as *const c_void,
                &beta as *const f32 as *const c_void,
                g.w as *const c_void,
                p.a,
                g.x as *const c_void,
                p.b,
                g.d as *const c_void,
                p.d,
                g.d as *mut c_void,
                p.d,
                algo,
                self.workspace.ptr as *mut c_void,
                ws.min(WORKSPACE_BYTES),
                self.gpu.stream.cu_stream() as sys::cudaStream_t,
            )
            .map_err(lt_err("matmul"))
        }
    }

    /// Queues `g` on the GPU's stream (the plan of a new shape is made on first use).
    pub fn gemm(&self, g: &Fp8Gemm) -> Result<()> {
        if g.m == 0 || g.n == 0 {
            return Ok(());
        }
        if !g.k.is_multiple_of(16) || !(g.ldd * g.out.bytes()).is_multiple_of(16) || g.ldd < g.n {
            return Err(Error::Unsupported(format!(
                "FP8 GEMM needs K a multiple of 16 and 16-byte output rows (K={}, ldd={})",
                g.k, g.ldd
            )));
        }
        if g.scaling == Scaling::Block && !g.m.is_multiple_of(M_ALIGN) {
            return Err(Error::Unsupported(format!(
                "block-scaled FP8 GEMM needs M a multiple of {M_ALIGN} (M={}); pad the rows",
                g.m
            )));
        }
        let key = Key {
            m: g.m,
            n: g.n,
            k: g.k,
            ldd: g.ldd,
            out: g.out,
            scaling: g.scaling,
            fast_accum: g.fast_accum,
        };
        let mut plans = self.plans.lock().unwrap_or_else(|p| p.into_inner());
        let p = match plans.entry(key) {
            std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::hash_map::Entry::Vacant(e) => e.insert(self.plan(key, g)?),
        };
        self.launch(p, &p.algo, p.ws, g)
    }
}

impl Drop for BlasLt {
    fn drop(&mut self) {
        self.plans.lock().unwrap_or_else(|p| p.into_inner()).clear();
        unsafe {
            let _ = lt::destroy_matmul_pref(self.pref);
            let _ = lt::destroy_handle(self.handle);
        }
    }
}

/// An FP8 weight (`GpuLinear` of 128×128-block FP8) in the layout of the tensor-core GEMM:
/// codes `[n, kp]` with `kp = k` rounded up to 128 (zero columns), f32 block scales with rows
/// padded to [`SCALE_ROW_ALIGN`]. Where the stored layout already qualifies (k a multiple of 128,
/// k/128 a multiple of 4: every dense projection of Flash and Pro) it points into the
/// `GpuLinear`'s buffers and costs no memory: it must not outlive that `GpuLinear`.
pub struct Fp8TcWeight {
    pub w: u64,
    pub scales: u64,
    pub scale_ld: usize,
    pub n: usize,
    pub k: usize,
    pub kp: usize,
    _bufs: Vec<DevBuf>,
}

impl Fp8TcWeight {
    pub fn new(gpu: &Gpu, g: &GpuLinear) -> Result<Self> {
        Self::with_scale_align(gpu, g, SCALE_ROW_ALIGN)
    }

    /// [`Fp8TcWeight::new`] with the weight-scale rows padded to `align` floats (tests check
    /// the layout cuBLASLt reads with it).
    #[doc(hidden)]
    pub fn with_scale_align(gpu: &Gpu, g: &GpuLinear, align: usize) -> Result<Self> {
        let d = &g.desc;
        if g.fmt != Fmt::Fp8 || d.bo != 128 || d.bi != 128 {
            return Err(Error::Unsupported(format!(
                "the tensor-core FP8 GEMM takes FP8 weights with 128x128 scale blocks, not \
                 {:?} {}x{}",
                g.fmt, d.bo, d.bi
            )));
        }
        let (n, k) = (g.out, g.inp);
        if !n.is_multiple_of(16) {
            return Err(Error::Unsupported(format!(
                "the tensor-core FP8 GEMM needs the output width to be a multiple of 16 \
                 (16-byte output rows); this weight has {n} rows: use the SIMT path"
            )));
        }
        let kp = k.next_multiple_of(128);
        let (nb, kb) = (n.div_ceil(128), k.div_ceil(128));
        let scale_ld = kb.next_multiple_of(align);
        let mut bufs = Vec::new();
        let mut w = d.w;
        if kp != k {
            let b = gpu.alloc(n * kp)?;
            let total = (n * kp) as u32;
            let (dst, (ni, ki, kpi)) = (b.ptr, (n as i32, k as i32, kp as i32));
            gpu.launch(
                "pad_fp8_weight",
                (total.div_ceil(256), 1, 1),
                (256, 1, 1),
                0,
                &[&w, &ni, &ki, &dst, &kpi],
            )?;
            w = b.ptr;
            bufs.push(b);
        }
        let mut scales = d.scales;
        if scale_ld != kb {
            let b = gpu.alloc(nb * scale_ld * 4)?;
            let (dst, (nbi, kbi, ldi)) = (b.ptr, (nb as i32, kb as i32, scale_ld as i32));
            gpu.launch(
                "pad_scales",
                (((nb * scale_ld) as u32).div_ceil(256), 1, 1),
                (256, 1, 1),
                0,
                &[&scales, &nbi, &kbi, &dst, &ldi],
            )?;
            scales = b.ptr;
            bufs.push(b);
        }
        Ok(Fp8TcWeight {
            w,
            scales,
            scale_ld,
            n,
            k,
            kp,
            _bufs: bufs,
        })
    }
}

/// Buffers of the tensor-core linear path, grown on demand: the activation codes and scales,
/// and the output rows past a multiple of [`M_ALIGN`].
#[derive(Default)]
pub struct Fp8Scratch {
    pub codes: Option<DevBuf>,
    pub scales: Option<DevBuf>,
    pub out: Option<DevBuf>,
}

fn ensure(gpu: &Gpu, b: &mut Option<DevBuf>, bytes: usize) -> Result<u64> {
    if bytes > 0 && b.as_ref().is_none_or(|b| b.bytes < bytes) {
        *b = None; // free first: the GPU may not hold both
        *b = Some(gpu.alloc(bytes)?);
    }
    Ok(b.as_ref().map_or(0, |b| b.ptr))
}

impl Fp8Scratch {
    /// Device addresses of (codes `[mp, kp]`, scales `[kp/128, mp]`, output `[mp, out_n]`
    /// f32; `out_n` = 0 when the output needs no staging: address 0 then).
    pub fn ensure(
        &mut self,
        gpu: &Gpu,
        mp: usize,
        kp: usize,
        out_n: usize,
    ) -> Result<(u64, u64, u64)> {
        let out = if out_n > 0 {
            ensure(gpu, &mut self.out, mp * out_n * 4)?
        } else {
            0
        };
        Ok((
            ensure(gpu, &mut self.codes, mp * kp)?,
            ensure(gpu, &mut self.scales, kp / 128 * mp * 4)?,
            out,
        ))
    }
}
