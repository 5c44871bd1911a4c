//! Structured outputs: a JSON schema, a regular expression, a list of choices or a Lark
//! grammar, compiled by llguidance against the served tokenizer into a per-row token mask.
//!
//! Compiled grammars are cached by the hash of their spec; each generation gets a deep clone
//! of the cached parser, so two rows with the same schema never share parser state.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Instant;

use llguidance::api::TopLevelGrammar;
use llguidance::toktrie::{TokEnv, TokRxInfo, TokTrie, TokenizerEnv};
use llguidance::{Matcher, ParserFactory, TokenParser};
use parking_lot::Mutex;
use serde::Serialize;
use serde_json::Value;
use sha2::{Digest, Sha256};
use tokenizers::Tokenizer;

/// What the answer must match.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub enum GrammarSpec {
    /// A JSON document valid against this schema (`{"type": "object"}` for `json_object`).
    JsonSchema(Value),
    /// Text matching this regular expression as a whole.
    Regex(String),
    /// Exactly one of these strings.
    Choice(Vec<String>),
    /// A Lark grammar (llguidance's dialect).
    Lark(String),
}

/// A grammar and the request parameter it came from (named in the 400 when it does not
/// compile).
#[derive(Debug, Clone, PartialEq)]
pub struct Grammar {
    pub spec: GrammarSpec,
    pub param: String,
}

/// How many compiled grammars are kept.
const CACHE_ENTRIES: usize = 256;

/// The grammar compiler for one tokenizer, with its cache of compiled parsers.
pub struct Grammars {
    factory: ParserFactory,
    env: TokEnv,
    cache: Mutex<Cache>,
    /// Held while compiling, so that concurrent first uses of a schema compile it once.
    compiling: Mutex<()>,
}

#[derive(Default)]
struct Cache {
    parsers: HashMap<[u8; 32], TokenParser>,
    order: VecDeque<[u8; 32]>,
}

/// The served tokenizer as llguidance sees it: the byte string of every token in a trie, and
/// the tokenizer itself for the text the grammar forces.
struct Vocab {
    trie: TokTrie,
    tokenizer: Arc<Tokenizer>,
}

impl TokenizerEnv for Vocab {
    fn tok_trie(&self) -> &TokTrie {
        &self.trie
    }

    fn tokenize_bytes(&self, s: &[u8]) -> Vec<u32> {
        self.trie.tokenize_with_greedy_fallback(s, |text| {
            self.tokenizer.encode(text, false).map(|e| e.get_ids().to_vec()).unwrap_or_default()
        })
    }
}

impl Grammars {
    /// Builds the token trie of `tokenizer` (`vocab_size` rows of logits; `eos` end a
    /// sequence and are allowed only where the grammar is complete).
    pub fn new(tokenizer: Arc<Tokenizer>, eos: &[u32], vocab_size: usize) -> anyhow::Result<Self> {
        let json: Value = serde_json::from_str(&tokenizer.to_string(false).map_err(|e| anyhow::anyhow!("{e}"))?)?;
        let mut words = llguidance::token_bytes_from_tokenizer_json(&json)?;
        if words.len() > vocab_size {
            anyhow::bail!("the tokenizer has {} tokens, more than the model's {vocab_size} logits", words.len());
        }
        // Logit rows past the tokenizer's last token can never be produced.
        while words.len() < vocab_size {
            let mut name = format!(".<[{}]>", words.len()).into_bytes();
            name[0] = TokTrie::SPECIAL_TOKEN_MARKER;
            words.push(name);
        }
        let first = *eos.first().ok_or_else(|| anyhow::anyhow!("the model has no end-of-sequence token"))?;
        let info = TokRxInfo::new(vocab_size as u32, first);
        let trie = TokTrie::from(&info, &words).with_eos_tokens(eos);
        let env: TokEnv = Arc::new(Vocab { trie, tokenizer });
        let mut factory = ParserFactory::new_simple(&env)?;
        factory.quiet();
        Ok(Self { factory, env, cache: Mutex::new(Cache::default()), compiling: Mutex::new(()) })
    }

    /// The bytes of one token as the model writes them (special tokens by their name).
    pub fn token_bytes(&self, token: u32) -> Vec<u8> {
        let bytes = self.env.tok_trie().token(token);
        match bytes.first() {
            Some(&TokTrie::SPECIAL_TOKEN_MARKER) => bytes[1..].to_vec(),
            _ => bytes.to_vec(),
        }
    }

    /// A fresh constraint for one generation; the spec is compiled once and then cloned.
    /// Returns the constraint and, on a cache miss, how long compiling took.
    pub fn compile(&self, spec: &GrammarSpec) -> Result<(Constraint, Option<f64>), String> {
        let key: [u8; 32] = Sha256::digest(serde_json::to_vec(spec).unwrap_or_default()).into();
        let cached =
            |cache: &Cache| cache.parsers.get(&key).map(|p| Constraint { matcher: Matcher::new(Ok(p.deep_clone())) });
        if let Some(constraint) = cached(&self.cache.lock()) {
            return Ok((constraint, None));
        }
        let _compiling = self.compiling.lock();
        if let Some(constraint) = cached(&self.cache.lock()) {
            return Ok((constraint, None));
        }
        let started = Instant::now();
        let grammar = match spec {
            GrammarSpec::JsonSchema(schema) => TopLevelGrammar::from_json_schema(compact(schema.clone())),
            GrammarSpec::Regex(rx) => TopLevelGrammar::from_regex(rx),
            GrammarSpec::Choice(choices) => {
                let alternatives: Vec<String> = choices.iter().map(|c| regex::escape(c)).collect();
                TopLevelGrammar::from_regex(&format!("({})", alternatives.join("|")))
            }
            GrammarSpec::Lark(lark) => TopLevelGrammar::from_lark(lark.clone()),
        };
        let parser =
            llguidance::panic_utils::catch_unwind(std::panic::AssertUnwindSafe(|| self.factory.create_parser(grammar)))
                .map_err(|e| clean(&e.to_string()))?;
        // The first mask finds what compiling alone does not (an empty language, say).
        let mut probe = Matcher::new(Ok(parser.deep_clone()));
        probe.compute_mask().map_err(|e| clean(&e.to_string()))?;
        let took = started.elapsed().as_secs_f64();
        let mut cache = self.cache.lock();
        if cache.parsers.len() >= CACHE_ENTRIES {
            if let Some(old) = cache.order.pop_front() {
                cache.parsers.remove(&old);
            }
        }
        cache.order.push_back(key);
        cache.parsers.insert(key, parser.deep_clone());
        Ok((Constraint { matcher: Matcher::new(Ok(parser)) }, Some(took)))
    }
}

/// JSON without optional whitespace: small models otherwise loop on newlines and spaces.
fn compact(mut schema: Value) -> Value {
    if let Value::Object(map) = &mut schema {
        map.entry("x-guidance").or_insert_with(|| serde_json::json!({"whitespace_flexible": false}));
    }
    schema
}

/// llguidance's messages carry a trailing backtrace line or two; the first line says it.
fn clean(message: &str) -> String {
    message.lines().next().unwrap_or(message).trim().to_owned()
}

/// One row's grammar state.
pub struct Constraint {
    matcher: Matcher,
}

impl Constraint {
    /// Sets every token the grammar does not allow next to minus infinity. End of sequence
    /// is allowed only where the text so far is complete (and is all that is allowed once
    /// nothing can follow).
    pub fn mask(&mut self, logits: &mut [f32]) -> Result<(), String> {
        let mask = self.matcher.compute_mask_or_eos().map_err(|e| clean(&e.to_string()))?;
        let n = logits.len();
        mask.iter_unset_entries(|i| {
            if i < n {
                logits[i] = f32::NEG_INFINITY;
            }
        });
        Ok(())
    }

    /// Advances past the sampled token.
    pub fn accept(&mut self, token: u32) -> Result<(), String> {
        self.matcher.consume_token(token).map_err(|e| clean(&e.to_string()))
    }

    /// A fresh state of the same grammar for another row (the constraint must not have
    /// consumed a token yet).
    pub fn fork(&self) -> Constraint {
        Constraint { matcher: self.matcher.deep_clone() }
    }

    /// Whether the grammar is complete and nothing may follow.
    pub fn is_stopped(&self) -> bool {
        self.matcher.is_stopped()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compact_keeps_an_explicit_choice() {
        let s = compact(serde_json::json!({"type": "object", "x-guidance": {"whitespace_flexible": true}}));
        assert_eq!(s["x-guidance"]["whitespace_flexible"], true);
        let s = compact(serde_json::json!({"type": "object"}));
        assert_eq!(s["x-guidance"]["whitespace_flexible"], false);
    }
}
