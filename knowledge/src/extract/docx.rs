//! DOCX to text: the `w:t` runs of `word/document.xml`, one line per paragraph, headings (the
//! `Title` and `HeadingN` paragraph styles) as Markdown heading lines.

use std::io::{Cursor, Read};

use quick_xml::events::{BytesStart, Event};
use quick_xml::Reader;

use super::{tidy_lines, unreadable, Extracted, Format, MAX_DECOMPRESSED};
use crate::KnowledgeError;

const DOCUMENT: &str = "word/document.xml";
const CORE_PROPERTIES: &str = "docProps/core.xml";

/// The title is `dc:title` of `docProps/core.xml` when set, else the first heading.
pub(super) fn extract(bytes: &[u8]) -> Result<Extracted, KnowledgeError> {
    let mut zip = zip::ZipArchive::new(Cursor::new(bytes)).map_err(|e| unreadable(Format::Docx, e))?;
    let document = read_part(&mut zip, DOCUMENT)?
        .ok_or_else(|| unreadable(Format::Docx, format!("{DOCUMENT} is missing (not a Word document)")))?;
    let (text, first_heading) = document_text(&document)?;
    // A broken core.xml only costs the title.
    let title =
        read_part(&mut zip, CORE_PROPERTIES).ok().flatten().and_then(|core| core_title(&core)).or(first_heading);
    Ok(Extracted { text: tidy_lines(&text), title })
}

/// One part of the package, decompressed up to the cap; `None` when the package lacks it.
fn read_part(zip: &mut zip::ZipArchive<Cursor<&[u8]>>, name: &str) -> Result<Option<Vec<u8>>, KnowledgeError> {
    let file = match zip.by_name(name) {
        Ok(file) => file,
        Err(zip::result::ZipError::FileNotFound) => return Ok(None),
        Err(e) => return Err(unreadable(Format::Docx, e)),
    };
    let mut bytes = Vec::new();
    // Read one byte past the cap to tell "exactly the cap" from "more than the cap".
    file.take(MAX_DECOMPRESSED + 1).read_to_end(&mut bytes).map_err(|e| unreadable(Format::Docx, e))?;
    if bytes.len() as u64 > MAX_DECOMPRESSED {
        return Err(unreadable(Format::Docx, format!("{name} decompresses to more than {MAX_DECOMPRESSED} bytes")));
    }
    Ok(Some(bytes))
}

/// A paragraph being read: its text and, for a heading style, its level.
#[derive(Default)]
struct Paragraph {
    text: String,
    heading: Option<usize>,
}

/// The document's text and its first heading.
fn document_text(xml: &[u8]) -> Result<(String, Option<String>), KnowledgeError> {
    let mut reader = Reader::from_reader(xml);
    let mut out = String::new();
    let mut first_heading = None;
    // Paragraphs nest (a text box inside a paragraph); each is written out when it closes.
    let mut open: Vec<Paragraph> = Vec::new();
    let mut in_text = false;
    loop {
        let event = reader.read_event().map_err(|e| unreadable(Format::Docx, format!("{DOCUMENT}: {e}")))?;
        match event {
            Event::Start(e) => match e.local_name().as_ref() {
                b"p" => open.push(Paragraph::default()),
                b"t" => in_text = true,
                b"pStyle" => set_heading(&e, &mut open),
                _ => {}
            },
            Event::Empty(e) => match e.local_name().as_ref() {
                b"pStyle" => set_heading(&e, &mut open),
                b"tab" => push(&mut open, "\t"),
                b"br" | b"cr" => push(&mut open, "\n"),
                b"p" => out.push('\n'),
                _ => {}
            },
            Event::End(e) => match e.local_name().as_ref() {
                b"t" => in_text = false,
                b"p" => {
                    let Some(paragraph) = open.pop() else { continue };
                    let text = paragraph.text.trim();
                    match paragraph.heading {
                        Some(level) if !text.is_empty() => {
                            let line = text.split_whitespace().collect::<Vec<_>>().join(" ");
                            out.push_str(&format!("\n{} {line}\n", "#".repeat(level)));
                            first_heading.get_or_insert(line);
                        }
                        _ => out.push_str(&paragraph.text),
                    }
                    out.push('\n');
                }
                _ => {}
            },
            Event::Text(t) if in_text => {
                let text = t.decode().map_err(|e| unreadable(Format::Docx, e))?;
                push(&mut open, &text);
            }
            Event::CData(t) if in_text => push(&mut open, &String::from_utf8_lossy(&t)),
            Event::GeneralRef(r) if in_text => {
                let name = r.decode().map_err(|e| unreadable(Format::Docx, e))?;
                let resolved = match r.resolve_char_ref() {
                    Ok(Some(c)) => Some(c.to_string()),
                    _ => quick_xml::escape::resolve_xml_entity(&name).map(str::to_owned),
                };
                push(&mut open, resolved.as_deref().unwrap_or_default());
            }
            Event::Eof => break,
            _ => {}
        }
    }
    Ok((out, first_heading))
}

/// Appends to the innermost open paragraph (text outside any paragraph is dropped).
fn push(open: &mut [Paragraph], text: &str) {
    if let Some(p) = open.last_mut() {
        p.text.push_str(text);
    }
}

/// `<w:pStyle w:val="Heading2"/>` makes the open paragraph a level-2 heading; `Title` is level 1.
fn set_heading(e: &BytesStart, open: &mut [Paragraph]) {
    let Some(value) = e.attributes().flatten().find(|a| a.key.local_name().as_ref() == b"val").map(|a| a.value) else {
        return;
    };
    let style = String::from_utf8_lossy(&value).to_ascii_lowercase();
    let level = match style.strip_prefix("heading") {
        Some(n) => n.trim().parse::<usize>().ok().filter(|n| (1..=9).contains(n)).map(|n| n.min(6)),
        None => (style == "title").then_some(1),
    };
    if let (Some(level), Some(p)) = (level, open.last_mut()) {
        p.heading = Some(level);
    }
}

/// The `dc:title` of the core properties, whitespace collapsed; `None` when absent or blank.
fn core_title(xml: &[u8]) -> Option<String> {
    let mut reader = Reader::from_reader(xml);
    let mut in_title = false;
    let mut title = String::new();
    loop {
        match reader.read_event().ok()? {
            Event::Start(e) if e.local_name().as_ref() == b"title" => in_title = true,
            Event::End(e) if e.local_name().as_ref() == b"title" => break,
            Event::Text(t) if in_title => title.push_str(&t.decode().ok()?),
            Event::GeneralRef(r) if in_title => {
                let name = r.decode().ok()?;
                match r.resolve_char_ref() {
                    Ok(Some(c)) => title.push(c),
                    _ => title.push_str(quick_xml::escape::resolve_xml_entity(&name).unwrap_or_default()),
                }
            }
            Event::Eof => break,
            _ => {}
        }
    }
    let title = title.split_whitespace().collect::<Vec<_>>().join(" ");
    (!title.is_empty()).then_some(title)
}
