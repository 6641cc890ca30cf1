//! Choosing the backend device from the config (`train.device`).
//!
//! `cpu` is burn's `flex` backend, always built. GPUs need the binary built with a cargo
//! feature: `cuda` (burn's CubeCL CUDA runtime; its build downloads an LLVM bundle) or
//! `vulkan` (wgpu over Vulkan, pure Rust). Model code is backend-agnostic: every module and
//! tensor takes the chosen `Device`.

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
fn cuda(index: usize, _spec: &str, _key: &str) -> Result<Device, String> {
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
