//! Markdown to indexable text: heading lines kept as `#` lines, link targets and emphasis marks
//! dropped, code blocks indented so a `# comment` inside one is not taken for a heading.

use pulldown_cmark::{Event, HeadingLevel, Options, Parser, Tag, TagEnd};

use super::{tidy_lines, Extracted};

/// Renders Markdown as plain text; the title is the first level-1 heading, else the first
/// heading of any level.
pub(super) fn extract(source: &str) -> Extracted {
    let options =
        Options::ENABLE_TABLES | Options::ENABLE_STRIKETHROUGH | Options::ENABLE_TASKLISTS | Options::ENABLE_FOOTNOTES;
    let mut out = Writer::default();
    let (mut first_h1, mut first_heading) = (None, None);
    let mut heading: Option<(usize, String)> = None;
    let mut code: Option<String> = None;
    let mut lists = 0usize;
    for event in Parser::new_ext(source, options) {
        match event {
            Event::Start(Tag::Heading { level, .. }) => heading = Some((level_number(level), String::new())),
            Event::End(TagEnd::Heading(_)) => {
                if let Some((level, text)) = heading.take() {
                    let text = text.split_whitespace().collect::<Vec<_>>().join(" ");
                    if !text.is_empty() {
                        out.block(&format!("{} {text}", "#".repeat(level)));
                        if level == 1 && first_h1.is_none() {
                            first_h1 = Some(text.clone());
                        }
                        first_heading.get_or_insert(text);
                    }
                }
            }
            Event::Start(Tag::CodeBlock(_)) => code = Some(String::new()),
            Event::End(TagEnd::CodeBlock) => {
                if let Some(body) = code.take() {
                    let indented: Vec<String> = body.lines().map(|l| format!("    {l}")).collect();
                    out.block(&indented.join("\n"));
                }
            }
            Event::Start(Tag::List(_)) => {
                out.newline();
                lists += 1;
            }
            Event::End(TagEnd::List(_)) => {
                lists = lists.saturating_sub(1);
                if lists == 0 {
                    out.blank_line();
                }
            }
            Event::Start(Tag::Item) => {
                out.newline();
                out.push(&"  ".repeat(lists.saturating_sub(1)));
                out.push("- ");
            }
            Event::Start(Tag::Paragraph | Tag::BlockQuote(_) | Tag::Table(_) | Tag::FootnoteDefinition(_))
            | Event::End(TagEnd::Paragraph | TagEnd::BlockQuote(_) | TagEnd::Table | TagEnd::FootnoteDefinition)
            | Event::Rule => {
                if lists == 0 {
                    out.blank_line();
                } else {
                    out.newline();
                }
            }
            Event::End(TagEnd::TableHead | TagEnd::TableRow) => out.newline(),
            Event::End(TagEnd::TableCell) => out.push(" | "),
            Event::Text(text) | Event::Code(text) | Event::InlineMath(text) | Event::DisplayMath(text) => {
                if let Some(body) = code.as_mut() {
                    body.push_str(&text);
                } else if let Some((_, h)) = heading.as_mut() {
                    h.push_str(&text);
                } else {
                    out.push(&text);
                }
            }
            Event::SoftBreak => match heading.as_mut() {
                Some((_, h)) => h.push(' '),
                None => out.push(" "),
            },
            Event::HardBreak => out.newline(),
            Event::TaskListMarker(done) => out.push(if done { "[x] " } else { "[ ] " }),
            _ => {}
        }
    }
    Extracted { text: tidy_lines(&out.text), title: first_h1.or(first_heading) }
}

fn level_number(level: HeadingLevel) -> usize {
    match level {
        HeadingLevel::H1 => 1,
        HeadingLevel::H2 => 2,
        HeadingLevel::H3 => 3,
        HeadingLevel::H4 => 4,
        HeadingLevel::H5 => 5,
        HeadingLevel::H6 => 6,
    }
}

/// Text output that knows whether it stands at the start of a line.
#[derive(Default)]
struct Writer {
    text: String,
}

impl Writer {
    fn push(&mut self, s: &str) {
        self.text.push_str(s);
    }

    fn newline(&mut self) {
        if !self.text.is_empty() && !self.text.ends_with('\n') {
            self.text.push('\n');
        }
    }

    fn blank_line(&mut self) {
        self.newline();
        if !self.text.is_empty() && !self.text.ends_with("\n\n") {
            self.text.push('\n');
        }
    }

    /// A block of its own, with a blank line before and after.
    fn block(&mut self, s: &str) {
        self.blank_line();
        self.text.push_str(s);
        self.blank_line();
    }
}
