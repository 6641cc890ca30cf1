//! Narrowing device features to what the LLVM backend lowers. `cubecl-cuda` calls
//! [`restrict_features`] only when its LLVM backend is selected; with the C++ backend (troupe's
//! build) it is never called, and were it called, the kernels it would restrict fail to compile
//! anyway with this crate's message.

use cubecl_core::ir::DeviceProperties;

/// The GPU target whose features are narrowed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GpuTarget {
    /// NVIDIA (PTX).
    Nvptx,
}

/// Leaves `props` as they are: there is no LLVM backend to narrow them for.
pub fn restrict_features(_props: &mut DeviceProperties, _target: GpuTarget) {}
