//! The streaming loader: reads shards in the epoch plan's order, runs the per-sample recipe on
//! worker threads with bounded prefetch, and yields batches in plan order. Its position is a
//! [`LoaderState`] (epoch, batch): a loader built from a saved state yields exactly the batches
//! the uninterrupted loader would have yielded next.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, Sender, SyncSender};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;

use serde::{Deserialize, Serialize};

use crate::error::{DataError, Location, Result};
use crate::image_io::DecodeLimits;
use crate::plan::{DatasetIndex, EpochPlan, PlanOptions, RowRef, SizeRule, plan_epoch};
use crate::recipe::{self, ProcessedSample, RecipeConfig, SampleTrace, Scratch};
use crate::rng::{KeyedRng, Purpose};
use crate::schema::{EMBEDDING_DIM, Sample};
use crate::shard::ShardReader;

/// What to do with a row that cannot be used (corrupt image, bad embedding, ...).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum BadRowPolicy {
    /// Stop with an error naming file, row and field (default).
    #[default]
    Fail,
    /// Leave the row out of its batch, count it and report it through [`Loader::take_skipped`].
    Skip,
}

/// Loader settings.
#[derive(Debug, Clone)]
pub struct LoaderConfig {
    /// Samples per batch (a batch holds samples of one output size; see [`crate::plan`]).
    pub batch_size: usize,
    /// Run seed: with the epoch and sample position it determines every random choice.
    pub seed: u64,
    /// Rows per shuffle window (the in-memory shuffle buffer).
    pub shuffle_window: usize,
    /// Decoding threads (at least 1).
    pub workers: usize,
    /// Batches decoded ahead of the consumer.
    pub prefetch_batches: usize,
    /// Output size rule.
    pub size_rule: SizeRule,
    /// Bad-row policy.
    pub on_bad_row: BadRowPolicy,
    /// Per-sample recipe settings.
    pub recipe: RecipeConfig,
    /// Images over these limits are refused before decoding.
    pub limits: DecodeLimits,
    /// Appearances per epoch by character count (see [`PlanOptions::repeats`]).
    pub repeats: Vec<u32>,
}

impl Default for LoaderConfig {
    fn default() -> Self {
        Self {
            batch_size: 1,
            seed: 0,
            shuffle_window: 256,
            workers: std::thread::available_parallelism().map_or(1, |n| n.get()),
            prefetch_batches: 4,
            size_rule: SizeRule::reference(),
            on_bad_row: BadRowPolicy::Fail,
            recipe: RecipeConfig::default(),
            limits: DecodeLimits::default(),
            repeats: Vec::new(),
        }
    }
}

/// The loader's position: small, serialisable, stored in checkpoints.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LoaderState {
    /// Seed the positions refer to.
    pub seed: u64,
    /// Fingerprint of the dataset (see [`DatasetIndex::fingerprint`]).
    pub dataset: String,
    /// Current epoch.
    pub epoch: u64,
    /// Batches of the current epoch already yielded.
    pub batch: u64,
    /// Samples yielded since the start of the run.
    pub samples: u64,
    /// Rows skipped since the start of the run (with [`BadRowPolicy::Skip`]).
    pub skipped: u64,
}

/// A batch: tensors as flat row-major `Vec<f32>` with the shapes given in each field's doc.
/// `B` = samples, `C` = most characters of any sample in the batch, `H`×`W` = output size,
/// `S` = recipe crop size (224).
#[derive(Debug, Clone, PartialEq)]
pub struct Batch {
    /// Epoch of the batch.
    pub epoch: u64,
    /// Index of the batch in its epoch.
    pub index: u64,
    /// Sample ids, `B`.
    pub ids: Vec<String>,
    /// Captions after text dropout (`""` where dropped), `B`.
    pub captions: Vec<String>,
    /// Output height.
    pub height: u32,
    /// Output width.
    pub width: u32,
    /// Images in [-1, 1], `[B, 3, H, W]`.
    pub pixels: Vec<f32>,
    /// `C`.
    pub max_characters: usize,
    /// Characters per sample, `B`.
    pub num_characters: Vec<usize>,
    /// 1 for a real character, 0 for padding, `[B, C]`.
    pub character_mask: Vec<f32>,
    /// Identity embeddings (zero where padded or image-dropped), `[B, C, 512]`.
    pub id_embeds: Vec<f32>,
    /// CLIP-normalised character crops, `[B, C, 3, S, S]`.
    pub char_pixels: Vec<f32>,
    /// CLIP-normalised aligned face crops, `[B, C, 3, S, S]`.
    pub face_pixels: Vec<f32>,
    /// Character masks at latent resolution in [0, 1], `[B, C, H/8, W/8]`.
    pub masks: Vec<f32>,
    /// Pose images in [0, 1] at output size, `[B, 3, H, W]`; zeros for samples without pose.
    pub pose: Option<Vec<f32>>,
    /// 1 where the sample has a pose image, `B`.
    pub has_pose: Vec<f32>,
    /// Image conditioning dropped (crops and embeddings are zero), `B`.
    pub drop_image: Vec<bool>,
    /// Caption dropped, `B`.
    pub drop_text: Vec<bool>,
    /// SDXL micro-conditioning (original h, w, crop top, crop left, target h, w), `[B, 6]`.
    pub time_ids: Vec<f32>,
    /// What the recipe decided per sample (crop boxes, keypoints, rotations), `B`.
    pub traces: Vec<SampleTrace>,
}

impl Batch {
    /// Samples in the batch.
    pub fn len(&self) -> usize {
        self.ids.len()
    }

    /// Whether the batch is empty (never, for a yielded batch).
    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }
}

/// The streaming loader. See the module docs.
pub struct Loader {
    index: Arc<DatasetIndex>,
    config: LoaderConfig,
    state: LoaderState,
    pipeline: Option<Pipeline>,
    skipped: Vec<DataError>,
}

impl Loader {
    /// A loader at the start of epoch 0.
    pub fn new(shards: &[PathBuf], config: LoaderConfig) -> Result<Self> {
        Self::build(shards, config, None)
    }

    /// A loader continuing from `state`. Refuses a state saved for another dataset or seed.
    pub fn resume(shards: &[PathBuf], config: LoaderConfig, state: LoaderState) -> Result<Self> {
        Self::build(shards, config, Some(state))
    }

    fn build(shards: &[PathBuf], config: LoaderConfig, state: Option<LoaderState>) -> Result<Self> {
        let at = Location::file(shards.first().cloned().unwrap_or_default());
        if config.batch_size == 0 || config.workers == 0 || config.prefetch_batches == 0 {
            return Err(DataError::new(
                at,
                "batch_size, workers and prefetch_batches must all be at least 1",
            ));
        }
        let index = Arc::new(DatasetIndex::open(shards)?);
        let dataset = index.fingerprint();
        let state = match state {
            None => LoaderState {
                seed: config.seed,
                dataset,
                epoch: 0,
                batch: 0,
                samples: 0,
                skipped: 0,
            },
            Some(s) => {
                if s.dataset != dataset {
                    return Err(DataError::new(
                        at,
                        format!(
                            "the saved loader position is for dataset {}, but these shards are {dataset}; resume needs the same shards",
                            s.dataset
                        ),
                    ));
                }
                if s.seed != config.seed {
                    return Err(DataError::new(
                        at,
                        format!(
                            "the saved loader position used seed {}, not {}",
                            s.seed, config.seed
                        ),
                    ));
                }
                s
            }
        };
        Ok(Self {
            index,
            config,
            state,
            pipeline: None,
            skipped: Vec::new(),
        })
    }

    /// The position after the last batch returned.
    pub fn state(&self) -> &LoaderState {
        &self.state
    }

    /// The largest character count of any row, with the first row that has it (from the
    /// index: no row is decoded).
    pub fn most_characters(&self) -> (usize, Location) {
        self.index.most_characters()
    }

    /// Rows in the dataset.
    pub fn num_rows(&self) -> u64 {
        self.index.num_rows()
    }

    /// Rows skipped since the last call (policy `skip`), each with its file, row and reason.
    pub fn take_skipped(&mut self) -> Vec<DataError> {
        std::mem::take(&mut self.skipped)
    }

    /// The next batch; epochs follow one another without end. With policy `skip`, a whole
    /// epoch of batches that yield no row is an error (nothing would ever come).
    pub fn next_batch(&mut self) -> Result<Batch> {
        let mut empty_batches = 0u64;
        loop {
            if self.pipeline.is_none() {
                self.start_epoch()?;
            }
            let p = self.pipeline.as_mut().expect("started above");
            let (epoch, batch_index) = (p.plan.epoch, p.next);
            let epoch_len = p.plan.batches.len() as u64;
            let results = p.take(batch_index)?;
            let mut ok = Vec::with_capacity(results.len());
            for r in results {
                match r {
                    Ok(s) => ok.push(s),
                    Err(e) if self.config.on_bad_row == BadRowPolicy::Skip => {
                        self.state.skipped += 1;
                        self.skipped.push(e);
                    }
                    Err(e) => {
                        self.pipeline = None;
                        return Err(e);
                    }
                }
            }
            // The position is where the next batch comes from, so the end of an epoch is
            // (epoch + 1, 0).
            self.state.batch = batch_index + 1;
            if self.state.batch == epoch_len {
                self.state.epoch = epoch + 1;
                self.state.batch = 0;
                self.pipeline = None;
            }
            if ok.is_empty() {
                empty_batches += 1;
                if empty_batches >= epoch_len {
                    return Err(self.nothing_usable(empty_batches));
                }
                continue;
            }
            self.state.samples += ok.len() as u64;
            return Ok(assemble(epoch, batch_index, ok, &self.config.recipe));
        }
    }

    /// The error for `batches` batches in a row (an epoch's worth) whose rows were all skipped.
    fn nothing_usable(&mut self, batches: u64) -> DataError {
        self.pipeline = None;
        let first = self
            .skipped
            .first()
            .map_or(String::new(), |e| format!("; the first: {e}"));
        DataError::new(
            Location::file(self.index.shard_path(0)),
            format!(
                "a whole epoch ({batches} batches) yielded no usable row: {} rows skipped so far (`on_bad_row = skip`){first}",
                self.state.skipped
            ),
        )
    }

    fn start_epoch(&mut self) -> Result<()> {
        let opts = PlanOptions {
            seed: self.config.seed,
            batch_size: self.config.batch_size,
            shuffle_window: self.config.shuffle_window,
            size_rule: self.config.size_rule.clone(),
            repeats: self.config.repeats.clone(),
        };
        let (plan, too_small) = plan_epoch(&self.index, &opts, self.state.epoch);
        // Rows the size rule cannot place are reported once per epoch, at its start.
        if self.state.batch == 0 {
            for r in too_small {
                let (w, h) = self.index.size(r);
                let e = DataError::new(
                    Location::row(self.index.shard_path(r.shard), r.row as u64)
                        .field("width/height"),
                    format!("image {w}x{h} is too small for the size rule"),
                );
                match self.config.on_bad_row {
                    BadRowPolicy::Fail => return Err(e),
                    BadRowPolicy::Skip => {
                        self.state.skipped += 1;
                        self.skipped.push(e);
                    }
                }
            }
        }
        if plan.batches.is_empty() {
            return Err(DataError::new(
                Location::file(self.index.shard_path(0)),
                "no usable rows: every row was rejected",
            ));
        }
        self.pipeline = Some(Pipeline::start(
            self.index.clone(),
            Arc::new(plan),
            self.state.batch,
            &self.config,
        ));
        Ok(())
    }
}

/// One unit of work: a row to transform into slot `slot` of batch `batch`.
struct Job {
    batch: u64,
    slot: usize,
    row: RowRef,
    stream_pos: u64,
    sample: Result<Arc<Sample>>,
}

struct Done {
    batch: u64,
    slot: usize,
    result: Result<ProcessedSample>,
}

/// Threads working on one epoch from a given batch on.
struct Pipeline {
    plan: Arc<EpochPlan>,
    next: u64,
    results: Receiver<Done>,
    ready: HashMap<u64, Vec<Option<Result<ProcessedSample>>>>,
    taken: Arc<(Mutex<u64>, Condvar)>,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl Pipeline {
    fn start(
        index: Arc<DatasetIndex>,
        plan: Arc<EpochPlan>,
        from: u64,
        config: &LoaderConfig,
    ) -> Self {
        let (job_tx, job_rx) =
            mpsc::sync_channel::<Job>(config.batch_size * config.prefetch_batches);
        let job_rx = Arc::new(Mutex::new(job_rx));
        let (done_tx, done_rx) = mpsc::channel::<Done>();
        let taken = Arc::new((Mutex::new(from), Condvar::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let mut threads = Vec::new();
        for _ in 0..config.workers {
            let (jobs, done, cfg) = (job_rx.clone(), done_tx.clone(), config.clone());
            let (index, epoch) = (index.clone(), plan.epoch);
            threads.push(std::thread::spawn(move || {
                worker(jobs, done, &index, epoch, &cfg)
            }));
        }
        drop(done_tx);
        let reader = Reader {
            index,
            plan: plan.clone(),
            from,
            prefetch: config.prefetch_batches as u64,
            jobs: job_tx,
            taken: taken.clone(),
            stop: stop.clone(),
        };
        threads.push(std::thread::spawn(move || reader.run()));
        Self {
            plan,
            next: from,
            results: done_rx,
            ready: HashMap::new(),
            taken,
            stop,
            threads,
        }
    }

    /// Waits for every slot of batch `b`, then releases one batch of prefetch credit.
    fn take(&mut self, b: u64) -> Result<Vec<Result<ProcessedSample>>> {
        let n = self.plan.batches[b as usize].rows.len();
        loop {
            let slots = self
                .ready
                .entry(b)
                .or_insert_with(|| (0..n).map(|_| None).collect());
            if slots.iter().all(Option::is_some) {
                break;
            }
            let done = self.results.recv().map_err(|_| {
                DataError::new(
                    Location::default(),
                    "loader threads stopped unexpectedly (a worker panicked?)",
                )
            })?;
            let slots = self.ready.entry(done.batch).or_insert_with(|| {
                let n = self.plan.batches[done.batch as usize].rows.len();
                (0..n).map(|_| None).collect()
            });
            slots[done.slot] = Some(done.result);
        }
        let out = self
            .ready
            .remove(&b)
            .unwrap()
            .into_iter()
            .map(Option::unwrap)
            .collect();
        self.next = b + 1;
        let (lock, cv) = &*self.taken;
        *lock.lock().unwrap() = self.next;
        cv.notify_all();
        Ok(out)
    }
}

impl Drop for Pipeline {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        self.taken.1.notify_all();
        // The reader exits on `stop` and drops the job channel; workers then finish their
        // current job (results go to an unbounded channel, so they never block) and exit.
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

fn worker(
    jobs: Arc<Mutex<Receiver<Job>>>,
    done: Sender<Done>,
    index: &DatasetIndex,
    epoch: u64,
    cfg: &LoaderConfig,
) {
    let mut scratch = Scratch::default();
    loop {
        let job = match jobs.lock().unwrap().recv() {
            Ok(job) => job,
            Err(_) => return,
        };
        let result = job.sample.and_then(|sample| {
            let (w, h) = index.size(job.row);
            let target = cfg
                .size_rule
                .target(w, h)
                .expect("the plan only holds rows with a target");
            let at = Location::row(index.shard_path(job.row.shard), job.row.row as u64);
            let mut rng = KeyedRng::new(cfg.seed, Purpose::Sample, epoch, job.stream_pos);
            recipe::process(
                &sample,
                &target,
                &cfg.recipe,
                cfg.limits,
                &mut rng,
                &at,
                &mut scratch,
            )
        });
        if done
            .send(Done {
                batch: job.batch,
                slot: job.slot,
                result,
            })
            .is_err()
        {
            return;
        }
    }
}

/// The reader thread: loads row groups in plan order and hands rows to the workers.
struct Reader {
    index: Arc<DatasetIndex>,
    plan: Arc<EpochPlan>,
    from: u64,
    prefetch: u64,
    jobs: SyncSender<Job>,
    taken: Arc<(Mutex<u64>, Condvar)>,
    stop: Arc<AtomicBool>,
}

impl Reader {
    fn run(self) {
        let batches = &self.plan.batches;
        // Which batch (at or after `from`) each still-needed row belongs to.
        let mut needed: HashMap<RowRef, u64> = HashMap::new();
        for (b, batch) in batches.iter().enumerate().skip(self.from as usize) {
            for (r, _) in &batch.rows {
                needed.insert(*r, b as u64);
            }
        }
        let read_pos: HashMap<(u32, usize, u32), usize> = self
            .plan
            .read_order
            .iter()
            .enumerate()
            .map(|(i, &g)| (g, i))
            .collect();
        let group_of = |r: RowRef| -> (u32, usize, u32) {
            let groups = &self.index.shards[r.shard as usize].row_groups;
            let g = groups.partition_point(|&(start, _)| start <= r.row as u64) - 1;
            (r.shard, g, r.copy)
        };
        // Resume: the uninterrupted reader had read every row group up to the last one needed by
        // the batches before `from`; rows of later batches that lie there are fetched directly.
        let mut cursor = batches[..self.from as usize]
            .iter()
            .flat_map(|b| b.rows.iter().map(|(r, _)| read_pos[&group_of(*r)] + 1))
            .max()
            .unwrap_or(0);
        let mut readers: HashMap<u32, ShardReader> = HashMap::new();
        let mut loaded: HashMap<RowRef, Result<Arc<Sample>>> = HashMap::new();

        for (b, batch) in batches.iter().enumerate().skip(self.from as usize) {
            let b = b as u64;
            for (r, _) in &batch.rows {
                if loaded.contains_key(r) {
                    continue;
                }
                let pos = read_pos[&group_of(*r)];
                let groups: Vec<usize> = if pos >= cursor {
                    (cursor..=pos).collect()
                } else {
                    vec![pos]
                };
                for p in groups {
                    let (shard, g, copy) = self.plan.read_order[p];
                    self.load_group(&mut readers, (shard, g, copy), b, &needed, &mut loaded);
                }
                cursor = cursor.max(pos + 1);
            }
            // Prefetch bound: at most `prefetch` batches ahead of the consumer.
            {
                let (lock, cv) = &*self.taken;
                let mut taken = lock.lock().unwrap();
                while b >= *taken + self.prefetch && !self.stop.load(Ordering::SeqCst) {
                    taken = cv.wait(taken).unwrap();
                }
            }
            if self.stop.load(Ordering::SeqCst) {
                return;
            }
            for (slot, (r, stream_pos)) in batch.rows.iter().enumerate() {
                let sample = loaded.remove(r).expect("loaded above");
                needed.remove(r);
                let job = Job {
                    batch: b,
                    slot,
                    row: *r,
                    stream_pos: *stream_pos,
                    sample,
                };
                if self.jobs.send(job).is_err() {
                    return;
                }
            }
        }
    }

    /// Reads one row group and keeps the rows needed by batch `from_batch` or later.
    fn load_group(
        &self,
        readers: &mut HashMap<u32, ShardReader>,
        (shard, g, copy): (u32, usize, u32),
        from_batch: u64,
        needed: &HashMap<RowRef, u64>,
        loaded: &mut HashMap<RowRef, Result<Arc<Sample>>>,
    ) {
        let keep = |row: u64, loaded: &HashMap<RowRef, Result<Arc<Sample>>>| {
            let r = RowRef {
                shard,
                row: row as u32,
                copy,
            };
            (needed.get(&r).is_some_and(|&b| b >= from_batch) && !loaded.contains_key(&r))
                .then_some(r)
        };
        let path = self.index.shard_path(shard);
        if readers.len() >= 8 && !readers.contains_key(&shard) {
            readers.clear();
        }
        let rows = match readers.entry(shard) {
            std::collections::hash_map::Entry::Occupied(e) => e.into_mut().read_row_group(g),
            std::collections::hash_map::Entry::Vacant(e) => {
                ShardReader::open(path).and_then(|r| e.insert(r).read_row_group(g))
            }
        };
        match rows {
            Ok(rows) => {
                for (row, sample) in rows {
                    if let Some(r) = keep(row, loaded) {
                        loaded.insert(r, sample.map(Arc::new));
                    }
                }
            }
            Err(e) => {
                // The whole row group is unreadable: each needed row carries the error.
                let (start, len) = self.index.shards[shard as usize].row_groups[g];
                for row in start..start + len {
                    if let Some(r) = keep(row, loaded) {
                        let mut e = e.clone();
                        e.at.row = Some(row);
                        loaded.insert(r, Err(e));
                    }
                }
            }
        }
    }
}

fn assemble(epoch: u64, index: u64, samples: Vec<ProcessedSample>, cfg: &RecipeConfig) -> Batch {
    let b = samples.len();
    let (h, w) = (samples[0].height as usize, samples[0].width as usize);
    let c = samples
        .iter()
        .map(|s| s.characters.len())
        .max()
        .unwrap_or(0);
    let s2 = 3 * (cfg.crop_size as usize).pow(2);
    let (mh, mw) = (
        h / cfg.latent_downsample as usize,
        w / cfg.latent_downsample as usize,
    );
    let any_pose = samples.iter().any(|s| s.pose.is_some());
    let mut batch = Batch {
        epoch,
        index,
        ids: Vec::with_capacity(b),
        captions: Vec::with_capacity(b),
        height: h as u32,
        width: w as u32,
        pixels: Vec::with_capacity(b * 3 * h * w),
        max_characters: c,
        num_characters: Vec::with_capacity(b),
        character_mask: vec![0.0; b * c],
        id_embeds: vec![0.0; b * c * EMBEDDING_DIM],
        char_pixels: vec![0.0; b * c * s2],
        face_pixels: vec![0.0; b * c * s2],
        masks: vec![0.0; b * c * mh * mw],
        pose: any_pose.then(|| vec![0.0; b * 3 * h * w]),
        has_pose: Vec::with_capacity(b),
        drop_image: Vec::with_capacity(b),
        drop_text: Vec::with_capacity(b),
        time_ids: Vec::with_capacity(b * 6),
        traces: Vec::with_capacity(b),
    };
    for (i, s) in samples.into_iter().enumerate() {
        batch.pixels.extend_from_slice(&s.pixels);
        for (j, ch) in s.characters.iter().enumerate() {
            let k = i * c + j;
            batch.character_mask[k] = 1.0;
            batch.id_embeds[k * EMBEDDING_DIM..(k + 1) * EMBEDDING_DIM]
                .copy_from_slice(&ch.embedding);
            if let Some(p) = &ch.clip_body {
                batch.char_pixels[k * s2..(k + 1) * s2].copy_from_slice(p);
            }
            if let Some(p) = &ch.clip_face {
                batch.face_pixels[k * s2..(k + 1) * s2].copy_from_slice(p);
            }
            batch.masks[k * mh * mw..(k + 1) * mh * mw].copy_from_slice(&ch.mask);
        }
        if let (Some(dst), Some(src)) = (batch.pose.as_mut(), &s.pose) {
            dst[i * 3 * h * w..(i + 1) * 3 * h * w].copy_from_slice(src);
        }
        batch
            .has_pose
            .push(if s.pose.is_some() { 1.0 } else { 0.0 });
        batch.num_characters.push(s.characters.len());
        batch.ids.push(s.id);
        batch.captions.push(s.caption);
        batch.drop_image.push(s.drop_image);
        batch.drop_text.push(s.drop_text);
        batch.time_ids.extend_from_slice(&s.time_ids);
        batch.traces.push(s.trace);
    }
    batch
}
