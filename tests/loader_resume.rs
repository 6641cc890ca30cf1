//! Exact resume: the batches after restoring a saved position equal the uninterrupted stream.

use troupe_data::image_io::DecodeLimits;
use troupe_data::loader::{Batch, Loader, LoaderConfig, LoaderState};
use troupe_data::pack::{OnBadLine, pack_manifest};
use troupe_data::plan::SizeRule;
use troupe_data::shard::{ShardWriterOptions, find_shards};
use troupe_tests::{varied_rows, write_manifest_dataset};

fn dataset() -> (tempfile::TempDir, Vec<std::path::PathBuf>) {
    let dir = tempfile::tempdir().unwrap();
    let manifest = write_manifest_dataset(&dir.path().join("src"), &varied_rows(14));
    let out = dir.path().join("shards");
    let opts = ShardWriterOptions {
        rows_per_row_group: 3,
        shard_rows: 6,
        ..ShardWriterOptions::default()
    };
    pack_manifest(
        &manifest,
        &out,
        opts,
        OnBadLine::Fail,
        DecodeLimits::default(),
    )
    .unwrap();
    let shards = find_shards(&[out]).unwrap();
    (dir, shards)
}

fn config(workers: usize) -> LoaderConfig {
    LoaderConfig {
        batch_size: 2,
        seed: 11,
        // A window smaller than the dataset and not a multiple of the row-group size, so saved
        // positions fall in the middle of windows and of partly filled size groups.
        shuffle_window: 5,
        workers,
        prefetch_batches: 3,
        size_rule: SizeRule::reference(),
        ..LoaderConfig::default()
    }
}

fn take(loader: &mut Loader, n: usize) -> Vec<(Batch, LoaderState)> {
    (0..n)
        .map(|_| (loader.next_batch().unwrap(), loader.state().clone()))
        .collect()
}

#[test]
fn resuming_from_any_saved_position_continues_the_same_stream() {
    let (_dir, shards) = dataset();
    // Two and a bit epochs uninterrupted (the reference rule makes several size groups, so
    // epochs have partial batches and group completions out of stream order).
    let mut straight = Loader::new(&shards, config(2)).unwrap();
    let reference = take(&mut straight, 30);
    assert!(
        reference.last().unwrap().1.epoch >= 2,
        "the test spans epoch boundaries"
    );
    for stop in [1usize, 2, 3, 5, 8, 13, 17, 22] {
        let state = reference[stop - 1].1.clone();
        // The state survives serialisation (it is stored in checkpoints as JSON).
        let state: LoaderState =
            serde_json::from_str(&serde_json::to_string(&state).unwrap()).unwrap();
        let mut resumed = Loader::resume(&shards, config(1), state).unwrap();
        let after = take(&mut resumed, 30 - stop);
        for (k, ((a, sa), (b, sb))) in reference[stop..].iter().zip(&after).enumerate() {
            assert_eq!(a, b, "batch {} after resuming at {stop} differs", k + stop);
            assert_eq!(sa, sb);
        }
    }
}

#[test]
fn thread_count_does_not_change_the_stream() {
    let (_dir, shards) = dataset();
    let a = take(&mut Loader::new(&shards, config(1)).unwrap(), 10);
    let b = take(&mut Loader::new(&shards, config(3)).unwrap(), 10);
    assert_eq!(a, b);
}

#[test]
fn a_state_from_another_dataset_or_seed_is_refused() {
    let (_dir, shards) = dataset();
    let mut loader = Loader::new(&shards, config(1)).unwrap();
    loader.next_batch().unwrap();
    let state = loader.state().clone();
    let other_seed = LoaderConfig {
        seed: 12,
        ..config(1)
    };
    let err = Loader::resume(&shards, other_seed, state.clone())
        .err()
        .expect("seed mismatch refused");
    assert!(err.to_string().contains("seed 11"), "{err}");
    let err = Loader::resume(&shards[..1], config(1), state)
        .err()
        .expect("dataset mismatch refused");
    assert!(err.to_string().contains("same shards"), "{err}");
}

#[test]
fn oversampled_epochs_resume_exactly() {
    let (_dir, shards) = dataset();
    let oversampled = |workers| LoaderConfig {
        repeats: vec![1, 2, 5],
        ..config(workers)
    };
    let mut straight = Loader::new(&shards, oversampled(2)).unwrap();
    let reference = take(&mut straight, 40);
    // 14 rows of 1, 2, 3 characters in turn: an epoch holds 5·1 + 5·2 + 4·5 = 35 samples.
    let first_epoch: usize = reference
        .iter()
        .filter(|(b, _)| b.epoch == 0)
        .map(|(b, _)| b.len())
        .sum();
    assert_eq!(first_epoch, 35);
    for stop in [3usize, 11, 19] {
        let mut resumed =
            Loader::resume(&shards, oversampled(1), reference[stop - 1].1.clone()).unwrap();
        let after = take(&mut resumed, 40 - stop);
        for (k, ((a, _), (b, _))) in reference[stop..].iter().zip(&after).enumerate() {
            assert_eq!(a, b, "batch {} after resuming at {stop} differs", k + stop);
        }
    }
}
