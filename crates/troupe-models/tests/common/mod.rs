//! Helpers shared by the parity tests.

use burn::prelude::*;
use burn::tensor::FloatDType;

/// Largest |a − b| over all elements (both read as f32). Fails on any NaN or infinity on
/// either side, which a plain `f32::max` fold would silently drop.
pub fn max_abs_diff<const D: usize>(a: Tensor<D>, b: Tensor<D>) -> f32 {
    assert_eq!(a.dims(), b.dims(), "shapes differ");
    let read = |t: Tensor<D>| {
        t.cast(FloatDType::F32)
            .into_data()
            .try_to_vec::<f32>()
            .unwrap()
    };
    troupe_pt::parity::max_abs_diff(&read(a), &read(b), "output") as f32
}
