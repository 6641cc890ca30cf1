//! Choosing the backend device from the config (`train.device`).
//!
//! `cpu` is burn's `flex` backend, always built. GPUs need the binary built with a cargo
//! feature: `cuda` (burn's CubeCL CUDA runtime; kernels compile at run time through NVRTC, so
//! the build needs no CUDA toolkit and no network) or `vulkan` (wgpu over Vulkan, pure Rust).
//! Model code is backend-agnostic: every module and tensor takes the chosen `Device`.
//!
//! A CUDA device is checked before use (driver and NVRTC libraries loadable, the CUDA headers
//! NVRTC includes present, the index in range), so a missing piece is a message saying what to
//! install or set, not a panic deep inside the runtime.

use burn::prelude::Device;

/// Parses `cpu`, `cuda[:N]` or `vulkan[:N]` (N = index among discrete GPUs, default 0) for
/// `train.device`; see [`parse_device_for`].
pub fn parse_device(spec: &str) -> Result<Device, String> {
    parse_device_for(spec, "train.device")
}

/// Like [`parse_device`]; errors name the setting `key` (e.g. `--device`).
pub fn parse_device_for(spec: &str, key: &str) -> Result<Device, String> {
    let (kind, index) = match spec.split_once(':') {
        Some((k, i)) => (
            k,
            i.parse::<usize>()
                .map_err(|_| format!("`{key}` = \"{spec}\": `{i}` is not a device index"))?,
        ),
        None => (spec, 0),
    };
    match kind {
        "cpu" => Ok(Device::flex()),
        "cuda" => cuda(index, spec, key),
        "vulkan" => vulkan(index, spec, key),
        _ => Err(format!(
            "`{key}` = \"{spec}\": expected \"cpu\", \"cuda[:N]\" or \"vulkan[:N]\""
        )),
    }
}

#[cfg(feature = "cuda")]
fn cuda(index: usize, spec: &str, key: &str) -> Result<Device, String> {
    let at = |m: String| format!("`{key}` = \"{spec}\": {m}");
    // SAFETY: only probes whether the shared libraries can be opened.
    let (driver, nvrtc) = unsafe {
        (
            cudarc::driver::sys::is_culib_present(),
            cudarc::nvrtc::sys::is_culib_present(),
        )
    };
    if !driver {
        return Err(at("cannot load the CUDA driver library (libcuda.so): is an NVIDIA driver installed, and is its library on the loader path (LD_LIBRARY_PATH)?".into()));
    }
    if !nvrtc {
        return Err(at("cannot load NVRTC (libnvrtc.so), which compiles troupe's CUDA kernels at run time: install the CUDA toolkit's NVRTC (e.g. the `nvidia-cuda-nvrtc` wheel or the toolkit) and put its lib folder on LD_LIBRARY_PATH".into()));
    }
    match cubecl::cuda::install::cuda_path().map(|p| p.join("include")) {
        Some(inc) if inc.join("cuda_fp16.h").is_file() => {}
        Some(inc) => {
            return Err(at(format!(
                "{} has no cuda_fp16.h: NVRTC needs the CUDA toolkit headers; set CUDA_PATH to a CUDA installation whose include/ has them",
                inc.display()
            )));
        }
        None => {
            return Err(at("no CUDA installation found for NVRTC's headers: set CUDA_PATH (a folder with include/cuda_fp16.h; /usr/local/cuda and /opt/cuda are tried)".into()));
        }
    }
    let count = cudarc::driver::result::init()
        .and_then(|()| cudarc::driver::result::device::get_count())
        .map_err(|e| at(format!("the CUDA driver does not start: {e}")))?;
    if index >= count as usize {
        return Err(at(format!(
            "this machine has {count} CUDA device(s) (indices 0..{count})"
        )));
    }
    Ok(Device::cuda(index))
}

#[cfg(not(feature = "cuda"))]
fn cuda(_index: usize, spec: &str, key: &str) -> Result<Device, String> {
    Err(format!(
        "`{key}` = \"{spec}\": this build has no CUDA backend (rebuild with `--features cuda`)"
    ))
}

#[cfg(feature = "vulkan")]
fn vulkan(index: usize, _spec: &str, _key: &str) -> Result<Device, String> {
    Ok(Device::vulkan(burn::tensor::DeviceKind::DiscreteGpu(index)))
}

#[cfg(not(feature = "vulkan"))]
fn vulkan(_index: usize, spec: &str, key: &str) -> Result<Device, String> {
    Err(format!(
        "`{key}` = \"{spec}\": this build has no Vulkan backend (rebuild with `--features vulkan`)"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs() {
        assert!(parse_device("cpu").is_ok());
        let e = parse_device("tpu").unwrap_err();
        assert!(e.contains("train.device") && e.contains("tpu"), "{e}");
        let e = parse_device("cuda:x").unwrap_err();
        assert!(e.contains("not a device index"), "{e}");
        #[cfg(not(feature = "vulkan"))]
        assert!(
            parse_device("vulkan")
                .unwrap_err()
                .contains("--features vulkan")
        );
    }
}
