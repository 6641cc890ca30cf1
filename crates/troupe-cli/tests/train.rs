//! `troupe train` end to end on the bundled tiny pipeline: exact resume after a `kill -9`-like
//! crash, fall-back past half-written checkpoints, and config errors that name the key.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn troupe(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_troupe"));
    cmd.current_dir(root()).args(args);
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("run troupe")
}

/// `troupe train --config configs/tiny.toml --set run.dir=DIR --set …` for each of `sets`,
/// with `env` set.
fn train_env(run_dir: &Path, sets: &[&str], env: &[(&str, &str)]) -> Output {
    let dir = format!("run.dir={}", run_dir.display());
    let mut args = vec![
        "train",
        "--config",
        "configs/tiny.toml",
        "--set",
        dir.as_str(),
    ];
    for s in sets {
        args.extend(["--set", s]);
    }
    troupe(&args, env)
}

/// [`train_env`] with no environment.
fn train_with(run_dir: &Path, sets: &[&str]) -> Output {
    train_env(run_dir, sets, &[])
}

/// A tiny run of `steps` steps, checkpoints every 3.
fn train(run_dir: &Path, steps: u64, env: &[(&str, &str)]) -> Output {
    let steps = format!("train.max_steps={steps}");
    train_env(
        run_dir,
        &[&steps, "checkpoint.every_steps=3", "data.workers=2"],
        env,
    )
}

fn read(dir: &Path, file: &str) -> Vec<u8> {
    std::fs::read(dir.join(file)).unwrap_or_else(|e| panic!("{}: {e}", dir.join(file).display()))
}

#[test]
fn crash_and_resume_is_bit_identical_to_a_straight_run() {
    let tmp = tempfile::tempdir().unwrap();
    let straight = tmp.path().join("straight");
    let out = train(&straight, 6, &[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Die like kill -9 after step 4 (the last checkpoint is step 3).
    let crashed = tmp.path().join("crashed");
    let out = train(&crashed, 6, &[("TROUPE_CRASH_AFTER_STEP", "4")]);
    assert!(!out.status.success(), "the crash hook did not fire");
    let ckpts = crashed.join("checkpoints");
    assert!(ckpts.join("step-00000003/COMPLETE").is_file());
    // A newer, half-written checkpoint (no COMPLETE marker) must be detected and skipped.
    let half = ckpts.join("step-00000005");
    std::fs::create_dir_all(&half).unwrap();
    std::fs::write(half.join("adapter.safetensors"), b"partial").unwrap();

    // The kill also tore the records mid-write: half a metrics line, half an event.
    let mut metrics = std::fs::OpenOptions::new()
        .append(true)
        .open(crashed.join("metrics.jsonl"))
        .unwrap();
    std::io::Write::write_all(&mut metrics, b"{\"step\":5,\"loss\":1.2").unwrap();
    let events = std::fs::read_dir(&crashed)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.to_string_lossy().contains("tfevents"))
        .unwrap();
    let mut bytes = std::fs::read(&events).unwrap();
    bytes.extend_from_slice(&[7, 0, 0, 0, 0, 0]);
    std::fs::write(&events, bytes).unwrap();
    // The torn line does not stop `troupe plot` (it is left out, with a warning).
    let out = troupe(&["plot", crashed.to_str().unwrap()], &[]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && stderr.contains("cut off"),
        "{stderr}"
    );

    let out = troupe(&["train", "--resume", crashed.to_str().unwrap()], &[]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    // The resumed run's records equal the straight run's: each step once, the same values
    // (timings aside), in metrics.jsonl and in the TensorBoard events.
    let values = |run: &Path| -> Vec<serde_json::Value> {
        let (records, torn) =
            troupe_train::records::read_metrics(&run.join("metrics.jsonl")).unwrap();
        assert!(torn.is_none());
        records
            .into_iter()
            .map(|mut r| {
                for timing in ["elapsed_s", "samples_per_s", "step_s", "data_wait_s"] {
                    r.as_object_mut().unwrap().remove(timing);
                }
                r
            })
            .collect()
    };
    assert_eq!(values(&straight), values(&crashed));
    let steps = |run: &Path| troupe_train::tensorboard::event_steps(run).unwrap();
    assert_eq!(steps(&crashed), steps(&straight));
    assert_eq!(steps(&straight), (1..=6).collect::<Vec<u64>>());
    assert!(
        stderr.contains("step-00000005") && stderr.contains("no COMPLETE marker"),
        "{stderr}"
    );
    assert!(stderr.contains("previous complete checkpoint"), "{stderr}");

    let a = straight.join("checkpoints/step-00000006");
    let b = crashed.join("checkpoints/step-00000006");
    for f in ["adapter.safetensors", "optimizer.safetensors", "state.json"] {
        assert!(
            read(&a, f) == read(&b, f),
            "{f} differs between the straight and the resumed run"
        );
    }
    // An export of the run states the adapter's whole architecture (the tiny run's PPR head
    // width is 8, not StoryMaker's 64), so `troupe inspect` reads it back.
    let exported = tmp.path().join("exported.safetensors");
    for args in [
        vec![
            "export",
            straight.to_str().unwrap(),
            "--out",
            exported.to_str().unwrap(),
        ],
        vec!["inspect", exported.to_str().unwrap()],
    ] {
        let out = troupe(&args, &[]);
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // The loss curves render from metrics.jsonl.
    let out = troupe(&["plot", straight.to_str().unwrap()], &[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let png = image::open(straight.join("losses.png")).unwrap();
    assert_eq!((png.width(), png.height()), (1200, 900));
    // Several runs overlay in one plot, which then needs a name.
    let both = tmp.path().join("both.png");
    let runs = [straight.to_str().unwrap(), crashed.to_str().unwrap()];
    let out = troupe(
        &["plot", runs[0], runs[1], "--out", both.to_str().unwrap()],
        &[],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(image::open(&both).unwrap().width(), 1200);
}

#[test]
fn keep_last_prunes_all_but_the_newest_checkpoints() {
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("run");
    let sets = [
        "train.max_steps=5",
        "checkpoint.every_steps=1",
        "checkpoint.keep_last=2",
    ];
    let out = train_with(&run, &sets);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Five checkpoints were written; the three oldest are gone.
    let mut names: Vec<String> = std::fs::read_dir(run.join("checkpoints"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names, ["step-00000004", "step-00000005"]);
}

#[test]
fn corrupted_checkpoint_is_never_loaded() {
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("run");
    let out = train(&run, 3, &[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let file = run.join("checkpoints/step-00000003/adapter.safetensors");
    let mut bytes = std::fs::read(&file).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0xff;
    std::fs::write(&file, bytes).unwrap();
    let out = troupe(&["train", "--resume", run.to_str().unwrap()], &[]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("checksum mismatch for adapter.safetensors"),
        "{stderr}"
    );
    assert!(stderr.contains("no complete checkpoint"), "{stderr}");
}

#[test]
fn a_corrupted_newest_checkpoint_falls_back_to_the_previous_one() {
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("run");
    let out = train(&run, 6, &[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Step 6's adapter loses a byte's worth of bits: its checksum no longer matches.
    let file = run.join("checkpoints/step-00000006/adapter.safetensors");
    let good = std::fs::read(&file).unwrap();
    let mut bytes = good.clone();
    let last = bytes.len() - 1;
    bytes[last] ^= 0xff;
    std::fs::write(&file, bytes).unwrap();
    let out = troupe(&["train", "--resume", run.to_str().unwrap()], &[]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains("checksum mismatch for adapter.safetensors")
            && stderr.contains("previous complete checkpoint")
            && stderr.contains("step 3"),
        "{stderr}"
    );
    // Steps 4–6 again from step 3's checkpoint: the same adapter as the first time.
    assert!(std::fs::read(&file).unwrap() == good);
}

#[test]
fn running_the_same_command_again_continues_the_run() {
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("run");
    // Killed after step 4 (checkpoint at 3), then the very same command again.
    let out = train(&run, 6, &[("TROUPE_CRASH_AFTER_STEP", "4")]);
    assert!(!out.status.success(), "the crash hook did not fire");
    let out = train(&run, 6, &[]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains("already holds this run: continuing it") && stderr.contains("at step 3"),
        "{stderr}"
    );
    let (records, _) = troupe_train::records::read_metrics(&run.join("metrics.jsonl")).unwrap();
    let steps: Vec<u64> = records
        .iter()
        .map(|r| r["step"].as_u64().unwrap())
        .collect();
    assert_eq!(steps, (1..=6).collect::<Vec<u64>>());
}

#[test]
fn config_errors_name_the_key() {
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("r");
    for (set, key) in [
        ("train.max_stepz=3", "max_stepz"),
        ("checkpoint.keep_last=0", "checkpoint.keep_last"),
    ] {
        let out = train_with(&run, &[set]);
        assert!(!out.status.success());
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(key), "{stderr}");
    }
}

#[test]
fn repeated_non_finite_steps_stop_the_run_with_a_clear_message() {
    let tmp = tempfile::tempdir().unwrap();
    // An absurd learning rate blows the weights up; the loss turns non-finite.
    let run = tmp.path().join("r");
    let out = train_with(
        &run,
        &[
            "train.lr=1e30",
            "train.lr_adapter=1e30",
            "train.max_grad_norm=\"off\"",
            "train.max_nonfinite_steps=2",
            "train.max_steps=30",
            "checkpoint.every_steps=1",
        ],
    );
    assert!(!out.status.success());
    // The checkpoints taken before the blow-up stay complete and loadable; none after it.
    let mut names: Vec<String> = std::fs::read_dir(run.join("checkpoints"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert!(
        !names.is_empty(),
        "no checkpoint before the non-finite steps"
    );
    let last = run.join("checkpoints").join(names.last().unwrap());
    assert!(last.join("COMPLETE").is_file(), "{names:?}");
    let exported = tmp.path().join("last.safetensors");
    let export = troupe(
        &[
            "export",
            last.to_str().unwrap(),
            "--out",
            exported.to_str().unwrap(),
        ],
        &[],
    );
    assert!(
        export.status.success(),
        "{}",
        String::from_utf8_lossy(&export.stderr)
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("non-finite loss or gradient") && stderr.contains("step skipped"),
        "{stderr}"
    );
    assert!(
        stderr.contains("2 consecutive non-finite steps")
            && stderr.contains("train.max_nonfinite_steps"),
        "{stderr}"
    );
}

#[test]
fn sigterm_and_sigint_checkpoint_and_stop() {
    for signal in ["TERM", "INT"] {
        stops_on(signal);
    }
}

/// Trains until stopped by `kill -{signal}`; the run must checkpoint and exit 130.
fn stops_on(signal: &str) {
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("r");
    let dir = format!("run.dir={}", run.display());
    let child = Command::new(env!("CARGO_BIN_EXE_troupe"))
        .current_dir(root())
        .args([
            "train",
            "--config",
            "configs/tiny.toml",
            "--set",
            &dir,
            "--set",
            "train.max_steps=100000",
            "--set",
            "checkpoint.every_steps=100000",
        ])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Wait for a few logged steps, then ask it to stop.
    let metrics = run.join("metrics.jsonl");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    while std::fs::read_to_string(&metrics).map_or(0, |s| s.lines().count()) < 3 {
        assert!(
            std::time::Instant::now() < deadline,
            "training did not start"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let status = Command::new("kill")
        .args([&format!("-{signal}"), &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(130), "SIG{signal}: {stderr}");
    assert!(
        stderr.contains("interrupted at step"),
        "SIG{signal}: {stderr}"
    );
    let ckpts: Vec<_> = std::fs::read_dir(run.join("checkpoints"))
        .unwrap()
        .collect();
    assert_eq!(ckpts.len(), 1, "one checkpoint written on SIG{signal}");
}

#[test]
fn samples_and_validation_during_training() {
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("run");
    let out = train_with(
        &run,
        &[
            "train.max_steps=4",
            "samples.every_steps=2",
            "samples.steps=2",
            "samples.seeds=[0, 5]",
            "validation.every_steps=2",
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for step in ["step-00000002", "step-00000004"] {
        let dir = run.join("samples").join(step);
        // 2 prompts × 2 reference sets × 2 seeds, and the grid (2 columns of 64-px cells).
        let pngs = std::fs::read_dir(&dir).unwrap().count();
        assert_eq!(pngs, 9, "{}", dir.display());
        let grid = image::open(dir.join("grid.png")).unwrap();
        assert_eq!((grid.width(), grid.height()), (2 * 66 + 2, 4 * 66 + 2));
    }
    let metrics = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
    let val: Vec<(u64, f64)> = metrics
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter_map(|v| Some((v["step"].as_u64()?, v["val/loss"].as_f64()?)))
        .collect();
    assert_eq!(val.iter().map(|v| v.0).collect::<Vec<_>>(), [2, 4]);
    assert!(val.iter().all(|v| v.1.is_finite() && v.1 > 0.0), "{val:?}");
    // The samples are scored ([samples.scoring] of configs/tiny.toml): face similarity
    // clamped at 0 and at most 100, a rate, and CLIP scores as 100 × cosines.
    let scored: Vec<serde_json::Value> = metrics
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|v| v.get("eval/clip_t").is_some())
        .collect();
    assert_eq!(
        scored
            .iter()
            .map(|v| v["step"].as_u64().unwrap())
            .collect::<Vec<_>>(),
        [2, 4]
    );
    for v in &scored {
        let get = |k: &str| v[k].as_f64().unwrap_or(f64::NAN);
        assert!((0.0..=100.0001).contains(&get("eval/face_sim")), "{v}");
        assert!(
            (0.0..=1.0).contains(&get("eval/face_detection_rate")),
            "{v}"
        );
        for k in ["eval/clip_t", "eval/clip_i"] {
            assert!((-100.0..=100.0001).contains(&get(k)), "{v}");
        }
    }
    // Both reach TensorBoard: the scalar tag and the grid image.
    let events = std::fs::read_dir(&run)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.to_string_lossy().contains("tfevents"))
        .unwrap();
    let bytes = std::fs::read(events).unwrap();
    let has = |tag: &[u8]| bytes.windows(tag.len()).any(|w| w == tag);
    assert!(has(b"val/loss") && has(b"samples") && has(b"\x89PNG"));
    assert!(has(b"eval/face_sim") && has(b"eval/clip_t") && has(b"eval/clip_i"));
    // The plot gains a row for the sample scores.
    let out = troupe(&["plot", run.to_str().unwrap()], &[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let png = image::open(run.join("losses.png")).unwrap();
    assert_eq!((png.width(), png.height()), (1200, 1350));
}

#[test]
fn a_sample_reference_without_a_detectable_face_fails_at_start() {
    let tmp = tempfile::tempdir().unwrap();
    // At det_size 160 the stand-in detector finds no face in row synth-0-000003.
    let out = train_with(
        &tmp.path().join("run"),
        &["samples.scoring.det_size=160", "train.max_steps=1"],
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("samples.references[0]") && stderr.contains("no face"),
        "{stderr}"
    );
}

#[test]
fn a_sample_reference_typo_fails_at_start() {
    let tmp = tempfile::tempdir().unwrap();
    let out = train_with(
        &tmp.path().join("run"),
        &["samples.references=[[\"datasets/tiny/shard-00000.parquet#no-such-row\"]]"],
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("samples.references[0]") && stderr.contains("no-such-row"),
        "{stderr}"
    );
}

/// The `loss` of each step in a run's metrics.jsonl.
fn step_losses(run: &Path) -> Vec<f64> {
    let metrics = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
    metrics
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter_map(|v| v["loss"].as_f64())
        .collect()
}

#[test]
fn bf16_frozen_model_trains_close_to_f32() {
    let tmp = tempfile::tempdir().unwrap();
    let mut losses = Vec::new();
    for dtype in ["f32", "bf16"] {
        let run = tmp.path().join(dtype);
        let out = train_with(
            &run,
            &["train.max_steps=4", &format!("model.dtype=\"{dtype}\"")],
        );
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        losses.push(step_losses(&run));
    }
    let (f32, bf16) = (&losses[0], &losses[1]);
    assert_eq!((f32.len(), bf16.len()), (4, 4));
    for (i, (a, b)) in f32.iter().zip(bf16).enumerate() {
        assert!(
            b.is_finite() && (a - b).abs() <= 0.02 * a.abs(),
            "step {i}: f32 {a}, bf16 {b}"
        );
    }
    // The frozen model really computed in bf16: the losses are close, not equal.
    assert!(
        f32.iter().zip(bf16).any(|(a, b)| a != b),
        "{f32:?} vs {bf16:?}"
    );
}

#[test]
fn resume_continues_in_the_given_folder_with_the_allowed_changes() {
    let tmp = tempfile::tempdir().unwrap();
    let original = tmp.path().join("original");
    let out = train(&original, 3, &[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // A copy resumes in the copy, not in the folder its config was written for.
    let copy = tmp.path().join("copy");
    copy_dir(&original, &copy);
    let resume = |sets: &[&str]| {
        let mut args = vec!["train", "--resume", copy.to_str().unwrap()];
        for s in sets {
            args.extend(["--set", s]);
        }
        troupe(&args, &[])
    };
    // A change that would invalidate the steps taken is refused, naming the key.
    let out = resume(&["model.lora_rank=8"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("model.lora_rank"),
        "{stderr}"
    );
    // max_steps may change: the run goes on to 4 and says so.
    let out = resume(&["train.max_steps=4"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("train.max_steps: 3 → 4"), "{stderr}");
    assert!(copy.join("checkpoints/step-00000004/COMPLETE").is_file());
    assert!(!original.join("checkpoints/step-00000004").exists());
    let log = std::fs::read_to_string(copy.join("config-changes.log")).unwrap();
    assert!(log.contains("train.max_steps: 3 → 4"), "{log}");
    let config = std::fs::read_to_string(copy.join("config.toml")).unwrap();
    assert!(config.contains("max_steps = 4"), "{config}");
    assert!(
        config.contains(&format!("dir = {:?}", copy.display().to_string())),
        "{config}"
    );
}

#[test]
fn a_run_killed_before_its_first_checkpoint_resumes_from_step_zero() {
    let tmp = tempfile::tempdir().unwrap();
    let straight = tmp.path().join("straight");
    assert!(train(&straight, 4, &[]).status.success());
    // Killed after step 2; the first checkpoint would have been at step 3.
    let killed = tmp.path().join("killed");
    let out = train(&killed, 4, &[("TROUPE_CRASH_AFTER_STEP", "2")]);
    assert!(!out.status.success());
    assert!(!killed.join("checkpoints/step-00000003").exists());
    let out = troupe(&["train", "--resume", killed.to_str().unwrap()], &[]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && stderr.contains("from step 0"),
        "{stderr}"
    );
    let (a, b) = (
        straight.join("checkpoints/step-00000004"),
        killed.join("checkpoints/step-00000004"),
    );
    assert!(read(&a, "adapter.safetensors") == read(&b, "adapter.safetensors"));
    let steps = |run: &Path| troupe_train::tensorboard::event_steps(run).unwrap();
    assert_eq!(steps(&killed), steps(&straight));
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &to.join(e.file_name()));
        } else {
            std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
        }
    }
}

#[test]
fn a_second_writer_of_a_run_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("run");
    let dir = format!("run.dir={}", run.display());
    let mut first = Command::new(env!("CARGO_BIN_EXE_troupe"))
        .current_dir(root())
        .args(["train", "--config", "configs/tiny.toml", "--set", &dir])
        .args([
            "--set",
            "train.max_steps=100000",
            "--set",
            "samples.every_steps=0",
        ])
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // Wait until the first run holds the lock (its config is written after locking).
    let started = std::time::Instant::now();
    while !run.join("config.toml").is_file() && started.elapsed().as_secs() < 60 {
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let out = troupe(&["train", "--resume", run.to_str().unwrap()], &[]);
    first.kill().unwrap();
    first.wait().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("in use by troupe pid") && stderr.contains(&first.id().to_string()),
        "{stderr}"
    );
}

/// A 6-step tiny run (checkpoints every 3 steps, no samples or validation) in `run`, with
/// `env` set.
fn short_run(run: &Path, env: &[(&str, &str)]) -> Output {
    let sets = [
        "train.max_steps=6",
        "checkpoint.every_steps=3",
        "samples.every_steps=0",
        "validation.every_steps=0",
    ];
    train_env(run, &sets, env)
}

/// What a run's records hold, timings aside: its metrics lines and its event steps.
fn records_of(run: &Path) -> (Vec<serde_json::Value>, Vec<u64>) {
    let (metrics, _) = troupe_train::records::read_metrics(&run.join("metrics.jsonl")).unwrap();
    let metrics = metrics
        .into_iter()
        .map(|mut r| {
            for timing in ["elapsed_s", "samples_per_s", "step_s", "data_wait_s"] {
                r.as_object_mut().unwrap().remove(timing);
            }
            r
        })
        .collect();
    (
        metrics,
        troupe_train::tensorboard::event_steps(run).unwrap(),
    )
}

#[test]
fn a_kill_at_any_write_resumes_to_the_straight_run() {
    let tmp = tempfile::tempdir().unwrap();
    let straight = tmp.path().join("straight");
    assert!(short_run(&straight, &[]).status.success());
    let want = records_of(&straight);
    let final_adapter = read(
        &straight.join("checkpoints/step-00000006"),
        "adapter.safetensors",
    );
    let mut kills = 0;
    for n in 1.. {
        let run = tmp.path().join(format!("killed-{n}"));
        let out = short_run(&run, &[("TROUPE_CRASH_AT_WRITE", &n.to_string())]);
        if out.status.success() {
            break; // past the run's last write
        }
        kills += 1;
        let out = troupe(&["train", "--resume", run.to_str().unwrap()], &[]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "killed at write {n}: {stderr}");
        assert_eq!(records_of(&run), want, "records after a kill at write {n}");
        let adapter = read(
            &run.join("checkpoints/step-00000006"),
            "adapter.safetensors",
        );
        assert!(
            adapter == final_adapter,
            "adapter after a kill at write {n}"
        );
        let out = troupe(&["plot", run.to_str().unwrap()], &[]);
        assert!(out.status.success(), "plot after a kill at write {n}");
        std::fs::remove_dir_all(&run).unwrap();
    }
    assert!(kills > 20, "only {kills} write points");
}

#[test]
fn a_pose_controlnet_trains_and_resumes_bit_identically() {
    let tmp = tempfile::tempdir().unwrap();
    // configs/tiny-pose.toml is configs/tiny.toml plus the ControlNet.
    let run = |dir: &Path, config: &str, env: &[(&str, &str)]| {
        let dir = format!("run.dir={}", dir.display());
        let mut args = vec!["train", "--config", config, "--set", &dir];
        for s in [
            "train.max_steps=8",
            "checkpoint.every_steps=3",
            "data.workers=2",
        ] {
            args.extend(["--set", s]);
        }
        troupe(&args, env)
    };
    let straight = tmp.path().join("straight");
    let out = run(&straight, "configs/tiny-pose.toml", &[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The ControlNet's residuals change what the adapter learns (half the tiny rows have a pose).
    let plain = tmp.path().join("plain");
    let out = run(&plain, "configs/tiny.toml", &[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let adapter = "checkpoints/step-00000008/adapter.safetensors";
    assert!(tensors(&straight.join(adapter)) != tensors(&plain.join(adapter)));

    let crashed = tmp.path().join("crashed");
    let out = run(
        &crashed,
        "configs/tiny-pose.toml",
        &[("TROUPE_CRASH_AFTER_STEP", "5")],
    );
    assert!(!out.status.success(), "the crash hook did not fire");
    let out = troupe(&["train", "--resume", crashed.to_str().unwrap()], &[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for f in [adapter, "checkpoints/step-00000008/optimizer.safetensors"] {
        assert!(read(&straight, f) == read(&crashed, f), "{f} differs");
    }
}

/// A safetensors file's tensors (name, bytes), metadata left out.
fn tensors(path: &Path) -> Vec<(String, Vec<u8>)> {
    let bytes = std::fs::read(path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut out: Vec<(String, Vec<u8>)> = st
        .tensors()
        .into_iter()
        .map(|(k, v)| (k, v.data().to_vec()))
        .collect();
    out.sort();
    out
}
