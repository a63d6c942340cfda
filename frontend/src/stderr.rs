//! A spawned backend's standard error: passed through to the frontend's
//! own, with the last lines kept so that a device that dies can be
//! reported with the reason it gave (a confined backend's
//! `... sandbox: blocked system call NAME (NR)` line in particular).

use std::collections::VecDeque;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::sync::{Arc, Mutex, PoisonError};

/// Lines kept per backend.
const KEPT: usize = 16;
/// Longest line kept (longer ones are cut; all of it is passed through).
const LINE_MAX: usize = 1024;

/// The last lines a backend wrote on stderr.
#[derive(Debug, Default)]
pub struct StderrTail {
    lines: Mutex<VecDeque<String>>,
}

impl StderrTail {
    /// Starts a thread that copies `pipe` to this process's stderr line by
    /// line and keeps the last lines; it ends at EOF (when every process
    /// holding the pipe's write end has exited).
    pub fn follow(pipe: impl Read + Send + 'static, label: &str) -> io::Result<Arc<Self>> {
        let tail = Arc::new(StderrTail::default());
        let keep = tail.clone();
        std::thread::Builder::new()
            .name(format!("stderr {label}"))
            .spawn(move || keep.copy(pipe))?;
        Ok(tail)
    }

    fn copy(&self, pipe: impl Read) {
        let mut r = BufReader::new(pipe);
        let mut line = Vec::new();
        loop {
            line.clear();
            match r.read_until(b'\n', &mut line) {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
            let _ = io::stderr().lock().write_all(&line);
            self.push(&line);
        }
    }

    fn push(&self, line: &[u8]) {
        let cut = &line[..line.len().min(LINE_MAX)];
        let text = String::from_utf8_lossy(cut).trim_end().to_owned();
        let mut lines = self.lines.lock().unwrap_or_else(PoisonError::into_inner);
        if lines.len() == KEPT {
            lines.pop_front();
        }
        lines.push_back(text);
    }

    /// The backend's own account of why it ended: its last line naming a
    /// sandbox violation, else its last `error:` line.
    pub fn reason(&self) -> Option<String> {
        let lines = self.lines.lock().unwrap_or_else(PoisonError::into_inner);
        lines
            .iter()
            .rev()
            .find(|l| l.contains(": sandbox: "))
            .or_else(|| lines.iter().rev().find(|l| l.contains(": error: ")))
            .cloned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reason_when_sandbox_line_then_preferred_over_later_errors() {
        let t = StderrTail::default();
        t.push(b"x: warn: a\n");
        t.push(b"x: error: sandbox: blocked system call openat (257)\n");
        t.push(b"x: error: later\n");
        assert_eq!(
            t.reason().as_deref(),
            Some("x: error: sandbox: blocked system call openat (257)")
        );
    }

    #[test]
    fn reason_when_only_errors_then_last_one_and_old_lines_dropped() {
        let t = StderrTail::default();
        assert_eq!(t.reason(), None);
        for i in 0..40 {
            t.push(format!("x: error: {i}\n").as_bytes());
        }
        assert_eq!(t.reason().as_deref(), Some("x: error: 39"));
        assert_eq!(t.lines.lock().unwrap().len(), KEPT);
    }

    #[test]
    fn follow_when_pipe_closes_then_lines_kept() {
        let (r, mut w) = std::os::unix::net::UnixStream::pair().unwrap();
        let t = StderrTail::follow(r, "test").unwrap();
        w.write_all(b"p: error: gone\n").unwrap();
        drop(w);
        for _ in 0..500 {
            if t.reason().is_some() {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
        assert_eq!(t.reason().as_deref(), Some("p: error: gone"));
    }
}
