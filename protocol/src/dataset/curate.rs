//! Curation: scrub PII, drop duplicates and outliers, split train/validation, report it all.
//!
//! Steps run in a fixed order (PII, exact duplicates, near duplicates, token limits, outliers,
//! `max_samples`, split), and everything depends only on the input and the seed.

use std::collections::hash_map::Entry;
use std::collections::{BTreeMap, HashMap, HashSet};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::pii::{self, PiiCounts};
use super::{near_dup, DatasetFormat, DropReason, Dropped, Example};
use crate::error::ProtocolError;

/// The feedback records that produced examples, for the new version's lineage.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FeedbackRange {
    pub count: usize,
    pub first_id: String,
    pub first_created: u64,
    pub last_id: String,
    pub last_created: u64,
}

/// What curation keeps and how it splits; missing fields take their defaults when read.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct CurationConfig {
    /// Most prompt + answer tokens an example may have; longer ones are dropped, not truncated,
    /// so the model never learns a cut-off answer. 0 disables the limit.
    pub cutoff_len: usize,
    /// Fewest answer tokens an example must have.
    pub min_answer_tokens: usize,
    /// Jaccard similarity of word 3-gram shingles from which a later example counts as a
    /// near duplicate of an earlier one; 0 disables.
    pub near_dup_threshold: f64,
    /// Drops examples whose answer is longer than median + k·MAD tokens (only with at least
    /// 20 examples, where the median means something); 0 disables.
    pub outlier_mad: f64,
    /// Replace emails, phone numbers and ID numbers with placeholders.
    pub scrub_pii: bool,
    /// Share of examples held out for validation.
    pub val_ratio: f64,
    /// Decides sampling and the split; the same data and seed give the same split and hash.
    pub seed: u64,
    /// Keep at most this many examples (a seeded sample).
    pub max_samples: Option<usize>,
}

impl Default for CurationConfig {
    fn default() -> Self {
        Self {
            cutoff_len: 2048,
            min_answer_tokens: 1,
            near_dup_threshold: 0.9,
            outlier_mad: 6.0,
            scrub_pii: true,
            val_ratio: 0.05,
            seed: 42,
            max_samples: None,
        }
    }
}

impl CurationConfig {
    /// Rejects settings that would make curation meaningless, naming the setting.
    pub fn validate(&self) -> Result<(), ProtocolError> {
        let bad = |detail: String| Err(ProtocolError::CurationConfig { detail });
        if !(0.0..1.0).contains(&self.val_ratio) {
            return bad(format!("val_ratio must be at least 0 and below 1, got {}", self.val_ratio));
        }
        if !(0.0..=1.0).contains(&self.near_dup_threshold) {
            return bad(format!("near_dup_threshold must be between 0 and 1, got {}", self.near_dup_threshold));
        }
        if !(self.outlier_mad >= 0.0 && self.outlier_mad.is_finite()) {
            return bad(format!("outlier_mad must be 0 (off) or positive, got {}", self.outlier_mad));
        }
        Ok(())
    }
}

/// The curated dataset: train and validation examples (each in input order) and the report.
#[derive(Debug, Clone)]
pub struct Curated {
    pub train: Vec<Example>,
    pub val: Vec<Example>,
    pub report: CurationReport,
}

/// Token counts (prompt + answer) of the training examples.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct TokenStats {
    pub min: usize,
    /// The lower median for an even count.
    pub median: usize,
    pub max: usize,
}

/// What curation did, written as `report.json` next to the dataset and shown as Markdown.
#[derive(Debug, Clone, Serialize)]
pub struct CurationReport {
    pub format: DatasetFormat,
    /// Records offered: examples parsed plus records dropped while parsing. (One feedback
    /// record with a correction gives two examples.)
    pub input_records: usize,
    pub kept: usize,
    pub train: usize,
    pub val: usize,
    /// Dropped count per reason code.
    pub dropped_by_reason: BTreeMap<String, usize>,
    pub dropped: Vec<Dropped>,
    pub pii: PiiCounts,
    /// Of the training examples; `None` when nothing was kept.
    pub tokens: Option<TokenStats>,
    /// sha256 (hex) of the kept examples' content, in split order: the same input and seed
    /// always give the same hash.
    pub dataset_hash: String,
    pub seed: u64,
    pub val_ratio: f64,
    /// The held-out examples' ids (`line-N` for a file), so another trainer can be run on
    /// exactly the same split.
    pub val_ids: Vec<String>,
    /// Every setting, for reproducing the run.
    pub config: CurationConfig,
    /// Which feedback the examples came from; set by the caller for feedback datasets.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub feedback: Option<FeedbackRange>,
}

impl CurationReport {
    /// "duplicate: 3, too_long: 1", or "nothing" when nothing was dropped.
    pub fn drop_summary(&self) -> String {
        if self.dropped_by_reason.is_empty() {
            return "nothing".into();
        }
        self.dropped_by_reason.iter().map(|(r, n)| format!("{r}: {n}")).collect::<Vec<_>>().join(", ")
    }

    /// A human-readable summary: totals, drops by reason, PII counts and the first dropped
    /// examples (`report.json` lists them all).
    pub fn to_markdown(&self) -> String {
        const LISTED: usize = 100;
        let mut md = String::from("# Curation report\n\n| | |\n|---|---|\n");
        let mut row = |k: &str, v: String| md.push_str(&format!("| {k} | {} |\n", cell(&v)));
        row("format", self.format.to_string());
        row("input records", self.input_records.to_string());
        row("kept", format!("{} (train {}, validation {})", self.kept, self.train, self.val));
        row("dropped", self.dropped.len().to_string());
        row("seed", self.seed.to_string());
        row("validation ratio", self.val_ratio.to_string());
        if let Some(t) = self.tokens {
            row("train tokens", format!("min {}, median {}, max {}", t.min, t.median, t.max));
        }
        row("dataset hash", format!("`{}`", self.dataset_hash));
        if let Some(f) = &self.feedback {
            row(
                "feedback",
                format!(
                    "{} records, {} ({}) to {} ({})",
                    f.count, f.first_id, f.first_created, f.last_id, f.last_created
                ),
            );
        }
        md.push_str("\n## Dropped by reason\n\n| reason | count |\n|---|---|\n");
        for (reason, n) in &self.dropped_by_reason {
            md.push_str(&format!("| {reason} | {n} |\n"));
        }
        md.push_str("\n## PII replaced\n\n| kind | count |\n|---|---|\n");
        md.push_str(&format!(
            "| email | {} |\n| phone | {} |\n| id | {} |\n",
            self.pii.email, self.pii.phone, self.pii.id
        ));
        if !self.dropped.is_empty() {
            md.push_str("\n## Dropped examples\n\n| id | reason | detail |\n|---|---|---|\n");
            for d in self.dropped.iter().take(LISTED) {
                md.push_str(&format!("| {} | {} | {} |\n", cell(&d.id), d.reason.code(), cell(&d.detail)));
            }
            if self.dropped.len() > LISTED {
                md.push_str(&format!("\n{} more in report.json.\n", self.dropped.len() - LISTED));
            }
        }
        md
    }
}

/// Text made safe for one Markdown table cell.
fn cell(text: &str) -> String {
    text.replace('|', "\\|").replace('\n', " ")
}

/// Curates `examples` (plus the records already dropped while reading them, which the report
/// lists first). `count_tokens` gives an example's prompt + answer tokens as training will see
/// them (for a preference pair, the longer sequence); an answer's own length is measured as
/// the difference from the same example with its answers emptied, so template tokens cancel.
/// Replaces emails, phone numbers and ID numbers in every text of `examples` with
/// placeholders (what curation does first when `scrub_pii` is on); scrubbing twice changes
/// nothing more.
pub fn scrub_pii(examples: &mut [Example]) -> PiiCounts {
    let mut counts = PiiCounts::default();
    for ex in examples {
        for text in ex.texts_mut() {
            *text = pii::scrub(text, &mut counts);
        }
    }
    counts
}

pub fn curate(
    format: DatasetFormat,
    examples: Vec<Example>,
    early_drops: Vec<Dropped>,
    count_tokens: &dyn Fn(&Example) -> usize,
    cfg: &CurationConfig,
) -> Result<Curated, ProtocolError> {
    cfg.validate()?;
    let input_records = examples.len() + early_drops.len();
    if input_records == 0 {
        return Err(ProtocolError::EmptyDataset);
    }
    let mut dropped = early_drops;
    let mut examples = examples;

    let pii = if cfg.scrub_pii { scrub_pii(&mut examples) } else { PiiCounts::default() };

    let mut first_seen: HashMap<[u8; 32], String> = HashMap::new();
    examples.retain(|ex| match first_seen.entry(sha256(dedupe_key(ex).as_bytes())) {
        Entry::Occupied(first) => {
            dropped.push(Dropped::new(&ex.id, DropReason::Duplicate, format!("same as {}", first.get())));
            false
        }
        Entry::Vacant(slot) => {
            slot.insert(ex.id.clone());
            true
        }
    });

    if cfg.near_dup_threshold > 0.0 {
        let texts: Vec<String> = examples.iter().map(near_dup_text).collect();
        let found = near_dup::near_duplicates(&texts, cfg.near_dup_threshold);
        let ids: Vec<String> = examples.iter().map(|e| e.id.clone()).collect();
        let mut found = found.into_iter();
        examples.retain(|ex| match found.next().flatten() {
            Some((j, sim)) => {
                dropped.push(Dropped::new(
                    &ex.id,
                    DropReason::NearDuplicate,
                    format!("{:.0}% like {}", sim * 100.0, ids[j]),
                ));
                false
            }
            None => true,
        });
    }

    let mut measured: Vec<(Example, usize, usize)> = Vec::with_capacity(examples.len());
    for ex in examples {
        let total = count_tokens(&ex);
        let bare = Example { id: ex.id.clone(), prompt: ex.prompt.clone(), target: ex.target.emptied() };
        let answer = total.saturating_sub(count_tokens(&bare));
        if cfg.cutoff_len > 0 && total > cfg.cutoff_len {
            dropped.push(Dropped::new(
                &ex.id,
                DropReason::TooLong,
                format!("{total} tokens, cutoff_len is {}", cfg.cutoff_len),
            ));
        } else if answer < cfg.min_answer_tokens {
            dropped.push(Dropped::new(
                &ex.id,
                DropReason::TooShort,
                format!("answer has {answer} tokens, min_answer_tokens is {}", cfg.min_answer_tokens),
            ));
        } else {
            measured.push((ex, total, answer));
        }
    }

    if cfg.outlier_mad > 0.0 && measured.len() >= 20 {
        let answers: Vec<f64> = measured.iter().map(|m| m.2 as f64).collect();
        if let Some((median, spread)) = median_and_spread(&answers) {
            let limit = median + cfg.outlier_mad * spread;
            measured.retain(|(ex, _, answer)| {
                let keep = (*answer as f64) <= limit;
                if !keep {
                    dropped.push(Dropped::new(
                        &ex.id,
                        DropReason::Outlier,
                        format!("answer has {answer} tokens; median {median}, deviation {spread:.1}, limit {limit:.0}"),
                    ));
                }
                keep
            });
        }
    }

    let hashes: Vec<[u8; 32]> = measured.iter().map(|(ex, ..)| sha256(ex.canonical().as_bytes())).collect();
    let mut chosen: Vec<usize> = (0..measured.len()).collect();
    if let Some(max) = cfg.max_samples.filter(|&m| m < measured.len()) {
        let order = seeded_order(b"sample", cfg.seed, &hashes);
        let keep: HashSet<usize> = order[..max].iter().copied().collect();
        for i in order[max..].iter().copied() {
            dropped.push(Dropped::new(&measured[i].0.id, DropReason::OverMaxSamples, format!("max_samples is {max}")));
        }
        chosen.retain(|i| keep.contains(i));
    }

    let n = chosen.len();
    let val_n =
        if cfg.val_ratio > 0.0 && n >= 2 { ((cfg.val_ratio * n as f64).round() as usize).clamp(1, n - 1) } else { 0 };
    let chosen_hashes: Vec<[u8; 32]> = chosen.iter().map(|&i| hashes[i]).collect();
    let val_positions: HashSet<usize> =
        seeded_order(b"split", cfg.seed, &chosen_hashes)[..val_n].iter().copied().collect();
    let mut slots: Vec<Option<(Example, usize)>> =
        measured.into_iter().map(|(ex, total, _)| Some((ex, total))).collect();
    let (mut train, mut val, mut train_tokens) = (Vec::new(), Vec::new(), Vec::new());
    for (pos, &i) in chosen.iter().enumerate() {
        if let Some((ex, total)) = slots[i].take() {
            if val_positions.contains(&pos) {
                val.push(ex);
            } else {
                train_tokens.push(total);
                train.push(ex);
            }
        }
    }

    let mut hasher = Sha256::new();
    for (split, ex) in train.iter().map(|e| ("train", e)).chain(val.iter().map(|e| ("val", e))) {
        hasher.update(split.as_bytes());
        hasher.update(b"\n");
        hasher.update(ex.canonical().as_bytes());
        hasher.update(b"\n");
    }
    let mut dropped_by_reason = BTreeMap::new();
    for d in &dropped {
        *dropped_by_reason.entry(d.reason.code().to_owned()).or_insert(0) += 1;
    }
    train_tokens.sort_unstable();
    let report = CurationReport {
        format,
        input_records,
        kept: train.len() + val.len(),
        train: train.len(),
        val: val.len(),
        dropped_by_reason,
        dropped,
        pii,
        tokens: (!train_tokens.is_empty()).then(|| TokenStats {
            min: train_tokens[0],
            median: train_tokens[(train_tokens.len() - 1) / 2],
            max: train_tokens[train_tokens.len() - 1],
        }),
        dataset_hash: hex::encode(hasher.finalize()),
        seed: cfg.seed,
        val_ratio: cfg.val_ratio,
        val_ids: val.iter().map(|e| e.id.clone()).collect(),
        config: cfg.clone(),
        feedback: None,
    };
    if report.kept == 0 {
        return Err(ProtocolError::NothingLeft { report: Box::new(report) });
    }
    Ok(Curated { train, val, report })
}

fn sha256(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}

/// Case and whitespace do not make two examples different.
fn dedupe_key(ex: &Example) -> String {
    ex.canonical().to_lowercase().split_whitespace().collect::<Vec<_>>().join(" ")
}

fn near_dup_text(ex: &Example) -> String {
    ex.texts().collect::<Vec<_>>().join("\n").to_lowercase()
}

/// Positions 0..hashes.len() ordered by a hash of (purpose, seed, content): a shuffle that
/// depends only on the seed and each example's content, not on where it sits in the input.
fn seeded_order(purpose: &[u8], seed: u64, hashes: &[[u8; 32]]) -> Vec<usize> {
    let keys: Vec<[u8; 32]> = hashes
        .iter()
        .map(|h| {
            let mut hasher = Sha256::new();
            hasher.update(purpose);
            hasher.update(seed.to_le_bytes());
            hasher.update(h);
            hasher.finalize().into()
        })
        .collect();
    let mut order: Vec<usize> = (0..hashes.len()).collect();
    order.sort_by(|&a, &b| keys[a].cmp(&keys[b]).then(a.cmp(&b)));
    order
}

/// The median and the median absolute deviation; when over half the values are equal the MAD
/// is 0, and the mean absolute deviation from the median stands in. `None` when all are equal.
fn median_and_spread(values: &[f64]) -> Option<(f64, f64)> {
    let median = median_of(values)?;
    let deviations: Vec<f64> = values.iter().map(|v| (v - median).abs()).collect();
    let mad = median_of(&deviations)?;
    let spread = if mad > 0.0 { mad } else { deviations.iter().sum::<f64>() / deviations.len() as f64 };
    (spread > 0.0).then_some((median, spread))
}

fn median_of(values: &[f64]) -> Option<f64> {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let n = sorted.len();
    match n {
        0 => None,
        _ if n % 2 == 1 => Some(sorted[n / 2]),
        _ => Some((sorted[n / 2 - 1] + sorted[n / 2]) / 2.0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dataset::{Message, Role, Target};

    /// Words plus per-message template overhead, like a real chat template would add.
    fn count(ex: &Example) -> usize {
        ex.prompt.iter().map(|m| m.content.split_whitespace().count() + 3).sum::<usize>()
            + ex.texts().skip(ex.prompt.len()).map(|t| t.split_whitespace().count()).max().unwrap_or(0)
            + 2
    }

    fn ex(id: &str, q: &str, a: &str) -> Example {
        Example { id: id.into(), prompt: vec![Message::new(Role::User, q)], target: Target::Sft { answer: a.into() } }
    }

    /// `n` distinct examples with answers of 10-14 words.
    fn distinct(n: usize) -> Vec<Example> {
        (0..n)
            .map(|i| {
                let answer: Vec<String> = (0..10 + i % 5).map(|w| format!("a{i}x{w}")).collect();
                ex(&format!("line-{}", i + 1), &format!("question number {i} about topic {}", i * 7), &answer.join(" "))
            })
            .collect()
    }

    fn cfg() -> CurationConfig {
        CurationConfig { val_ratio: 0.25, ..CurationConfig::default() }
    }

    fn run(examples: Vec<Example>, cfg: &CurationConfig) -> Curated {
        curate(DatasetFormat::Alpaca, examples, Vec::new(), &count, cfg).unwrap()
    }

    fn drops(c: &Curated) -> Vec<(&str, &str)> {
        c.report.dropped.iter().map(|d| (d.id.as_str(), d.reason.code())).collect()
    }

    #[test]
    fn pii_is_scrubbed_in_prompts_and_answers_and_counted() {
        let examples = vec![
            Example {
                id: "1".into(),
                prompt: vec![
                    Message::new(Role::System, "mail ops@corp.example"),
                    Message::new(Role::User, "my SSN is 123-45-6789"),
                ],
                target: Target::Preference {
                    chosen: "call +44 20 7946 0958".into(),
                    rejected: "card 4111111111111111".into(),
                },
            },
            ex("2", "keep 4111111111111112 as is", "fine"),
        ];
        let c = run(examples, &CurationConfig { val_ratio: 0.0, ..cfg() });
        let all: Vec<&str> = c.train.iter().flat_map(Example::texts).collect();
        assert_eq!(
            all,
            ["mail [EMAIL]", "my SSN is [ID]", "call [PHONE]", "card [ID]", "keep 4111111111111112 as is", "fine"]
        );
        assert_eq!(c.report.pii, PiiCounts { email: 1, phone: 1, id: 2 });
        let off = run(vec![ex("1", "a@b.example", "x")], &CurationConfig { scrub_pii: false, ..cfg() });
        assert_eq!(off.train[0].prompt[0].content, "a@b.example");
    }

    #[test]
    fn exact_and_near_duplicates_keep_the_first() {
        let long: String = (0..100).map(|i| format!("word{i}")).collect::<Vec<_>>().join(" ");
        let mut examples = distinct(4);
        let first_answer = examples[0].texts().nth(1).unwrap().to_owned();
        examples.push(ex("dup", "QUESTION number 0   about topic 0", &first_answer));
        examples.push(ex("long", "summarise", &long));
        examples.push(ex("near", "summarise", &long.replace("word50", "changed")));
        let c = run(examples, &cfg());
        assert_eq!(drops(&c), [("dup", "duplicate"), ("near", "near_duplicate")]);
        assert!(c.report.dropped[0].detail.contains("line-1"), "{}", c.report.dropped[0].detail);
        assert!(c.report.dropped[1].detail.contains("long"), "{}", c.report.dropped[1].detail);
        assert_eq!((c.report.kept, c.report.input_records), (5, 7));
    }

    #[test]
    fn token_limits_and_outliers() {
        let mut examples = distinct(30);
        examples.push(ex("huge", "q", &vec!["w"; 400].join(" ")));
        examples.push(ex("bulky", "q", &vec!["v"; 40].join(" ")));
        examples.push(ex("tiny", "q", ""));
        let c = run(examples.clone(), &CurationConfig { cutoff_len: 300, ..cfg() });
        assert_eq!(drops(&c), [("huge", "too_long"), ("tiny", "too_short"), ("bulky", "outlier")]);
        assert!(c.report.dropped[0].detail.contains("cutoff_len is 300"));
        let c = run(examples.clone(), &CurationConfig { cutoff_len: 0, outlier_mad: 0.0, ..cfg() });
        assert_eq!(drops(&c), [("tiny", "too_short")], "0 disables both");
        let few: Vec<Example> = examples.into_iter().skip(25).collect();
        let c = run(few, &CurationConfig { cutoff_len: 0, min_answer_tokens: 0, ..cfg() });
        assert!(c.report.dropped.is_empty(), "no outliers below 20 examples: {:?}", c.report.dropped);
    }

    #[test]
    fn split_and_hash_are_deterministic_per_seed() {
        let val_ids = |c: &Curated| c.val.iter().map(|e| e.id.clone()).collect::<Vec<_>>();
        let a = run(distinct(40), &cfg());
        let b = run(distinct(40), &cfg());
        assert_eq!((a.train.len(), a.val.len()), (30, 10));
        assert_eq!(val_ids(&a), val_ids(&b));
        assert_eq!(a.report.dataset_hash, b.report.dataset_hash);
        assert_eq!(a.report.dataset_hash.len(), 64);
        let other = run(distinct(40), &CurationConfig { seed: 7, ..cfg() });
        assert_ne!(val_ids(&a), val_ids(&other));
        assert_ne!(a.report.dataset_hash, other.report.dataset_hash);
        let mut shuffled = distinct(40);
        shuffled.reverse();
        let c = run(shuffled, &cfg());
        let mut ids = val_ids(&c);
        ids.reverse();
        assert_eq!(ids, val_ids(&a), "the split follows content, not position");
        assert!(a.train.iter().all(|t| !a.val.iter().any(|v| v.id == t.id)));
        let line = |e: &Example| e.id["line-".len()..].parse::<usize>().unwrap();
        assert!(a.train.windows(2).all(|w| line(&w[0]) < line(&w[1])), "input order kept");
        let t = a.report.tokens.unwrap();
        assert!(t.min <= t.median && t.median <= t.max && t.min > 0);
    }

    #[test]
    fn tiny_sets_still_get_a_validation_example_and_max_samples_is_seeded() {
        let c = run(distinct(2), &CurationConfig { val_ratio: 0.01, ..cfg() });
        assert_eq!((c.train.len(), c.val.len()), (1, 1));
        let c = run(distinct(1), &cfg());
        assert_eq!((c.train.len(), c.val.len()), (1, 0));
        let sample = |seed| run(distinct(20), &CurationConfig { max_samples: Some(8), seed, val_ratio: 0.0, ..cfg() });
        let (a, b) = (sample(1), sample(1));
        assert_eq!(a.train, b.train);
        assert_eq!(a.train.len(), 8);
        assert_eq!(a.report.dropped_by_reason.get("over_max_samples"), Some(&12));
        assert_ne!(a.train, sample(2).train);
    }

    #[test]
    fn nothing_left_carries_the_report_and_empty_input_is_empty_dataset() {
        let early = vec![Dropped::new("line-9", DropReason::Schema, "field `output` must be a string, found a number")];
        let same = vec![ex("line-1", "q", "a"), ex("line-2", "q", "a"), ex("line-3", "Q", "A")];
        let cut = CurationConfig { min_answer_tokens: 5, ..cfg() };
        match curate(DatasetFormat::Alpaca, same, early, &count, &cut) {
            Err(e @ ProtocolError::NothingLeft { .. }) => {
                assert_eq!(e.code(), "nothing_left");
                assert!(e.to_string().contains("duplicate: 2"), "{e}");
                let ProtocolError::NothingLeft { report } = e else { unreachable!() };
                let got: Vec<(&str, &str)> = report.dropped.iter().map(|d| (d.id.as_str(), d.reason.code())).collect();
                assert_eq!(
                    got,
                    [("line-9", "schema"), ("line-2", "duplicate"), ("line-3", "duplicate"), ("line-1", "too_short")]
                );
                assert_eq!((report.kept, report.input_records, report.tokens), (0, 4, None));
                let md = report.to_markdown();
                assert!(md.contains("| duplicate | 2 |") && md.contains("found a number"), "{md}");
                let json = serde_json::to_value(&*report).unwrap();
                assert_eq!(json["dropped"][1]["reason"], "duplicate");
                assert_eq!(json["format"], "alpaca");
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            curate(DatasetFormat::Alpaca, Vec::new(), Vec::new(), &count, &cfg()),
            Err(ProtocolError::EmptyDataset)
        ));
    }

    #[test]
    fn bad_settings_are_named() {
        for (bad, name) in [
            (CurationConfig { val_ratio: 1.0, ..cfg() }, "val_ratio"),
            (CurationConfig { near_dup_threshold: 1.5, ..cfg() }, "near_dup_threshold"),
            (CurationConfig { outlier_mad: f64::NAN, ..cfg() }, "outlier_mad"),
        ] {
            match curate(DatasetFormat::Alpaca, distinct(3), Vec::new(), &count, &bad) {
                Err(ProtocolError::CurationConfig { detail }) => assert!(detail.contains(name), "{detail}"),
                other => panic!("{other:?}"),
            }
        }
    }
}
