//! The one comparison every parity check uses (tests and fixture tools of every crate): the
//! largest absolute difference between computed values and a reference's. It fails on a length
//! mismatch and on any NaN or infinity on either side, which a plain `f32::max` fold would
//! silently drop (an all-NaN output would then "match").

/// Largest `|got − want|`.
///
/// # Panics
/// If the lengths differ or any value is not finite; the message names `what` and the index.
pub fn max_abs_diff<T: Copy + Into<f64>>(got: &[T], want: &[T], what: &str) -> f64 {
    assert_eq!(
        got.len(),
        want.len(),
        "{what}: {} values, expected {}",
        got.len(),
        want.len()
    );
    let mut worst = 0f64;
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        let (g, w): (f64, f64) = ((*g).into(), (*w).into());
        assert!(g.is_finite() && w.is_finite(), "{what}[{i}]: {g} vs {w}");
        worst = worst.max((g - w).abs());
    }
    worst
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn differences_are_found_and_nan_fails() {
        assert_eq!(max_abs_diff(&[1.0f32, 2.0], &[1.0, 2.5], "x"), 0.5);
        let nan = std::panic::catch_unwind(|| max_abs_diff(&[f32::NAN], &[0.0], "x"));
        assert!(nan.is_err(), "a NaN output must not pass");
        let short = std::panic::catch_unwind(|| max_abs_diff(&[1.0f64], &[1.0, 2.0], "x"));
        assert!(short.is_err());
    }
}
