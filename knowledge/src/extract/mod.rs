//! Uploaded file bytes to plain text (and a title), for text, Markdown, HTML, PDF and DOCX.
//!
//! Headings come out as Markdown heading lines (`# Title`, `## Section`) in every format that
//! has them, so [`crate::chunk`] can start a new section at each. Hostile input (random bytes,
//! a zip bomb, a PDF that makes the parser panic, HTML nested thousands deep) is an
//! [`KnowledgeError::Unreadable`], never a panic: the parsers run on a thread of their own with
//! a large stack, under `catch_unwind`; decompression stops at [`MAX_DECOMPRESSED`] bytes; and
//! HTML nested deeper than 5,000 elements is refused before parsing (the parser's time grows
//! with the square of the depth). A parser panic is still printed by the process's panic hook.

mod docx;
mod markdown;

use std::panic::{catch_unwind, AssertUnwindSafe};

use serde::{Deserialize, Serialize};

use crate::KnowledgeError;

/// The most bytes read out of any compressed part of an upload (a DOCX's XML parts).
pub const MAX_DECOMPRESSED: u64 = 64 << 20;

/// The stack of the parsing thread: nested markup recurses in the HTML and PDF parsers.
const PARSER_STACK: usize = 256 << 20;

/// The deepest element nesting an HTML upload may have (see [`nesting_depth`]).
const MAX_HTML_DEPTH: usize = 5_000;

/// The kinds of document a knowledge base accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    Text,
    Markdown,
    Html,
    Pdf,
    Docx,
}

impl Format {
    /// From the file name's extension first (.txt .text .md .markdown .html .htm .pdf .docx),
    /// then the content type (text/plain, text/markdown, text/html, application/pdf,
    /// application/vnd.openxmlformats-officedocument.wordprocessingml.document); `None` when
    /// neither says.
    pub fn detect(filename: Option<&str>, content_type: Option<&str>) -> Option<Format> {
        let by_name = filename.and_then(|name| {
            let (_, ext) = name.rsplit_once('.')?;
            match ext.to_ascii_lowercase().as_str() {
                "txt" | "text" => Some(Format::Text),
                "md" | "markdown" => Some(Format::Markdown),
                "html" | "htm" => Some(Format::Html),
                "pdf" => Some(Format::Pdf),
                "docx" => Some(Format::Docx),
                _ => None,
            }
        });
        by_name.or_else(|| {
            // Parameters such as `; charset=utf-8` do not change the format.
            let essence = content_type?.split(';').next()?.trim().to_ascii_lowercase();
            match essence.as_str() {
                "text/plain" => Some(Format::Text),
                "text/markdown" | "text/x-markdown" => Some(Format::Markdown),
                "text/html" => Some(Format::Html),
                "application/pdf" => Some(Format::Pdf),
                "application/vnd.openxmlformats-officedocument.wordprocessingml.document" => Some(Format::Docx),
                _ => None,
            }
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Format::Text => "text",
            Format::Markdown => "markdown",
            Format::Html => "html",
            Format::Pdf => "pdf",
            Format::Docx => "docx",
        }
    }
}

/// The text of a document and the title it declares, if any.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Extracted {
    pub text: String,
    pub title: Option<String>,
}

/// Turns an uploaded file into text. Errors ([`KnowledgeError::Unreadable`]) for non-UTF-8
/// text or Markdown, a corrupt PDF or DOCX, HTML nested absurdly deep, or a file with no text
/// at all. HTML is decoded as UTF-8 with invalid bytes replaced (pages often mislabel their
/// charset; losing a character beats refusing the page). Text keeps its bytes exactly (less a
/// BOM); the other formats come out with line ends trimmed and at most one blank line in a row.
pub fn extract(format: Format, bytes: &[u8]) -> Result<Extracted, KnowledgeError> {
    let extracted = match format {
        Format::Text => Extracted { text: utf8(format, bytes)?.to_owned(), title: None },
        Format::Markdown => markdown::extract(utf8(format, bytes)?),
        Format::Html => {
            let html = String::from_utf8_lossy(strip_bom(bytes)).into_owned();
            guarded(format, move || html_text(&html))??
        }
        Format::Pdf => {
            let owned = bytes.to_vec();
            let text = guarded(format, move || pdf_extract::extract_text_from_mem(&owned).map_err(|e| e.to_string()))?
                .map_err(|e| unreadable(format, e))?;
            Extracted { text: tidy_lines(&text), title: None }
        }
        Format::Docx => {
            let owned = bytes.to_vec();
            guarded(format, move || docx::extract(&owned))??
        }
    };
    if extracted.text.trim().is_empty() {
        return Err(unreadable(format, "the file has no text"));
    }
    Ok(extracted)
}

pub(crate) fn unreadable(format: Format, detail: impl ToString) -> KnowledgeError {
    KnowledgeError::Unreadable { format: format.as_str(), detail: detail.to_string() }
}

fn strip_bom(bytes: &[u8]) -> &[u8] {
    bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(bytes)
}

fn utf8(format: Format, bytes: &[u8]) -> Result<&str, KnowledgeError> {
    std::str::from_utf8(strip_bom(bytes))
        .map_err(|e| unreadable(format, format!("not UTF-8 text (invalid byte at offset {})", e.valid_up_to())))
}

/// Runs a third-party parser on a thread with a large stack and turns a panic into an error.
fn guarded<T: Send + 'static>(format: Format, f: impl FnOnce() -> T + Send + 'static) -> Result<T, KnowledgeError> {
    let thread = std::thread::Builder::new()
        .name(format!("extract-{}", format.as_str()))
        .stack_size(PARSER_STACK)
        .spawn(move || catch_unwind(AssertUnwindSafe(f)))
        .map_err(|e| unreadable(format, format!("cannot start the parser: {e}")))?;
    match thread.join() {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(_)) | Err(_) => Err(unreadable(format, "the file is corrupt (the parser gave up on it)")),
    }
}

/// Trims each line's end and keeps at most one blank line in a row.
fn tidy_lines(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut blank_run = 0;
    for line in text.lines() {
        let line = line.trim_end();
        if line.is_empty() {
            blank_run += 1;
            if blank_run > 1 || out.is_empty() {
                continue;
            }
        } else {
            blank_run = 0;
        }
        out.push_str(line);
        out.push('\n');
    }
    out.truncate(out.trim_end().len());
    out
}

fn html_text(html: &str) -> Result<Extracted, KnowledgeError> {
    let depth = nesting_depth(html);
    if depth > MAX_HTML_DEPTH {
        return Err(unreadable(Format::Html, format!("elements nest {depth} deep; the limit is {MAX_HTML_DEPTH}")));
    }
    let text = html2text::config::with_decorator(TextOnly)
        .no_table_borders()
        .string_from_read(html.as_bytes(), 10_000)
        .map_err(|e| unreadable(Format::Html, e))?;
    let title = element_text(html, "title").or_else(|| element_text(html, "h1"));
    Ok(Extracted { text: tidy_lines(&text), title })
}

/// About how deep the elements of an HTML document nest: opening tags minus closing tags, not
/// counting void elements, elements whose end tag may be left out, comments, and the contents
/// of `<script>` and `<style>`. An estimate (it reads no attributes and trusts no DTD), good for
/// refusing documents whose nesting would take the parser minutes (its cost grows with the
/// square of the depth).
fn nesting_depth(html: &str) -> usize {
    const NOT_NESTING: [&str; 26] = [
        "area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr", "param",
        "p", "li", "dt", "dd", "tr", "td", "th", "option", "optgroup", "thead", "tbody", "tfoot",
    ];
    let lower = html.to_ascii_lowercase();
    let bytes = lower.as_bytes();
    let (mut at, mut depth, mut max) = (0, 0usize, 0);
    while let Some(open) = lower[at..].find('<').map(|i| at + i) {
        let rest = &lower[open + 1..];
        if rest.starts_with("!--") {
            at = rest.find("-->").map_or(bytes.len(), |i| open + 1 + i + 3);
            continue;
        }
        let closing = rest.starts_with('/');
        let name_start = open + 1 + usize::from(closing);
        let name_len = bytes[name_start..].iter().take_while(|b| b.is_ascii_alphanumeric()).count();
        let Some(end) = lower[name_start..].find('>').map(|i| name_start + i) else { break };
        at = end + 1;
        let name = &lower[name_start..name_start + name_len];
        if name.is_empty() || !name.as_bytes()[0].is_ascii_alphabetic() || NOT_NESTING.contains(&name) {
            continue;
        }
        if closing {
            depth = depth.saturating_sub(1);
        } else if bytes[end - 1] != b'/' {
            depth += 1;
            max = max.max(depth);
            if name == "script" || name == "style" {
                // Raw text: skip to the end tag (the end tag then closes this element).
                at = lower[at..].find(&format!("</{name}")).map_or(bytes.len(), |i| at + i);
            }
        }
    }
    max
}

/// The text inside the first `<name ...>...</name>` of an HTML document, tags and entities
/// resolved and whitespace collapsed; `None` when absent or empty.
fn element_text(html: &str, name: &str) -> Option<String> {
    // ASCII lowercasing keeps byte offsets, so positions found in `lower` index `html`.
    let lower = html.to_ascii_lowercase();
    let open = format!("<{name}");
    let mut from = 0;
    let start = loop {
        let at = from + lower[from..].find(&open)?;
        let after = at + open.len();
        // `<title>` or `<title lang=..>`, not `<titles>`.
        if lower[after..].starts_with(['>', ' ', '\t', '\n', '\r', '/']) {
            break after + lower[after..].find('>')? + 1;
        }
        from = after;
    };
    let end = start + lower[start..].find(&format!("</{name}"))?;
    let inner =
        html2text::config::with_decorator(TextOnly).string_from_read(&html.as_bytes()[start..end], 10_000).ok()?;
    let title = inner.split_whitespace().collect::<Vec<_>>().join(" ");
    (!title.is_empty()).then_some(title)
}

/// Plain text for indexing: headings as Markdown heading lines, list bullets, no link targets
/// or emphasis marks.
#[derive(Clone, Copy)]
struct TextOnly;

impl html2text::render::TextDecorator for TextOnly {
    type Annotation = ();

    fn decorate_link_start(&mut self, _url: &str) -> (String, ()) {
        (String::new(), ())
    }
    fn decorate_link_end(&mut self) -> String {
        String::new()
    }
    fn decorate_em_start(&self) -> (String, ()) {
        (String::new(), ())
    }
    fn decorate_em_end(&self) -> String {
        String::new()
    }
    fn decorate_strong_start(&self) -> (String, ()) {
        (String::new(), ())
    }
    fn decorate_strong_end(&self) -> String {
        String::new()
    }
    fn decorate_strikeout_start(&self) -> (String, ()) {
        (String::new(), ())
    }
    fn decorate_strikeout_end(&self) -> String {
        String::new()
    }
    fn decorate_code_start(&self) -> (String, ()) {
        (String::new(), ())
    }
    fn decorate_code_end(&self) -> String {
        String::new()
    }
    fn decorate_preformat_first(&self) {}
    fn decorate_preformat_cont(&self) {}
    fn decorate_image(&mut self, _src: &str, title: &str) -> (String, ()) {
        (title.to_owned(), ())
    }
    fn header_prefix(&self, level: usize) -> String {
        "#".repeat(level.clamp(1, 6)) + " "
    }
    fn quote_prefix(&self) -> String {
        "> ".to_owned()
    }
    fn unordered_item_prefix(&self) -> String {
        "- ".to_owned()
    }
    fn ordered_item_prefix(&self, i: i64) -> String {
        format!("{i}. ")
    }
    fn make_subblock_decorator(&self) -> Self {
        TextOnly
    }
}

#[cfg(test)]
mod tests;
