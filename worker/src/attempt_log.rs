//! Log capture: an attempt's full log on disk (size-capped) and its tail in memory.

use std::collections::VecDeque;
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::redact::{Redactor, StreamRedactor};

/// Written to the log file, once, where writing stopped because the log reached its size cap.
pub const LOG_TRUNCATED_MARKER: &str = "\n[log truncated]\n";

/// The last `capacity_bytes` bytes written to it.
#[derive(Clone, Debug)]
pub struct TailBuffer {
    bytes: VecDeque<u8>,
    capacity_bytes: usize,
}

impl TailBuffer {
    /// An empty buffer that keeps at most `capacity_bytes` bytes.
    pub fn new(capacity_bytes: usize) -> Self {
        TailBuffer {
            bytes: VecDeque::new(),
            capacity_bytes,
        }
    }

    /// Appends `bytes`, dropping the oldest bytes beyond the capacity.
    pub fn push(&mut self, bytes: &[u8]) {
        if self.capacity_bytes == 0 {
            return;
        }
        if bytes.len() >= self.capacity_bytes {
            self.bytes.clear();
            self.bytes
                .extend(&bytes[bytes.len() - self.capacity_bytes..]);
            return;
        }
        let overflow = (self.bytes.len() + bytes.len()).saturating_sub(self.capacity_bytes);
        self.bytes.drain(..overflow);
        self.bytes.extend(bytes);
    }

    /// The kept bytes as text: invalid UTF-8 is replaced (U+FFFD), a character cut at the start
    /// is dropped, and the result is at most `capacity_bytes` bytes long.
    pub fn to_text(&self) -> String {
        let (first, second) = self.bytes.as_slices();
        let mut bytes = Vec::with_capacity(self.bytes.len());
        bytes.extend_from_slice(first);
        bytes.extend_from_slice(second);
        // Skip UTF-8 continuation bytes of a character whose start fell out of the buffer.
        let start = bytes
            .iter()
            .take(3)
            .take_while(|byte| (0x80..0xC0).contains(*byte))
            .count();
        let text = String::from_utf8_lossy(&bytes[start..]).into_owned();
        keep_last_bytes(text, self.capacity_bytes)
    }

    /// Whether nothing was kept.
    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }
}

/// `text` cut from the front to at most `max_bytes` bytes, at a character boundary.
fn keep_last_bytes(text: String, max_bytes: usize) -> String {
    if text.len() <= max_bytes {
        return text;
    }
    let mut cut = text.len() - max_bytes;
    while !text.is_char_boundary(cut) {
        cut += 1;
    }
    text[cut..].to_owned()
}

/// One attempt's log: everything its commands print (and the worker's own notes, prefixed
/// `[flotilla]`), written to a file until `max_bytes`, and a tail of `tail_bytes` kept in memory
/// (the tail keeps following the output after the file is full).
///
/// Writing never fails: an I/O error on the file is reported once with `tracing::warn!` and the
/// file is then left alone; the tail is still kept.
#[derive(Debug)]
pub struct AttemptLog {
    file: Option<File>,
    path: Option<PathBuf>,
    written_bytes: u64,
    max_bytes: u64,
    truncated: bool,
    tail: TailBuffer,
    /// Removes secret values before anything is written (file and tail).
    redactor: Option<StreamRedactor>,
}

impl Drop for AttemptLog {
    fn drop(&mut self) {
        self.finish();
    }
}

impl AttemptLog {
    /// Creates (or truncates) the log file at `path`, creating its parent directories.
    ///
    /// Errors: the directory or file cannot be created.
    pub fn create(path: &Path, max_bytes: u64, tail_bytes: usize) -> std::io::Result<Self> {
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)?;
        }
        let file = File::create(path)?;
        Ok(AttemptLog {
            file: Some(file),
            path: Some(path.to_path_buf()),
            written_bytes: 0,
            max_bytes,
            truncated: false,
            tail: TailBuffer::new(tail_bytes),
            redactor: None,
        })
    }

    /// A log without a file: only the tail of `tail_bytes` is kept.
    pub fn discard(tail_bytes: usize) -> Self {
        AttemptLog {
            file: None,
            path: None,
            written_bytes: 0,
            max_bytes: 0,
            truncated: false,
            tail: TailBuffer::new(tail_bytes),
            redactor: None,
        }
    }

    /// Redacts `redactor`'s secrets from everything written from now on (file and tail). A
    /// value cut across two writes is still caught: the last bytes wait for the next write or
    /// for [`AttemptLog::finish`].
    pub fn set_redactor(&mut self, redactor: &Redactor) {
        self.finish();
        self.redactor = (!redactor.is_empty()).then(|| redactor.stream());
    }

    /// Writes the bytes a redactor still holds back. Called on drop too.
    pub fn finish(&mut self) {
        if let Some(mut redactor) = self.redactor.take() {
            let rest = redactor.finish();
            self.write_redacted(&rest);
            self.redactor = Some(redactor);
        }
    }

    /// Appends output bytes (redacted when a redactor is set).
    pub fn write(&mut self, bytes: &[u8]) {
        match self.redactor.as_mut() {
            None => self.write_redacted(bytes),
            Some(redactor) => {
                let output = redactor.push(bytes);
                self.write_redacted(&output);
            }
        }
    }

    fn write_redacted(&mut self, bytes: &[u8]) {
        if bytes.is_empty() {
            return;
        }
        self.tail.push(bytes);
        let Some(file) = self.file.as_mut() else {
            return;
        };
        if self.truncated {
            return;
        }
        let room = self.max_bytes.saturating_sub(self.written_bytes);
        let fits = usize::try_from(room).unwrap_or(usize::MAX).min(bytes.len());
        let mut result = file.write_all(&bytes[..fits]);
        self.written_bytes += fits as u64;
        if fits < bytes.len() {
            self.truncated = true;
            result = result.and_then(|()| file.write_all(LOG_TRUNCATED_MARKER.as_bytes()));
        }
        if let Err(error) = result {
            tracing::warn!(path = ?self.path, %error, "cannot write the attempt log; keeping only its tail");
            self.file = None;
        }
    }

    /// Appends a line `[flotilla] <message>` (the worker's own notes: phases, exit statuses,
    /// errors).
    pub fn note(&mut self, message: &str) {
        self.write(format!("[flotilla] {message}\n").as_bytes());
    }

    /// The log's tail as text (see [`TailBuffer::to_text`]), including, redacted, the bytes a
    /// redactor still holds back.
    pub fn tail(&self) -> String {
        match &self.redactor {
            None => self.tail.to_text(),
            Some(redactor) => {
                let mut tail = self.tail.clone();
                tail.push(&redactor.peek_rest());
                tail.to_text()
            }
        }
    }

    /// The log file's path, `None` for [`AttemptLog::discard`].
    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    /// Bytes written to the file (the truncation marker not counted).
    pub fn written_bytes(&self) -> u64 {
        self.written_bytes
    }

    /// Whether writing stopped at the size cap.
    pub fn truncated(&self) -> bool {
        self.truncated
    }

    /// Tail capacity in bytes, for tails of single commands.
    pub fn tail_capacity_bytes(&self) -> usize {
        self.tail.capacity_bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tail_keeps_last_bytes() {
        let mut tail = TailBuffer::new(5);
        tail.push(b"abc");
        tail.push(b"defg");
        assert_eq!(tail.to_text(), "cdefg");
        tail.push(b"0123456789");
        assert_eq!(tail.to_text(), "56789");
    }

    #[test]
    fn tail_drops_a_cut_character() {
        let mut tail = TailBuffer::new(4);
        tail.push("xé€".as_bytes()); // x, é (2 bytes), € (3 bytes)
        // Last 4 bytes: second byte of é, then €.
        assert_eq!(tail.to_text(), "€");
    }

    #[test]
    fn secrets_are_redacted_from_the_file_and_the_tail_across_writes() {
        let directory = tempfile::tempdir().unwrap();
        let path = directory.path().join("logs/a.log");
        let mut log = AttemptLog::create(&path, 1 << 20, 1 << 10).unwrap();
        log.set_redactor(&Redactor::new([("token", "value-of-the-secret")]));
        log.write(b"one value-of-");
        log.write(b"the-secret two value-of-the");
        assert_eq!(log.tail(), "one [redacted:token] two value-of-the");
        log.write(b"-secret");
        log.note("done");
        drop(log);
        let contents = std::fs::read_to_string(&path).unwrap();
        assert_eq!(
            contents,
            "one [redacted:token] two [redacted:token][flotilla] done\n"
        );
    }

    #[test]
    fn log_file_is_capped_with_a_marker() {
        let directory = tempfile::tempdir().unwrap();
        let path = directory.path().join("logs/a.log");
        let mut log = AttemptLog::create(&path, 10, 4).unwrap();
        log.write(b"0123456");
        log.write(b"789abc");
        log.write(b"def");
        assert!(log.truncated());
        assert_eq!(log.written_bytes(), 10);
        assert_eq!(log.tail(), "cdef");
        let contents = std::fs::read_to_string(&path).unwrap();
        assert_eq!(contents, format!("0123456789{LOG_TRUNCATED_MARKER}"));
    }
}
