//! Offline stand-in for `cubecl-llvm` 0.11.3: the public items `cubecl-cuda` names, with the
//! same shapes, and no LLVM. `cubecl-cuda` runs its CUDA C++ backend (NVRTC) when cubecl's
//! `cuda-cpp` feature is on, as troupe's `cuda` feature turns it on; then nothing here is
//! called except [`nvptx::ptx_version::PtxVersion::for_driver`], which only fills an option
//! the C++ backend ignores. Were the LLVM backend selected anyway, compiling a kernel fails
//! with a message saying so ([`PlironCompiler::compile`]).

use cubecl_core::prelude::KernelDefinition;
use cubecl_environment::backtrace::BackTrace;
use cubecl_runtime::compiler::{CompilationError, Compiler};
use cubecl_runtime::kernel::BufferIOAttr;

pub mod nvptx;
pub mod shared;

/// Why this build cannot lower kernels through LLVM.
const NO_LLVM: &str = "this build of troupe has no LLVM kernel compiler (cubecl-llvm is \
                       replaced by an offline stand-in); CUDA kernels compile through NVRTC: \
                       build with cubecl's `cuda-cpp` feature (troupe's `cuda` feature does)";

/// LLVM compilation targets.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum LlvmTarget {
    /// The host CPU.
    #[default]
    Cpu,
    /// NVIDIA GPUs (PTX).
    Nvptx,
}

/// Options of the (absent) LLVM compiler, as `cubecl-cuda` fills them.
#[derive(Clone, Debug, Default)]
pub struct PlironOptions {
    /// AMDGPU architecture (never set by the CUDA runtime).
    pub arch: Option<core::convert::Infallible>,
    /// NVPTX architecture.
    pub sm_arch: Option<cubecl_core::ir::nvidia::SmArch>,
    /// PTX version to emit.
    pub ptx_version: Option<nvptx::ptx_version::PtxVersion>,
    /// Pass scalars and static metadata in the kernel parameter block.
    pub grid_constants: bool,
}

/// A compiled NVPTX module (never produced here).
#[derive(Clone, Debug)]
pub struct NvptxModule {
    /// NUL-terminated PTX assembly.
    pub ptx: Vec<core::ffi::c_char>,
    /// Kernel entry point symbol.
    pub entrypoint: String,
    /// IR for logging and cache keys.
    pub ir: String,
    /// Shared memory required per launch, in bytes.
    pub shared_memory_size: usize,
    /// Buffer access modes in binding order.
    pub io: Vec<BufferIOAttr>,
}

/// A compiled kernel artifact (never produced here).
#[derive(Clone, Debug)]
pub enum PlironArtifact {
    /// NVPTX code.
    NvptxCode(NvptxModule),
    /// Nothing: this build has no LLVM.
    Unavailable,
}

/// The LLVM kernel compiler: every compilation fails with [`NO_LLVM`].
#[derive(Clone, Debug)]
pub struct PlironCompiler {
    /// The target it would compile for.
    pub target: LlvmTarget,
}

impl core::fmt::Display for PlironArtifact {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            PlironArtifact::NvptxCode(module) => f.write_str(&module.ir),
            PlironArtifact::Unavailable => f.write_str(NO_LLVM),
        }
    }
}

impl Compiler for PlironCompiler {
    type Representation = PlironArtifact;
    type CompilationOptions = PlironOptions;

    /// Always an error: this build has no LLVM.
    fn compile(
        &mut self,
        _kernel: KernelDefinition,
        _options: &PlironOptions,
    ) -> Result<PlironArtifact, CompilationError> {
        Err(CompilationError::Generic {
            reason: NO_LLVM.to_string(),
            backtrace: BackTrace::capture(),
        })
    }

    fn buffer_io(repr: &PlironArtifact) -> Option<Vec<BufferIOAttr>> {
        match repr {
            PlironArtifact::NvptxCode(module) => Some(module.io.clone()),
            PlironArtifact::Unavailable => None,
        }
    }

    fn extension(&self) -> &'static str {
        "ll"
    }

    fn lang_tag(&self) -> &'static str {
        "llvm"
    }
}
