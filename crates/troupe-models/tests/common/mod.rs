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
    let (a, b) = (read(a), read(b));
    let mut worst = 0f32;
    for (i, (x, y)) in a.iter().zip(&b).enumerate() {
        assert!(x.is_finite() && y.is_finite(), "element {i}: {x} vs {y}");
        worst = worst.max((x - y).abs());
    }
    worst
}
