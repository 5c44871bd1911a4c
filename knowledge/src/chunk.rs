//! Document text to overlapping chunks that respect headings and sentences.
//!
//! # The rule
//!
//! The text is split into sections at heading lines: a Markdown ATX heading (up to three
//! spaces, one to six `#`, a space, the heading text), which is also how [`crate::extract`]
//! renders the headings of HTML and DOCX files. A section runs from its heading line to the
//! next heading line; the text before the first heading is a section without a heading, and a
//! section holding nothing but its heading line gives no chunk (unless the whole document is
//! headings: then each heading line is a chunk rather than the document giving none). Within a
//! section, whole sentences (Unicode UAX #29 sentence boundaries; a line break always ends one,
//! so list items and heading lines are sentences of their own) are packed in order while the chunk
//! stays within `target_chars` characters; a sentence longer than that is first cut at word
//! boundaries (and a single word longer than that at character boundaries). The next chunk of
//! the same section starts with the previous chunk's trailing whole sentences that fit in
//! `overlap_chars` (and leave room for at least one new sentence), so consecutive chunks
//! overlap. Chunks never cross a heading line, each is trimmed of surrounding whitespace, and
//! `text == &doc[start..end]` always holds, on character boundaries. Whitespace-only text gives
//! no chunks. Lengths are counted in characters (Unicode scalar values), not bytes.

use serde::{Deserialize, Serialize};
use unicode_segmentation::UnicodeSegmentation;

/// One piece of a document, as indexed and returned by search.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Chunk {
    pub text: String,
    /// Byte offset of the chunk in the document text: `text == &doc[start..end]`.
    pub start: usize,
    pub end: usize,
    /// The text of the nearest heading line above the chunk, if any.
    pub heading: Option<String>,
}

/// How large chunks are and how much consecutive chunks share.
#[derive(Debug, Clone, Copy)]
pub struct ChunkOptions {
    /// The most characters in a chunk (at least 1).
    pub target_chars: usize,
    /// The most characters of whole trailing sentences repeated at the start of the next chunk.
    pub overlap_chars: usize,
}

impl Default for ChunkOptions {
    fn default() -> Self {
        Self { target_chars: 800, overlap_chars: 160 }
    }
}

/// Splits `text` into chunks by the rule in the module documentation.
pub fn chunk(text: &str, opts: &ChunkOptions) -> Vec<Chunk> {
    let opts = ChunkOptions { target_chars: opts.target_chars.max(1), overlap_chars: opts.overlap_chars };
    let sections = sections(text);
    let mut chunks = Vec::new();
    for section in sections.iter().filter(|s| !s.heading_only) {
        chunk_section(text, section, &opts, &mut chunks);
    }
    if chunks.is_empty() {
        for section in &sections {
            chunk_section(text, section, &opts, &mut chunks);
        }
    }
    chunks
}

/// A run of the document between two heading lines.
struct Section {
    start: usize,
    end: usize,
    heading: Option<String>,
    /// Nothing but the heading line itself.
    heading_only: bool,
}

/// The heading text of a line that is a Markdown ATX heading, without the `#` marks.
pub(crate) fn heading_text(line: &str) -> Option<&str> {
    let indent = line.len() - line.trim_start_matches(' ').len();
    if indent > 3 {
        return None;
    }
    let rest = &line[indent..];
    let level = rest.len() - rest.trim_start_matches('#').len();
    if !(1..=6).contains(&level) {
        return None;
    }
    let after = &rest[level..];
    if !after.starts_with([' ', '\t']) {
        return None;
    }
    let mut text = after.trim();
    // An optional closing sequence of `#` after a space is not part of the heading.
    let closed = text.trim_end_matches('#');
    if closed.len() < text.len() && (closed.is_empty() || closed.ends_with([' ', '\t'])) {
        text = closed.trim_end();
    }
    (!text.is_empty()).then_some(text)
}

fn sections(doc: &str) -> Vec<Section> {
    let mut sections = Vec::new();
    let mut current = Section { start: 0, end: 0, heading: None, heading_only: false };
    let mut body_from = 0;
    let mut offset = 0;
    for line in doc.split_inclusive('\n') {
        let content = line.trim_end_matches(['\n', '\r']);
        if let Some(heading) = heading_text(content) {
            current.end = offset;
            current.heading_only = doc[body_from..offset].trim().is_empty();
            if current.heading.is_some() || !doc[current.start..offset].trim().is_empty() {
                sections.push(current);
            }
            current = Section { start: offset, end: 0, heading: Some(heading.to_owned()), heading_only: false };
            body_from = offset + line.len();
        }
        offset += line.len();
    }
    current.end = doc.len();
    current.heading_only = doc[body_from.min(doc.len())..].trim().is_empty();
    if current.heading.is_some() || !doc[current.start..].trim().is_empty() {
        sections.push(current);
    }
    sections
}

/// A trimmed sentence (or piece of one) and its byte span in the document.
#[derive(Clone, Copy)]
struct Unit {
    start: usize,
    end: usize,
}

fn chunk_section(doc: &str, section: &Section, opts: &ChunkOptions, out: &mut Vec<Chunk>) {
    let units = units(doc, section.start, section.end, opts.target_chars);
    if units.is_empty() {
        return;
    }
    // Characters before each unit's start and end, so a span's length is one subtraction.
    let mut chars_to_start = Vec::with_capacity(units.len());
    let mut chars_to_end = Vec::with_capacity(units.len());
    let (mut at, mut count) = (units[0].start, 0usize);
    for unit in &units {
        count += doc[at..unit.start].chars().count();
        chars_to_start.push(count);
        count += doc[unit.start..unit.end].chars().count();
        chars_to_end.push(count);
        at = unit.end;
    }
    // Characters of units[a..b], including the whitespace between them.
    let span = |a: usize, b: usize| chars_to_end[b - 1] - chars_to_start[a];

    let n = units.len();
    let mut i = 0;
    while i < n {
        let mut j = i + 1;
        while j < n && span(i, j + 1) <= opts.target_chars {
            j += 1;
        }
        let (start, end) = (units[i].start, units[j - 1].end);
        out.push(Chunk { text: doc[start..end].to_owned(), start, end, heading: section.heading.clone() });
        if j == n {
            break;
        }
        // Step back over trailing sentences that fit the overlap and still leave room for the
        // next unit, so every chunk brings something new.
        let mut next = j;
        while next > i + 1 && span(next - 1, j) <= opts.overlap_chars && span(next - 1, j + 1) <= opts.target_chars {
            next -= 1;
        }
        i = next;
    }
}

/// The section's sentences, trimmed, each cut into pieces of at most `target` characters.
fn units(doc: &str, start: usize, end: usize, target: usize) -> Vec<Unit> {
    let mut units = Vec::new();
    for (offset, sentence) in doc[start..end].split_sentence_bound_indices() {
        let Some(unit) = trimmed(doc, start + offset, start + offset + sentence.len()) else {
            continue;
        };
        if doc[unit.start..unit.end].chars().count() <= target {
            units.push(unit);
        } else {
            cut_long(doc, unit, target, &mut units);
        }
    }
    units
}

/// Cuts one over-long sentence at word boundaries (a word over `target` at characters).
fn cut_long(doc: &str, unit: Unit, target: usize, out: &mut Vec<Unit>) {
    let (mut piece_start, mut piece_chars) = (unit.start, 0usize);
    for (offset, word) in doc[unit.start..unit.end].split_word_bound_indices() {
        let word_start = unit.start + offset;
        let word_chars = word.chars().count();
        if piece_chars + word_chars <= target {
            piece_chars += word_chars;
            continue;
        }
        out.extend(trimmed(doc, piece_start, word_start));
        if word_chars <= target {
            (piece_start, piece_chars) = (word_start, word_chars);
            continue;
        }
        // A single word longer than a chunk: whole runs of `target` characters.
        let mut run_start = word_start;
        let mut run_chars = 0;
        for (i, _) in word.char_indices() {
            if run_chars == target {
                out.extend(trimmed(doc, run_start, word_start + i));
                (run_start, run_chars) = (word_start + i, 0);
            }
            run_chars += 1;
        }
        (piece_start, piece_chars) = (run_start, run_chars);
    }
    out.extend(trimmed(doc, piece_start, unit.end));
}

/// The span without surrounding whitespace; `None` when nothing is left.
fn trimmed(doc: &str, start: usize, end: usize) -> Option<Unit> {
    let s = &doc[start..end];
    let lead = s.len() - s.trim_start().len();
    let inner = s.trim();
    (!inner.is_empty()).then(|| Unit { start: start + lead, end: start + lead + inner.len() })
}

#[cfg(test)]
mod tests {
    use rand::{Rng, SeedableRng};

    use super::*;

    fn opts(target_chars: usize, overlap_chars: usize) -> ChunkOptions {
        ChunkOptions { target_chars, overlap_chars }
    }

    /// Every invariant of the rule that holds for any input.
    fn check(doc: &str, o: &ChunkOptions) -> Vec<Chunk> {
        let chunks = chunk(doc, o);
        for c in &chunks {
            assert_eq!(doc.get(c.start..c.end), Some(c.text.as_str()), "{c:?} in {doc:?}");
            assert_eq!(c.text.trim(), c.text, "{c:?} is not trimmed");
            assert!(!c.text.is_empty());
            assert!(c.text.chars().count() <= o.target_chars.max(1), "{c:?} is longer than {o:?}");
            // Only the first line of a chunk may be a heading line.
            assert!(c.text.lines().skip(1).all(|l| heading_text(l).is_none()), "{c:?} crosses a heading");
        }
        // Every non-whitespace character of the document is in some chunk, except the heading
        // lines of sections that hold nothing else.
        let mut covered = vec![false; doc.len()];
        for c in &chunks {
            covered[c.start..c.end].iter_mut().for_each(|b| *b = true);
        }
        let mut at = 0;
        for line in doc.split_inclusive('\n') {
            if heading_text(line.trim_end_matches(['\n', '\r'])).is_some() {
                covered[at..at + line.len()].iter_mut().for_each(|b| *b = true);
            }
            at += line.len();
        }
        for (i, ch) in doc.char_indices() {
            assert!(ch.is_whitespace() || covered[i], "{ch:?} at {i} is in no chunk of {doc:?}");
        }
        chunks
    }

    #[test]
    fn blank_text_gives_no_chunks() {
        assert!(chunk("", &ChunkOptions::default()).is_empty());
        assert!(chunk(" \n\t\r\n  ", &ChunkOptions::default()).is_empty());
    }

    #[test]
    fn short_text_is_one_trimmed_chunk_with_exact_offsets() {
        let doc = "\n  Hello there. How are you?  \n";
        let chunks = check(doc, &ChunkOptions::default());
        assert_eq!(chunks.len(), 1);
        assert_eq!(chunks[0].text, "Hello there. How are you?");
        assert_eq!((chunks[0].start, chunks[0].end), (3, 28));
        assert_eq!(chunks[0].heading, None);
    }

    #[test]
    fn consecutive_chunks_overlap_by_whole_sentences() {
        let doc: String = (0..40).map(|i| format!("Sentence number {i} says something. ")).collect();
        let chunks = check(&doc, &opts(200, 80));
        assert!(chunks.len() > 5);
        for pair in chunks.windows(2) {
            assert!(pair[1].start < pair[0].end, "no overlap between {:?} and {:?}", pair[0], pair[1]);
            assert!(pair[1].start > pair[0].start, "no progress");
            // The overlap is whole sentences: the next chunk starts where a sentence starts.
            assert!(pair[1].text.starts_with("Sentence number"), "{:?}", pair[1].text);
            assert!(pair[0].end - pair[1].start <= 80);
        }
        // Without overlap, chunks tile the text.
        let chunks = check(&doc, &opts(200, 0));
        assert!(chunks.windows(2).all(|p| p[1].start >= p[0].end));
    }

    #[test]
    fn chunks_never_cross_headings_and_carry_the_nearest_one() {
        let doc = "Preamble text.\n\n# Intro\nFirst part. More of it.\n\n## Details ##\nThe details.\n\
                   #hashtag is not a heading.\n    # indented code is not one\n# Empty\n\n# Last\nEnd.";
        let chunks = check(doc, &ChunkOptions::default());
        let labels: Vec<(Option<&str>, &str)> =
            chunks.iter().map(|c| (c.heading.as_deref(), c.text.as_str())).collect();
        assert_eq!(
            labels,
            [
                (None, "Preamble text."),
                (Some("Intro"), "# Intro\nFirst part. More of it."),
                (
                    Some("Details"),
                    "## Details ##\nThe details.\n#hashtag is not a heading.\n    # indented code is not one"
                ),
                (Some("Last"), "# Last\nEnd."),
            ]
        );
    }

    #[test]
    fn a_document_of_headings_alone_keeps_them() {
        let chunks = check("# One\n## Two\n", &ChunkOptions::default());
        let texts: Vec<&str> = chunks.iter().map(|c| c.text.as_str()).collect();
        assert_eq!(texts, ["# One", "## Two"]);
    }

    #[test]
    fn a_long_sentence_is_cut_at_word_boundaries() {
        let doc = "word ".repeat(500) + "end.";
        let chunks = check(&doc, &opts(100, 20));
        assert!(chunks.len() >= 25);
        for c in &chunks {
            assert!(c.text.split(' ').all(|w| w == "word" || w == "end."), "{:?} splits a word", c.text);
        }
    }

    #[test]
    fn unicode_text_never_splits_a_character() {
        let word = "é中文🙂".repeat(300); // one "word" per ideograph or a long Latin run
        let doc = format!("Café au lait. {word} Voilà 🎉 fini. {}", "ééééé".repeat(400));
        for target in [1, 2, 3, 7, 50, 800] {
            check(&doc, &opts(target, target / 3));
        }
    }

    #[test]
    fn random_documents_keep_every_invariant() {
        let alphabet = ["a", "é", "中", "🙂", " ", " ", "\n", ".", "? ", "# ", "\n## H\n", "\r\n", "\t", "word "];
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        for _ in 0..300 {
            let len = rng.random_range(0..400);
            let doc: String = (0..len).map(|_| alphabet[rng.random_range(0..alphabet.len())]).collect();
            let target = rng.random_range(1..120);
            check(&doc, &opts(target, rng.random_range(0..target + 10)));
        }
    }
}
