//! The DDPM schedule equals diffusers' `DDPMScheduler.alphas_cumprod` bit for bit.
//! Fixture: `scripts/make_ddpm_fixtures.py`.

use troupe_diffusion::schedule::{NoiseSchedule, Prediction, SchedulerConfig};

#[test]
fn alphas_cumprod_match_diffusers() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/ddpm.json");
    let all: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    for (name, case) in all.as_object().unwrap() {
        let config: SchedulerConfig = serde_json::from_value(case["config"].clone()).unwrap();
        let ddpm = NoiseSchedule::new(&config).unwrap();
        let want: Vec<u32> = serde_json::from_value(case["alphas_cumprod_bits"].clone()).unwrap();
        let got: Vec<u32> = ddpm.alphas_cumprod.iter().map(|a| a.to_bits()).collect();
        assert_eq!(got.len(), want.len(), "{name}");
        if !config.rescale_betas_zero_snr {
            assert_eq!(got, want, "{name}: bit for bit");
            continue;
        }
        // Zero-terminal-SNR rescaling differs from PyTorch in the last bits (its element-wise
        // kernels round differently, and cumprod compounds it): relative to each value, so the
        // last steps (ᾱ of 2e-7 … 2.5e-5) are held as tightly as the first.
        for (t, (g, w)) in got.iter().zip(&want).enumerate() {
            let (g, w) = (f32::from_bits(*g) as f64, f32::from_bits(*w) as f64);
            let rel = if w == 0.0 {
                g.abs()
            } else {
                ((g - w) / w).abs()
            };
            assert!(
                rel <= 1e-5,
                "{name}: t = {t}: {g} vs {w} (relative {rel:.2e})"
            );
        }
    }
}

#[test]
fn sdxl_defaults_and_min_snr_weights() {
    let ddpm = NoiseSchedule::new(&SchedulerConfig::sdxl()).unwrap();
    assert_eq!(ddpm.steps(), 1000);
    assert_eq!(ddpm.prediction, Prediction::Epsilon);
    // High SNR at t = 0 is clipped to γ; at t = 999 SNR < γ, so the weight is 1.
    // ᾱ₀ = 1 − β₀ = 1 − 0.00085 (scaled_linear starts at β = 0.00085): SNR₀ = ᾱ₀ / (1 − ᾱ₀).
    let snr0 = (1.0 - 0.00085) / 0.00085;
    let w0 = ddpm.min_snr_weight(0, 5.0);
    assert!(
        (w0 as f64 - 5.0 / snr0).abs() < 1e-6,
        "{w0} vs {}",
        5.0 / snr0
    );
    assert_eq!(ddpm.min_snr_weight(999, 5.0), 1.0);
}

#[test]
fn unknown_schedule_is_named() {
    let mut c = SchedulerConfig::sdxl();
    c.beta_schedule = "squaredcos_cap_v2".into();
    let err = NoiseSchedule::new(&c).unwrap_err();
    assert!(
        err.contains("beta_schedule") && err.contains("squaredcos_cap_v2"),
        "{err}"
    );
}
