//! Stop sequences over streamed text: holds back what could be the start of a stop sequence,
//! and cuts the text where one appears, so streamed and whole answers never contain it.

/// Feeds deltas in, gets back the text that is safe to emit.
#[derive(Debug, Clone)]
pub struct StopFilter {
    stops: Vec<String>,
    held: String,
    stopped: bool,
}

/// What one delta produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Filtered {
    /// Text safe to send now.
    pub text: String,
    /// A stop sequence was found; nothing more will be emitted.
    pub stopped: bool,
}

impl StopFilter {
    pub fn new(stops: Vec<String>) -> Self {
        let stops = stops.into_iter().filter(|s| !s.is_empty()).collect();
        Self { stops, held: String::new(), stopped: false }
    }

    pub fn is_stopped(&self) -> bool {
        self.stopped
    }

    pub fn push(&mut self, delta: &str) -> Filtered {
        if self.stopped {
            return Filtered { text: String::new(), stopped: true };
        }
        if self.stops.is_empty() {
            return Filtered { text: delta.to_owned(), stopped: false };
        }
        self.held.push_str(delta);
        if let Some(cut) = self.stops.iter().filter_map(|s| self.held.find(s.as_str())).min() {
            self.stopped = true;
            let text = self.held[..cut].to_owned();
            self.held.clear();
            return Filtered { text, stopped: true };
        }
        let keep = self.longest_stop_prefix_suffix();
        let emit_to = self.held.len() - keep;
        let text = self.held[..emit_to].to_owned();
        self.held.drain(..emit_to);
        Filtered { text, stopped: false }
    }

    /// The text still held back when the generation ends without a stop sequence.
    pub fn finish(&mut self) -> String {
        if self.stopped {
            return String::new();
        }
        std::mem::take(&mut self.held)
    }

    /// Length in bytes of the longest suffix of `held` that starts some stop sequence.
    fn longest_stop_prefix_suffix(&self) -> usize {
        let mut best = 0;
        for (start, _) in self.held.char_indices() {
            let suffix = &self.held[start..];
            if self.stops.iter().any(|s| s.starts_with(suffix)) {
                best = best.max(suffix.len());
                break;
            }
        }
        best
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(stops: &[&str], deltas: &[&str]) -> (String, bool) {
        let mut f = StopFilter::new(stops.iter().map(|s| s.to_string()).collect());
        let mut out = String::new();
        for d in deltas {
            let r = f.push(d);
            out.push_str(&r.text);
            if r.stopped {
                return (out, true);
            }
        }
        out.push_str(&f.finish());
        (out, false)
    }

    #[test]
    fn passes_text_through_without_stops() {
        assert_eq!(run(&[], &["a", "b"]), ("ab".into(), false));
    }

    #[test]
    fn cuts_a_stop_split_across_deltas() {
        assert_eq!(run(&["END"], &["hello E", "N", "D tail"]), ("hello ".into(), true));
    }

    #[test]
    fn releases_a_false_start() {
        assert_eq!(run(&["END"], &["E", "NX", " ok"]), ("ENX ok".into(), false));
    }

    #[test]
    fn earliest_of_several_stops_wins() {
        assert_eq!(run(&["b", "a"], &["xxab"]), ("xx".into(), true));
    }

    #[test]
    fn held_prefix_is_released_at_the_end() {
        assert_eq!(run(&["ENDING"], &["text EN"]), ("text EN".into(), false));
    }

    #[test]
    fn multibyte_text_is_not_split() {
        assert_eq!(run(&["é!"], &["café", "é?"]), ("caféé?".into(), false));
    }
}
