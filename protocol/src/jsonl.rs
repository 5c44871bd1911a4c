//! JSON Lines files shared between processes: appended one whole line per write, read back
//! keeping every complete record and skipping, with a warning, whatever a crash left behind.
//!
//! A crash mid-append leaves a torn tail: part of a line, possibly cut inside a multi-byte
//! character, possibly followed by whatever the disk held. [`Appender::open`] ends such a tail
//! with a newline before the next record, so a record never shares a line with debris; the
//! readers split on newline bytes (never on decoded text) and skip every line that is not a
//! whole record, so no kind of debris stops a reader or hides a record after it.

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::error::ProtocolError;

/// Whether an append returns before or after its data reached the disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// Written to the file; a power cut may still lose it.
    Written,
    /// Written and fsynced: an acknowledgement may rely on it.
    Synced,
}

/// A JSONL file open for appending.
#[derive(Debug)]
pub struct Appender {
    file: File,
    path: PathBuf,
}

impl Appender {
    /// Opens (or creates) `path` for appending. A torn last line (no final newline) is ended
    /// with one first, so the next record starts on a line of its own.
    pub fn open(path: &Path) -> Result<Self, ProtocolError> {
        let io = |e| ProtocolError::io(path, e);
        let mut file = OpenOptions::new().create(true).append(true).read(true).open(path).map_err(io)?;
        let len = file.metadata().map_err(io)?.len();
        if len > 0 {
            let mut last = [0u8; 1];
            file.seek(SeekFrom::Start(len - 1)).map_err(io)?;
            file.read_exact(&mut last).map_err(io)?;
            if last[0] != b'\n' {
                tracing::warn!(file = %path.display(), "the last line was torn (a crash mid-write); it is closed and will be skipped");
                file.write_all(b"\n").map_err(io)?;
            }
        }
        Ok(Self { file, path: path.to_owned() })
    }

    /// Appends `record` as one line in a single write; returns the bytes written.
    pub fn append<T: Serialize>(&mut self, record: &T, durability: Durability) -> Result<u64, ProtocolError> {
        let mut line = serde_json::to_vec(record).map_err(|e| ProtocolError::io(&self.path, e.into()))?;
        line.push(b'\n');
        self.file.write_all(&line).map_err(|e| ProtocolError::io(&self.path, e))?;
        if durability == Durability::Synced {
            self.sync()?;
        }
        Ok(line.len() as u64)
    }

    /// Waits until everything appended so far is on the disk.
    pub fn sync(&self) -> Result<(), ProtocolError> {
        self.file.sync_data().map_err(|e| ProtocolError::io(&self.path, e))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Calls `f` with every record of a JSONL file, in order, and returns how many lines were
/// skipped: torn, not UTF-8, not JSON, or JSON of another shape (each with a warning). Blank
/// lines are neither. A missing file has no records; only a failing disk is an error.
pub fn for_each<T: DeserializeOwned>(path: &Path, mut f: impl FnMut(T)) -> Result<usize, ProtocolError> {
    let file = match File::open(path) {
        Ok(file) => file,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(ProtocolError::io(path, e)),
    };
    let mut skipped = 0;
    for (n, line) in BufReader::new(file).split(b'\n').enumerate() {
        let line = line.map_err(|e| ProtocolError::io(path, e))?;
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        match serde_json::from_slice::<T>(&line) {
            Ok(record) => f(record),
            Err(e) => {
                skipped += 1;
                tracing::warn!(file = %path.display(), line = n + 1, error = %e, "skipping a line that is not a whole record");
            }
        }
    }
    Ok(skipped)
}

/// Like [`for_each`], for the whole lines from byte `offset` on, where another process may be
/// appending: a last line without its newline is left for the next call. Returns the offset
/// just past the last whole line, to pass next time.
pub fn for_each_from<T: DeserializeOwned>(
    path: &Path,
    offset: u64,
    mut f: impl FnMut(T),
) -> Result<u64, ProtocolError> {
    use std::io::{Read, Seek, SeekFrom};
    let mut file = match File::open(path) {
        Ok(file) => file,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(offset),
        Err(e) => return Err(ProtocolError::io(path, e)),
    };
    let mut bytes = Vec::new();
    file.seek(SeekFrom::Start(offset))
        .and_then(|_| file.read_to_end(&mut bytes))
        .map_err(|e| ProtocolError::io(path, e))?;
    let Some(end) = bytes.iter().rposition(|&b| b == b'\n') else {
        return Ok(offset);
    };
    for line in bytes[..end].split(|&b| b == b'\n') {
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        match serde_json::from_slice::<T>(line) {
            Ok(record) => f(record),
            Err(e) => tracing::warn!(file = %path.display(), error = %e, "skipping a line that is not a whole record"),
        }
    }
    Ok(offset + end as u64 + 1)
}

/// Every record of a JSONL file, and how many lines were skipped (see [`for_each`]).
#[derive(Debug, Clone, PartialEq)]
pub struct Records<T> {
    pub records: Vec<T>,
    pub skipped: usize,
}

/// Reads a whole JSONL file (see [`for_each`]).
pub fn read<T: DeserializeOwned>(path: &Path) -> Result<Records<T>, ProtocolError> {
    let mut records = Vec::new();
    let skipped = for_each(path, |r| records.push(r))?;
    Ok(Records { records, skipped })
}

/// Replaces a JSONL file with `records` (write, fsync, rename), so a crash leaves either the
/// old file or the new one.
pub fn replace<T: Serialize>(path: &Path, records: &[T]) -> Result<(), ProtocolError> {
    let tmp = path.with_extension("tmp");
    let mut body = Vec::new();
    for record in records {
        serde_json::to_writer(&mut body, record).map_err(|e| ProtocolError::io(path, e.into()))?;
        body.push(b'\n');
    }
    let written = File::create(&tmp).and_then(|mut f| {
        f.write_all(&body)?;
        f.sync_all()
    });
    written.and_then(|()| std::fs::rename(&tmp, path)).map_err(|e| ProtocolError::io(path, e))
}

#[cfg(test)]
mod tests {
    #[test]
    fn reading_from_an_offset_leaves_a_line_in_progress_for_later() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.jsonl");
        std::fs::write(&path, b"{\"a\":1}\n{\"a\":2}\n{\"a\":").unwrap();
        let mut seen = Vec::new();
        let at = super::for_each_from(&path, 0, |v: serde_json::Value| seen.push(v["a"].as_i64().unwrap())).unwrap();
        assert_eq!((seen.clone(), at), (vec![1, 2], 16));
        std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .map(|mut f| std::io::Write::write_all(&mut f, b"3}\n"))
            .unwrap()
            .unwrap();
        let at = super::for_each_from(&path, at, |v: serde_json::Value| seen.push(v["a"].as_i64().unwrap())).unwrap();
        assert_eq!((seen, at), (vec![1, 2, 3], 24));
    }

    use super::*;
    use rand::{Rng, SeedableRng};
    use serde::Deserialize;

    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
    struct Rec {
        id: u32,
        text: String,
    }

    fn rec(id: u32) -> Rec {
        Rec { id, text: format!("record {id}: é ✓ \"quoted\"") }
    }

    fn write(path: &Path, records: &[Rec]) {
        let mut out = Appender::open(path).unwrap();
        for r in records {
            out.append(r, Durability::Written).unwrap();
        }
    }

    fn append_raw(path: &Path, bytes: &[u8]) {
        OpenOptions::new().append(true).open(path).unwrap().write_all(bytes).unwrap();
    }

    #[test]
    fn torn_tails_of_random_bytes_lose_no_complete_record() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(19);
        for round in 0..300 {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("log.jsonl");
            let before: Vec<Rec> = (0..rng.random_range(0..5)).map(rec).collect();
            write(&path, &before);
            let tail: Vec<u8> = (0..rng.random_range(1..64)).map(|_| rng.random()).collect();
            append_raw(&path, &tail);
            let read_back = read::<Rec>(&path).unwrap();
            assert_eq!(read_back.records, before, "round {round}, tail {tail:?}");
            // The next writer starts on a fresh line, so its record survives the debris.
            write(&path, &[rec(100)]);
            let mut after = before.clone();
            after.push(rec(100));
            assert_eq!(read::<Rec>(&path).unwrap().records, after, "round {round}, tail {tail:?}");
        }
    }

    #[test]
    fn invalid_utf8_partial_json_and_foreign_lines_are_skipped_wherever_they_are() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log.jsonl");
        write(&path, &[rec(1)]);
        // A multi-byte character cut in half, then a restart that appends more.
        let whole = serde_json::to_vec(&rec(2)).unwrap();
        let cut = whole.iter().position(|&b| b >= 0x80).unwrap() + 1;
        append_raw(&path, &whole[..cut]);
        write(&path, &[rec(3)]);
        append_raw(&path, b"{\"id\": 4, \"te\n\xff\xfe\x00garbage\n[1, 2]\n\n   \n{\"id\": 5}\n");
        write(&path, &[rec(6)]);
        append_raw(&path, b"{\"id\": 7, \"text\": \"no newline yet\"}");
        let read_back = read::<Rec>(&path).unwrap();
        let ids: Vec<u32> = read_back.records.iter().map(|r| r.id).collect();
        assert_eq!(ids, [1, 3, 6, 7], "a whole record without its newline still counts");
        assert_eq!(read_back.skipped, 5, "the cut line, the partial line, garbage, an array, a foreign object");
    }

    #[test]
    fn a_missing_file_is_empty_and_replace_rewrites_whole_lines() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("spool.jsonl");
        assert_eq!(read::<Rec>(&path).unwrap(), Records { records: vec![], skipped: 0 });
        write(&path, &[rec(1), rec(2)]);
        append_raw(&path, b"{\"id\"");
        replace(&path, &[rec(2)]).unwrap();
        assert_eq!(read::<Rec>(&path).unwrap(), Records { records: vec![rec(2)], skipped: 0 });
        replace::<Rec>(&path, &[]).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"");
    }

    #[test]
    fn synced_appends_report_their_size() {
        let dir = tempfile::tempdir().unwrap();
        let mut out = Appender::open(&dir.path().join("f.jsonl")).unwrap();
        let n = out.append(&rec(1), Durability::Synced).unwrap();
        assert_eq!(n, serde_json::to_vec(&rec(1)).unwrap().len() as u64 + 1);
        assert_eq!(std::fs::metadata(out.path()).unwrap().len(), n);
    }
}
