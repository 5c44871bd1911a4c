//! Every format from bytes made here, and hostile input that must be an error, not a panic.

use std::io::{Cursor, Write};

use rand::{Rng, SeedableRng};

use super::*;

fn unreadable_format(result: Result<Extracted, KnowledgeError>) -> &'static str {
    match result {
        Err(KnowledgeError::Unreadable { format, .. }) => format,
        other => panic!("expected Unreadable, got {other:?}"),
    }
}

#[test]
fn format_is_detected_from_the_extension_then_the_content_type() {
    assert_eq!(Format::detect(Some("Notes.MD"), Some("text/plain")), Some(Format::Markdown));
    assert_eq!(Format::detect(Some("a.b.docx"), None), Some(Format::Docx));
    assert_eq!(Format::detect(Some("page.htm"), None), Some(Format::Html));
    assert_eq!(Format::detect(Some("readme"), Some("text/plain; charset=utf-8")), Some(Format::Text));
    assert_eq!(Format::detect(Some("x.bin"), Some("application/PDF")), Some(Format::Pdf));
    assert_eq!(Format::detect(None, Some("text/markdown")), Some(Format::Markdown));
    assert_eq!(Format::detect(Some("x.bin"), Some("application/octet-stream")), None);
    assert_eq!(Format::detect(None, None), None);
    assert_eq!(serde_json::to_string(&Format::Docx).unwrap(), "\"docx\"");
    assert_eq!(Format::Html.as_str(), "html");
}

#[test]
fn text_is_utf8_without_its_bom() {
    let got = extract(Format::Text, "\u{feff}Grüße, 世界 🙂".as_bytes()).unwrap();
    assert_eq!(got, Extracted { text: "Grüße, 世界 🙂".to_owned(), title: None });
    assert_eq!(unreadable_format(extract(Format::Text, b"caf\xe9")), "text");
    assert_eq!(unreadable_format(extract(Format::Text, b" \n\t ")), "text");
    assert_eq!(unreadable_format(extract(Format::Markdown, b"\xff\xfe#")), "markdown");
}

#[test]
fn markdown_keeps_heading_lines_and_drops_link_and_emphasis_syntax() {
    let source = "Intro with a [link](https://example.com) and **bold** text.\n\n\
                  Guide\n=====\n\n## Install *now*\n\n- one\n- two\n\n```sh\n# not a heading\nmake\n```\n";
    let got = extract(Format::Markdown, source.as_bytes()).unwrap();
    assert_eq!(got.title.as_deref(), Some("Guide"));
    assert_eq!(
        got.text,
        "Intro with a link and bold text.\n\n# Guide\n\n## Install now\n\n- one\n- two\n\n    # not a heading\n    make"
    );
    let headings: Vec<_> = crate::chunk::chunk(&got.text, &Default::default()).into_iter().map(|c| c.heading).collect();
    assert_eq!(headings, [None, Some("Install now".to_owned())]);
}

#[test]
fn html_becomes_text_with_heading_lines_and_a_title() {
    let html = "<!doctype html><html><head><title>The  &amp; Manual</title><style>p{}</style></head><body>\
                <h1>Welcome</h1><p>Read the <a href=\"/x\">first part</a> &mdash; <em>carefully</em>.</p>\
                <h2>Setup</h2><ul><li>Plug in</li><li>Switch on</li></ul></body></html>";
    let got = extract(Format::Html, html.as_bytes()).unwrap();
    assert_eq!(got.title.as_deref(), Some("The & Manual"));
    assert_eq!(got.text, "# Welcome\n\nRead the first part — carefully.\n\n## Setup\n- Plug in\n- Switch on");
    let untitled = extract(Format::Html, b"<body><h1 class=x>Big <b>News</b></h1><p>Body.</p>").unwrap();
    assert_eq!(untitled.title.as_deref(), Some("Big News"));
    assert_eq!(unreadable_format(extract(Format::Html, b"<html><body> </body></html>")), "html");
}

#[test]
fn absurdly_nested_html_is_refused_quickly() {
    let deep = "<div>".repeat(50_000) + "text" + &"</div>".repeat(50_000);
    let started = std::time::Instant::now();
    let Err(KnowledgeError::Unreadable { detail, .. }) = extract(Format::Html, deep.as_bytes()) else {
        panic!("a 50,000-deep document was parsed");
    };
    assert!(detail.contains("nest"), "{detail}");
    assert!(started.elapsed().as_secs() < 5, "refusing took {:?}", started.elapsed());
    // Long flat documents, unclosed paragraphs and scripts full of `<` are not deep.
    let flat = "<p>para <b>bold</b> <img src=x> <br/> text\n".repeat(20_000)
        + "<script>for (i = 0; i<n; i++) { a<b; }</script>"
        + &"<div>x</div>".repeat(10_000);
    assert_eq!(nesting_depth(&flat), 1);
    assert!(extract(Format::Html, flat.as_bytes()).is_ok());
    assert_eq!(nesting_depth("<div><section><!-- <div> --><span>x</span></section>"), 3);
}

/// A one-page PDF with two lines in Helvetica, xref offsets computed as it is written.
fn pdf(lines: &[&str]) -> Vec<u8> {
    let mut content = String::from("BT /F1 18 Tf 72 720 Td\n");
    for line in lines {
        content.push_str(&format!("({line}) Tj 0 -28 Td\n"));
    }
    content.push_str("ET");
    let objects = [
        "<< /Type /Catalog /Pages 2 0 R >>".to_owned(),
        "<< /Type /Pages /Kids [3 0 R] /Count 1 >>".to_owned(),
        "<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents 4 0 R \
         /Resources << /Font << /F1 5 0 R >> >> >>"
            .to_owned(),
        format!("<< /Length {} >>\nstream\n{content}\nendstream", content.len()),
        "<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica /Encoding /WinAnsiEncoding >>".to_owned(),
    ];
    let mut out = b"%PDF-1.4\n".to_vec();
    let mut offsets = Vec::new();
    for (i, body) in objects.iter().enumerate() {
        offsets.push(out.len());
        out.extend_from_slice(format!("{} 0 obj\n{body}\nendobj\n", i + 1).as_bytes());
    }
    let xref = out.len();
    out.extend_from_slice(format!("xref\n0 {}\n0000000000 65535 f \n", objects.len() + 1).as_bytes());
    for offset in offsets {
        out.extend_from_slice(format!("{offset:010} 00000 n \n").as_bytes());
    }
    let trailer = format!("trailer\n<< /Size {} /Root 1 0 R >>\nstartxref\n{xref}\n%%EOF\n", objects.len() + 1);
    out.extend_from_slice(trailer.as_bytes());
    out
}

#[test]
fn pdf_text_comes_back() {
    let got = extract(Format::Pdf, &pdf(&["Hello knowledge base", "Second line here"])).unwrap();
    let words: Vec<&str> = got.text.split_whitespace().collect();
    assert_eq!(words, ["Hello", "knowledge", "base", "Second", "line", "here"], "{:?}", got.text);
    assert_eq!(got.title, None);
}

#[test]
fn hostile_pdfs_are_unreadable_not_a_panic() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(11);
    for _ in 0..20 {
        let noise: Vec<u8> = (0..rng.random_range(0..2000)).map(|_| rng.random()).collect();
        assert_eq!(unreadable_format(extract(Format::Pdf, &noise)), "pdf");
    }
    let good = pdf(&["Some words"]);
    assert_eq!(unreadable_format(extract(Format::Pdf, &good[..good.len() / 2])), "pdf");
    // Damaged copies of a real file either still read or are Unreadable; nothing else.
    for _ in 0..40 {
        let mut bad = good.clone();
        for _ in 0..rng.random_range(1..8) {
            let at = rng.random_range(0..bad.len());
            bad[at] = rng.random();
        }
        match extract(Format::Pdf, &bad) {
            Ok(_) | Err(KnowledgeError::Unreadable { format: "pdf", .. }) => {}
            Err(e) => panic!("unexpected error {e:?}"),
        }
    }
}

const DOCUMENT_XML: &str = r#"<?xml version="1.0" encoding="UTF-8" standalone="yes"?>
<w:document xmlns:w="http://schemas.openxmlformats.org/wordprocessingml/2006/main"><w:body>
<w:p><w:pPr><w:pStyle w:val="Heading1"/></w:pPr><w:r><w:t>Safety</w:t></w:r>
<w:r><w:t xml:space="preserve"> rules</w:t></w:r></w:p>
<w:p><w:r><w:t xml:space="preserve">Wear gloves &amp; goggles. </w:t></w:r><w:r><w:t>Always&#x21;</w:t></w:r></w:p>
<w:p/>
<w:p><w:r><w:t>Col</w:t><w:tab/><w:t>umn</w:t><w:br/><w:t>Next line</w:t></w:r></w:p>
</w:body></w:document>"#;

fn docx(parts: &[(&str, &[u8])]) -> Vec<u8> {
    let mut zip = zip::ZipWriter::new(Cursor::new(Vec::new()));
    let options =
        zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Deflated).large_file(true);
    for (name, body) in parts {
        zip.start_file(*name, options).unwrap();
        zip.write_all(body).unwrap();
    }
    zip.finish().unwrap().into_inner()
}

#[test]
fn docx_paragraphs_become_lines_with_heading_styles_as_headings() {
    let got = extract(Format::Docx, &docx(&[("word/document.xml", DOCUMENT_XML.as_bytes())])).unwrap();
    assert_eq!(got.text, "# Safety rules\n\nWear gloves & goggles. Always!\n\nCol\tumn\nNext line");
    assert_eq!(got.title.as_deref(), Some("Safety rules"));
    let core = concat!(
        r#"<?xml version="1.0"?><cp:coreProperties "#,
        r#"xmlns:cp="http://schemas.openxmlformats.org/package/2006/metadata/core-properties" "#,
        r#"xmlns:dc="http://purl.org/dc/elements/1.1/">"#,
        r#"<dc:title>Lab  Handbook &lt;v2&gt;</dc:title></cp:coreProperties>"#
    );
    let got = extract(
        Format::Docx,
        &docx(&[("word/document.xml", DOCUMENT_XML.as_bytes()), ("docProps/core.xml", core.as_bytes())]),
    )
    .unwrap();
    assert_eq!(got.title.as_deref(), Some("Lab Handbook <v2>"));
}

#[test]
fn hostile_docx_files_are_unreadable_not_a_panic() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(5);
    for _ in 0..20 {
        let noise: Vec<u8> = (0..rng.random_range(0..2000)).map(|_| rng.random()).collect();
        assert_eq!(unreadable_format(extract(Format::Docx, &noise)), "docx");
    }
    // A zip without the document part, and one whose XML is broken.
    assert_eq!(unreadable_format(extract(Format::Docx, &docx(&[("other.xml", b"<a/>".as_slice())]))), "docx");
    assert_eq!(
        unreadable_format(extract(Format::Docx, &docx(&[("word/document.xml", b"<w:p><w:t>x</w:p>".as_slice())]))),
        "docx"
    );
    // Damaged copies of a real file either still read or are Unreadable.
    let good = docx(&[("word/document.xml", DOCUMENT_XML.as_bytes())]);
    for _ in 0..40 {
        let mut bad = good.clone();
        for _ in 0..rng.random_range(1..8) {
            let at = rng.random_range(0..bad.len());
            bad[at] = rng.random();
        }
        match extract(Format::Docx, &bad) {
            Ok(_) | Err(KnowledgeError::Unreadable { format: "docx", .. }) => {}
            Err(e) => panic!("unexpected error {e:?}"),
        }
    }
}

#[test]
fn a_docx_zip_bomb_stops_at_the_cap() {
    // Spaces compress about a thousandfold: a small upload that would inflate past the cap.
    let body = vec![b' '; MAX_DECOMPRESSED as usize + 1];
    let bomb = docx(&[("word/document.xml", &body)]);
    assert!(bomb.len() < 1 << 20, "the bomb is {} bytes", bomb.len());
    let Err(KnowledgeError::Unreadable { detail, .. }) = extract(Format::Docx, &bomb) else {
        panic!("a zip bomb was read");
    };
    assert!(detail.contains("more than"), "{detail}");
}
