//! Scrubs emails, phone numbers, SSNs, payment cards and IBANs from training text.

use std::sync::LazyLock;

use regex::Regex;
use serde::Serialize;

/// How many replacements of each kind were made.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct PiiCounts {
    /// Replaced by `[EMAIL]`.
    pub email: usize,
    /// Replaced by `[PHONE]`.
    pub phone: usize,
    /// SSNs, Luhn-valid card numbers and IBANs, replaced by `[ID]`.
    pub id: usize,
}

impl PiiCounts {
    pub fn total(&self) -> usize {
        self.email + self.phone + self.id
    }
}

// The patterns are constants, so compiling them cannot fail at run time; the tests compile them.
// Digits are `[0-9]`, not `\d`: Unicode digits in other scripts are not phone or card numbers,
// and the checks below slice and do arithmetic on ASCII digits only.
static EMAIL: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"(?i)[a-z0-9][a-z0-9._%+\-]*@[a-z0-9](?:[a-z0-9\-]*[a-z0-9])?(?:\.[a-z0-9](?:[a-z0-9\-]*[a-z0-9])?)*\.[a-z]{2,24}")
        .expect("email pattern")
});
static IBAN: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"\b[A-Z]{2}[0-9]{2}(?: ?[A-Z0-9]{4}){2,7}(?: ?[A-Z0-9]{1,3})?").expect("iban pattern")
});
static SSN: LazyLock<Regex> = LazyLock::new(|| Regex::new(r"\b[0-9]{3}-[0-9]{2}-[0-9]{4}\b").expect("ssn pattern"));
/// Digit groups joined by single spaces or dashes; card numbers are searched inside these.
static DIGIT_RUN: LazyLock<Regex> = LazyLock::new(|| Regex::new(r"[0-9]+(?:[ \-][0-9]+)*").expect("digit run pattern"));
/// International (`+` country code) or national numbers with at least one separator; the
/// digit count is checked afterwards.
static PHONE: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(
        r"\+[0-9]{1,4}(?:[ .\-]?\(?[0-9]{1,6}\)?){1,6}|(?:\([0-9]{2,5}\)[ .\-]?|[0-9]{2,5}[ .\-])[0-9]{2,8}(?:[ .\-][0-9]{2,8}){0,4}",
    )
    .expect("phone pattern")
});

/// Replaces personal data in `text`, adding to `counts`. IDs go first so that an SSN or a
/// card number is not mistaken for a phone number.
pub fn scrub(text: &str, counts: &mut PiiCounts) -> String {
    let (text, n) = replace(&EMAIL, text, "[EMAIL]", |_, s, e| vec![(s, e)]);
    counts.email += n;
    let (text, n1) = replace(&IBAN, &text, "[ID]", iban_range);
    let (text, n2) = replace(&SSN, &text, "[ID]", ssn_range);
    let (text, n3) = replace(&DIGIT_RUN, &text, "[ID]", card_ranges);
    counts.id += n1 + n2 + n3;
    let (text, n) = replace(&PHONE, &text, "[PHONE]", phone_range);
    counts.phone += n;
    text
}

/// Replaces the ranges `accept` picks out of each match (none, or several for a digit run).
fn replace(
    re: &Regex,
    text: &str,
    token: &str,
    accept: impl Fn(&str, usize, usize) -> Vec<(usize, usize)>,
) -> (String, usize) {
    let mut out = String::with_capacity(text.len());
    let mut last = 0;
    let mut count = 0;
    for m in re.find_iter(text) {
        for (s, e) in accept(text, m.start(), m.end()) {
            out.push_str(&text[last..s]);
            out.push_str(token);
            last = e;
            count += 1;
        }
    }
    out.push_str(&text[last..]);
    (out, count)
}

fn before(text: &str, at: usize) -> Option<char> {
    text[..at].chars().next_back()
}

fn after(text: &str, at: usize) -> Option<char> {
    text[at..].chars().next()
}

/// The longest valid IBAN the match starts with: the pattern may run on into a following
/// word of four characters, so the match is also tried cut at each space.
fn iban_range(text: &str, start: usize, end: usize) -> Vec<(usize, usize)> {
    let candidate = &text[start..end];
    let mut stops: Vec<usize> = candidate.match_indices(' ').map(|(i, _)| start + i).collect();
    stops.push(end);
    for &stop in stops.iter().rev() {
        let compact: String = text[start..stop].chars().filter(|c| *c != ' ').collect();
        if (15..=34).contains(&compact.len()) && iban_checksum_ok(&compact) {
            return vec![(start, stop)];
        }
    }
    Vec::new()
}

/// ISO 13616: move the first four characters to the end, letters become 10..35, mod 97 is 1.
fn iban_checksum_ok(iban: &str) -> bool {
    let rotated = iban.chars().skip(4).chain(iban.chars().take(4));
    let mut rem: u32 = 0;
    for c in rotated {
        let Some(d) = c.to_digit(36) else { return false };
        rem = if d < 10 { (rem * 10 + d) % 97 } else { (rem * 100 + d) % 97 };
    }
    rem == 1
}

fn ssn_range(text: &str, start: usize, end: usize) -> Vec<(usize, usize)> {
    // A longer dashed number (`123-45-6789-01`) is not an SSN; nor are the all-zero groups
    // that the SSA never issues.
    let longer = before(text, start) == Some('-')
        || text[end..].starts_with('-') && after(text, end + 1).is_some_and(|c| c.is_ascii_digit());
    let s = &text[start..end];
    if longer || s.starts_with("000") || s.starts_with("666") || &s[4..6] == "00" || &s[7..] == "0000" {
        return Vec::new();
    }
    vec![(start, end)]
}

/// Card numbers inside a run of digit groups: a whole contiguous run of 13-19 digits, or
/// consecutive groups of 3-6 digits totalling 13-19, that pass the Luhn check.
fn card_ranges(text: &str, start: usize, end: usize) -> Vec<(usize, usize)> {
    if before(text, start).is_some_and(|c| c.is_alphanumeric() || c == '_')
        || after(text, end).is_some_and(|c| c.is_alphanumeric() || c == '_')
    {
        return Vec::new();
    }
    let mut groups: Vec<(usize, usize)> = Vec::new();
    let run = &text[start..end];
    let mut group_start = 0;
    for (i, c) in run.char_indices() {
        if !c.is_ascii_digit() {
            groups.push((start + group_start, start + i));
            group_start = i + 1;
        }
    }
    groups.push((start + group_start, end));
    let mut found = Vec::new();
    let mut first = 0;
    'outer: while first < groups.len() {
        // A window spans at most 19 digits, so at most 19 groups: linear in the run length.
        let limit = (first + 19).min(groups.len());
        for last in (first..limit).rev() {
            let window = &groups[first..=last];
            let digits: usize = window.iter().map(|(s, e)| e - s).sum();
            let shaped = window.len() == 1 || window.iter().all(|(s, e)| (3..=6).contains(&(e - s)));
            if shaped && (13..=19).contains(&digits) && luhn_ok(window.iter().flat_map(|&(s, e)| text[s..e].bytes())) {
                found.push((window[0].0, window[window.len() - 1].1));
                first = last + 1;
                continue 'outer;
            }
        }
        first += 1;
    }
    found
}

fn luhn_ok(digits: impl Iterator<Item = u8>) -> bool {
    let digits: Vec<u32> = digits.map(|b| u32::from(b - b'0')).collect();
    let sum: u32 = digits
        .iter()
        .rev()
        .enumerate()
        .map(|(i, &d)| {
            if i % 2 == 1 {
                if d * 2 > 9 {
                    d * 2 - 9
                } else {
                    d * 2
                }
            } else {
                d
            }
        })
        .sum();
    sum.is_multiple_of(10)
}

fn phone_range(text: &str, start: usize, end: usize) -> Vec<(usize, usize)> {
    let s = &text[start..end];
    let digits = s.bytes().filter(u8::is_ascii_digit).count();
    let prev = before(text, start);
    // After "digit + space" the match is the tail of a longer number (a thousands-grouped
    // amount); after "letter or digit + dot or dash", or glued to a letter or digit, it is
    // part of a code or a word.
    let tail_of_number = match prev {
        Some(' ') => before(text, start - 1).is_some_and(|c| c.is_ascii_digit()),
        Some('.' | '-') => before(text, start - 1).is_some_and(char::is_alphanumeric),
        _ => false,
    };
    let glued = prev.is_some_and(|c| c.is_alphanumeric() || matches!(c, '_' | '/' | ':'))
        || after(text, end).is_some_and(|c| c.is_alphanumeric() || matches!(c, '_' | '/' | ':'));
    if !(9..=15).contains(&digits) || tail_of_number || glued || is_date_like(s) || is_ipv4_like(s) {
        return Vec::new();
    }
    vec![(start, end)]
}

fn is_date_like(s: &str) -> bool {
    let b = s.as_bytes();
    b.len() >= 10
        && b[..4].iter().all(u8::is_ascii_digit)
        && b[4] == b'-'
        && b[5..7].iter().all(u8::is_ascii_digit)
        && b[7] == b'-'
        && b[8..10].iter().all(u8::is_ascii_digit)
}

fn is_ipv4_like(s: &str) -> bool {
    let parts: Vec<&str> = s.split('.').collect();
    parts.len() == 4 && parts.iter().all(|p| (1..=3).contains(&p.len()) && p.bytes().all(|b| b.is_ascii_digit()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scrubbed(text: &str) -> (String, PiiCounts) {
        let mut counts = PiiCounts::default();
        (scrub(text, &mut counts), counts)
    }

    #[test]
    fn emails_phones_and_ids_are_replaced_and_counted() {
        let (text, counts) = scrubbed(
            "Mail jane.doe+x@mail.example.co.uk or call +1 (555) 123-4567 / 030 1234567 or 06 12 34 56 78. \
             SSN 123-45-6789, card 4111 1111 1111 1111, also 4012888888881881, IBAN GB82 WEST 1234 5698 7654 32.",
        );
        assert_eq!(
            text,
            "Mail [EMAIL] or call [PHONE] / [PHONE] or [PHONE]. SSN [ID], card [ID], also [ID], IBAN [ID]."
        );
        assert_eq!(counts, PiiCounts { email: 1, phone: 3, id: 4 });
        assert_eq!(counts.total(), 8);
    }

    #[test]
    fn numbers_that_are_not_personal_data_stay() {
        for text in [
            "order 4111111111111112 is not a card",
            "not a card either: 1234 5678 9012 3456",
            "on 2024-01-15 12:30 at 192.168.100.200",
            "revenue was 1 234 567 890 dollars",
            "version 1.2.3, pi is 3.14159265, code ABC-123-45-6789",
            "short 555-1234 and 12-34",
            "٤١١١ ١١١١ ١١١١ ١١١١ and ５５５-１２３-４５６７ and ４１１１１１１１１１１１１１１１",
        ] {
            let (out, counts) = scrubbed(text);
            assert_eq!((out.as_str(), counts.total()), (text, 0), "{text}");
        }
    }

    #[test]
    fn iban_followed_by_a_four_letter_word_is_still_found() {
        let (text, counts) = scrubbed("pay to BE68 5390 0754 7034 ABCD today");
        assert_eq!((text.as_str(), counts.id), ("pay to [ID] ABCD today", 1));
        let (text, _) = scrubbed("or DE89370400440532013000.");
        assert_eq!(text, "or [ID].");
        let (text, _) = scrubbed("DE89370400440532013001");
        assert_eq!(text, "DE89370400440532013001", "a bad checksum is not an IBAN");
    }

    #[test]
    fn arbitrary_text_never_panics_and_keeps_its_text_outside_matches() {
        let alphabet: Vec<char> = "0123456789 -.+()@:/_abcXYZ٤５é\n".chars().collect();
        let mut state: u64 = 0x2545_f491_4f6c_dd1d;
        for _ in 0..3000 {
            let len = (state % 40) as usize;
            let text: String = (0..len)
                .map(|_| {
                    state ^= state << 13;
                    state ^= state >> 7;
                    state ^= state << 17;
                    alphabet[(state % alphabet.len() as u64) as usize]
                })
                .collect();
            let (out, counts) = scrubbed(&text);
            if counts.total() == 0 {
                assert_eq!(out, text);
            }
        }
    }

    #[test]
    fn luhn_check_matches_known_numbers() {
        assert!(luhn_ok("79927398713".bytes()));
        assert!(!luhn_ok("79927398710".bytes()));
    }
}
