//! Near-duplicate detection: MinHash + LSH banding for candidates, exact Jaccard to confirm.
//!
//! Shingles are word 3-grams; banding keeps the work about linear in the number of texts.

use std::collections::HashMap;

const HASHES: usize = 128;

/// For each text in order, the earlier kept text it nearly duplicates (index and Jaccard
/// similarity of their shingle sets, at least `threshold`), or `None` when it is kept. Only
/// kept texts are compared against, so a chain of small edits cannot drop everything.
pub fn near_duplicates(texts: &[String], threshold: f64) -> Vec<Option<(usize, f64)>> {
    let rows = rows_per_band(threshold);
    let bands = HASHES / rows;
    let params = permutations();
    let mut buckets: Vec<HashMap<u64, Vec<usize>>> = vec![HashMap::new(); bands];
    let mut kept_shingles: HashMap<usize, Vec<u64>> = HashMap::new();
    let mut out = Vec::with_capacity(texts.len());
    for (i, text) in texts.iter().enumerate() {
        let shingles = shingles(text);
        if shingles.is_empty() {
            out.push(None);
            continue;
        }
        let signature = minhash(&shingles, &params);
        let keys: Vec<u64> = signature.chunks(rows).map(hash_band).collect();
        let mut candidates: Vec<usize> =
            keys.iter().enumerate().filter_map(|(band, key)| buckets[band].get(key)).flatten().copied().collect();
        candidates.sort_unstable();
        candidates.dedup();
        let best = candidates
            .into_iter()
            .map(|j| (j, jaccard(&shingles, &kept_shingles[&j])))
            .filter(|&(_, sim)| sim >= threshold)
            .fold(None, |best: Option<(usize, f64)>, (j, sim)| match best {
                Some((_, b)) if b >= sim => best,
                _ => Some((j, sim)),
            });
        if best.is_none() {
            for (band, key) in keys.into_iter().enumerate() {
                buckets[band].entry(key).or_default().push(i);
            }
            kept_shingles.insert(i, shingles);
        }
        out.push(best);
    }
    out
}

/// The most rows per band (fewest false candidates) that still makes a pair at exactly the
/// threshold a candidate with probability at least 0.99: 1 - (1 - t^r)^b.
fn rows_per_band(threshold: f64) -> usize {
    let t = threshold.clamp(0.0, 1.0);
    [128, 64, 32, 16, 8, 4, 2]
        .into_iter()
        .find(|&r| 1.0 - (1.0 - t.powi(r as i32)).powi((HASHES / r) as i32) >= 0.99)
        .unwrap_or(1)
}

/// Sorted, deduplicated hashes of the word 3-grams (or of all the words, when fewer than three).
fn shingles(text: &str) -> Vec<u64> {
    let words: Vec<u64> = text.split_whitespace().map(|w| fnv1a(w.as_bytes())).collect();
    let mut out: Vec<u64> = if words.len() < 3 {
        if words.is_empty() {
            return Vec::new();
        }
        vec![combine(&words)]
    } else {
        words.windows(3).map(combine).collect()
    };
    out.sort_unstable();
    out.dedup();
    out
}

fn combine(words: &[u64]) -> u64 {
    words.iter().fold(0x9e37_79b9_7f4a_7c15, |acc, &w| mix(acc ^ w))
}

fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3))
}

/// splitmix64's finaliser: spreads every input bit over the output.
fn mix(mut x: u64) -> u64 {
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// Fixed (multiplier, offset) pairs; fixed so the same data always dedupes the same way.
fn permutations() -> Vec<(u64, u64)> {
    (0..HASHES as u64).map(|i| (mix(2 * i + 1) | 1, mix(2 * i + 2))).collect()
}

fn minhash(shingles: &[u64], params: &[(u64, u64)]) -> Vec<u64> {
    params
        .iter()
        .map(|&(a, b)| shingles.iter().map(|&x| a.wrapping_mul(x).wrapping_add(b)).min().unwrap_or(u64::MAX))
        .collect()
}

fn hash_band(rows: &[u64]) -> u64 {
    rows.iter().fold(0, |acc, &v| mix(acc ^ v))
}

/// |A ∩ B| / |A ∪ B| of two sorted, deduplicated sets.
fn jaccard(a: &[u64], b: &[u64]) -> f64 {
    let (mut i, mut j, mut common) = (0, 0, 0usize);
    while i < a.len() && j < b.len() {
        match a[i].cmp(&b[j]) {
            std::cmp::Ordering::Less => i += 1,
            std::cmp::Ordering::Greater => j += 1,
            std::cmp::Ordering::Equal => {
                common += 1;
                i += 1;
                j += 1;
            }
        }
    }
    let union = a.len() + b.len() - common;
    if union == 0 {
        0.0
    } else {
        common as f64 / union as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn long_text(seed: usize) -> String {
        (0..120).map(|i| format!("w{}", (i * 7 + seed * 131) % 997)).collect::<Vec<_>>().join(" ")
    }

    #[test]
    fn one_changed_word_in_a_long_text_is_a_near_duplicate() {
        let a = long_text(1);
        let b = a.replacen("w138", "changed", 1);
        assert_ne!(a, b);
        let c = long_text(2);
        let got = near_duplicates(&[a, c, b], 0.9);
        assert_eq!(got[0], None);
        assert_eq!(got[1], None, "an unrelated text is kept");
        let (j, sim) = got[2].expect("near duplicate found");
        assert_eq!(j, 0);
        assert!(sim > 0.9 && sim < 1.0, "{sim}");
    }

    #[test]
    fn a_text_under_the_threshold_is_kept() {
        let a = long_text(3);
        let half: Vec<&str> = a.split(' ').take(60).collect();
        let b = format!("{} {}", half.join(" "), long_text(4));
        let got = near_duplicates(&[a, b], 0.9);
        assert_eq!(got, [None, None]);
    }

    #[test]
    fn banding_favours_recall_at_the_threshold() {
        assert_eq!(rows_per_band(0.9), 8);
        assert_eq!(rows_per_band(1.0), 128);
        assert!(rows_per_band(0.5) <= 4);
        assert_eq!(jaccard(&[1, 2, 3], &[2, 3, 4]), 0.5);
        assert!(shingles("").is_empty() && shingles("one two").len() == 1 && shingles("a b c d").len() == 2);
    }
}
