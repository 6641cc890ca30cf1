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

/// Whether a panic message from a GPU runtime reports an exhausted device memory (CubeCL's
/// `OutOfMemory` launch/IO errors, the CUDA driver's `CUDA_ERROR_OUT_OF_MEMORY`, wgpu's
/// allocation failures).
pub fn is_out_of_memory(message: &str) -> bool {
    let m = message.to_ascii_lowercase();
    [
        "out-of-memory",
        "out of memory",
        "out of device memory",
        "outofmemory",
    ]
    .iter()
    .any(|p| m.contains(p))
}

/// The text of a panic payload.
fn panic_text(payload: &(dyn std::any::Any + Send)) -> &str {
    match (
        payload.downcast_ref::<&str>(),
        payload.downcast_ref::<String>(),
    ) {
        (Some(s), _) => s,
        (_, Some(s)) => s,
        _ => "",
    }
}

/// Runs `work`; a device out-of-memory inside it (which the GPU runtimes raise as a panic) comes
/// back as an error naming `what` and the usual remedies, without the runtime's backtrace.
/// Any other panic continues as it was.
pub fn catch_out_of_memory<T>(what: &str, work: impl FnOnce() -> T) -> Result<T, String> {
    static QUIET_HOOK: std::sync::Once = std::sync::Once::new();
    QUIET_HOOK.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if !is_out_of_memory(panic_text(info.payload())) {
                previous(info);
            }
        }));
    });
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(work)) {
        Ok(v) => Ok(v),
        Err(payload) if is_out_of_memory(panic_text(payload.as_ref())) => Err(format!(
            "the device ran out of memory during {what}: lower `train.batch_size` (raise \
             `train.grad_accum` to keep the effective batch), set `model.dtype = \"bf16\"`, \
             keep `objective.attention = \"efficient\"`, or train at a lower resolution"
        )),
        Err(payload) => std::panic::resume_unwind(payload),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn out_of_memory_panics_become_advice_and_others_stay_panics() {
        // The messages CubeCL's runtimes panic with (cubecl-runtime server errors).
        for m in [
            "An out-of-memory error happened during launch\nCaused by:\n  pool full",
            "out of device memory allocating 1073741824 bytes",
            "called `Result::unwrap()` on an `Err` value: OutOfMemory { size: 8 }",
            "CUDA_ERROR_OUT_OF_MEMORY: out of memory",
        ] {
            let e = catch_out_of_memory::<()>("a training step (batch 4)", || panic!("{m}"))
                .unwrap_err();
            assert!(e.contains("batch 4") && e.contains("model.dtype"), "{e}");
        }
        assert_eq!(catch_out_of_memory("x", || 7), Ok(7));
        let other = std::panic::catch_unwind(|| {
            let _ = catch_out_of_memory("x", || panic!("index out of bounds"));
        });
        assert!(other.is_err(), "a different panic is not swallowed");
    }

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
