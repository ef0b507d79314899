//! Instance logs across the cloud. An instance writes its output to a file on its own node;
//! `nubo logs` on any node asks each node that runs the service for the part it wants (the
//! last lines, what came since a time, or what follows an offset it already has), through a
//! message between agents, and streams the answers as they come.
//!
//! A node reads at most [`PIECE_BYTES_MAX`] of each instance and [`REPLY_BYTES_MAX`] in all
//! per request, and serves a few requests at a time; the asker continues from where the
//! answer ended. When output arrived is told by checkpoints (a time and the file's size)
//! the runner takes every couple of seconds, so `--since` is as fine as they are.

use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Most bytes of one instance's log in one answer.
pub const PIECE_BYTES_MAX: usize = 64 * 1024;
/// Most bytes of log in one answer.
pub const REPLY_BYTES_MAX: usize = 512 * 1024;
/// Most lines `--tail` asks for.
pub const TAIL_LINES_MAX: u32 = 100_000;
/// Most bytes read backwards to find the start of the last lines.
const TAIL_SCAN_BYTES_MAX: u64 = 4 << 20;
/// Most checkpoints kept per instance (older ones thin out).
pub const CHECKPOINTS_MAX: usize = 128;

/// A message between agents.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum AgentMessage {
    /// Asks for the log of a service's instances on the receiving node.
    LogRequest(LogRequest),
    /// The answer.
    LogReply(LogReply),
}

impl AgentMessage {
    /// Encodes it.
    pub fn encode(&self) -> bytes::Bytes {
        postcard::to_allocvec(self).unwrap_or_default().into()
    }

    /// Decodes bytes from a peer, `None` if they are not a message.
    pub fn decode(bytes: &[u8]) -> Option<AgentMessage> {
        postcard::from_bytes(bytes).ok()
    }
}

/// Which part of a log.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum LogFrom {
    /// The last lines of each instance.
    Tail {
        /// How many.
        lines: u32,
    },
    /// What reached the file since a time.
    Since {
        /// Milliseconds since the Unix epoch.
        unix_ms: u64,
    },
    /// What follows the given offset of each version's instance (0 for one not listed).
    Offsets(Vec<(u64, u64)>),
}

/// A request for a service's logs on one node.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogRequest {
    /// Matches the answer to the request.
    pub id: u64,
    /// The service.
    pub service: String,
    /// Which part.
    pub from: LogFrom,
}

/// Part of one instance's log.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogPiece {
    /// The instance's version.
    pub version: u64,
    /// Where the bytes start in the file.
    pub start: u64,
    /// The file's size when read (more follows if it exceeds `start + data.len()`).
    pub size: u64,
    /// The bytes.
    pub data: Vec<u8>,
}

impl LogPiece {
    /// Where the next request should continue.
    pub fn end(&self) -> u64 {
        self.start + self.data.len() as u64
    }
}

/// The answer to a [`LogRequest`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogReply {
    /// The request's id.
    pub id: u64,
    /// One piece per instance of the service on the node.
    pub pieces: Vec<LogPiece>,
}

/// One instance's log file on this node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LogFile {
    /// The service.
    pub key: String,
    /// The instance's version.
    pub version: u64,
    /// The file.
    pub path: PathBuf,
    /// (Unix milliseconds, file size) taken now and then, oldest first.
    pub checkpoints: Vec<(u64, u64)>,
}

/// Adds a checkpoint, thinning the oldest half when there are too many (so the past is
/// covered ever more coarsely, never forgotten at once).
pub fn add_checkpoint(checkpoints: &mut Vec<(u64, u64)>, unix_ms: u64, size: u64) {
    if checkpoints.last().is_some_and(|(_, s)| *s == size) {
        return;
    }
    if checkpoints.last().is_some_and(|(_, s)| *s > size) {
        // The file was rotated: offsets start again.
        checkpoints.clear();
    }
    if checkpoints.len() >= CHECKPOINTS_MAX {
        let half = CHECKPOINTS_MAX / 2;
        let mut index = 0;
        checkpoints.retain(|_| {
            index += 1;
            // The very first checkpoint (index 1) always stays.
            index > half || index % 2 == 1
        });
    }
    checkpoints.push((unix_ms, size));
}

/// Reads what `request` asks of the files of its service. Blocking: run it off the actor.
pub fn read(files: &[LogFile], request: &LogRequest) -> LogReply {
    let mut budget = REPLY_BYTES_MAX;
    let mut pieces = Vec::new();
    for file in files.iter().filter(|f| f.key == request.service) {
        let start = |size: u64| match &request.from {
            LogFrom::Tail { lines } => tail_start(&file.path, size, (*lines).min(TAIL_LINES_MAX)),
            LogFrom::Since { unix_ms } => file
                .checkpoints
                .iter()
                .rev()
                .find(|(at, _)| at <= unix_ms)
                .map_or(0, |(_, offset)| *offset),
            LogFrom::Offsets(offsets) => offsets
                .iter()
                .find(|(v, _)| *v == file.version)
                .map_or(0, |(_, offset)| *offset),
        };
        let piece = read_piece(&file.path, file.version, start, PIECE_BYTES_MAX.min(budget));
        budget -= piece.data.len();
        pieces.push(piece);
    }
    LogReply {
        id: request.id,
        pieces,
    }
}

fn read_piece(path: &Path, version: u64, start: impl Fn(u64) -> u64, max: usize) -> LogPiece {
    let empty = |size| LogPiece {
        version,
        start: 0,
        size,
        data: Vec::new(),
    };
    let Ok(mut file) = std::fs::File::open(path) else {
        return empty(0);
    };
    let size = file.metadata().map_or(0, |m| m.len());
    let mut from = start(size);
    if from > size {
        // Rotated since the asker's last look: start again from the top.
        from = 0;
    }
    let mut data = Vec::new();
    if file.seek(SeekFrom::Start(from)).is_err()
        || file.take(max as u64).read_to_end(&mut data).is_err()
    {
        return empty(size);
    }
    LogPiece {
        version,
        start: from,
        size,
        data,
    }
}

/// The offset where the last `lines` lines of the file begin.
fn tail_start(path: &Path, size: u64, lines: u32) -> u64 {
    let Ok(mut file) = std::fs::File::open(path) else {
        return 0;
    };
    let scan = size.min(TAIL_SCAN_BYTES_MAX);
    let mut bytes = Vec::new();
    if file.seek(SeekFrom::Start(size - scan)).is_err()
        || file.take(scan).read_to_end(&mut bytes).is_err()
    {
        return 0;
    }
    // A last line without its newline counts as a line.
    let body = bytes.strip_suffix(b"\n").unwrap_or(&bytes);
    let mut found = 0;
    for (i, byte) in body.iter().enumerate().rev() {
        if *byte == b'\n' {
            found += 1;
            if found == lines {
                return size - scan + i as u64 + 1;
            }
        }
    }
    size - scan
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(dir: &Path, text: &str) -> LogFile {
        let path = dir.join("output.log");
        std::fs::write(&path, text).unwrap();
        LogFile {
            key: "web/site".into(),
            version: 2,
            path,
            checkpoints: vec![(1_000, 0), (2_000, 6), (3_000, 12)],
        }
    }

    fn ask(files: &[LogFile], from: LogFrom) -> Vec<LogPiece> {
        read(
            files,
            &LogRequest {
                id: 7,
                service: "web/site".into(),
                from,
            },
        )
        .pieces
    }

    #[test]
    fn tails_times_and_offsets_select_the_right_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let files = [file(dir.path(), "one\ntwo\nthree\nfour\n")];
        let tail = ask(&files, LogFrom::Tail { lines: 2 });
        assert_eq!(tail[0].data, b"three\nfour\n");
        assert_eq!(ask(&files, LogFrom::Tail { lines: 9 })[0].data.len(), 19);
        let since = ask(&files, LogFrom::Since { unix_ms: 2_500 });
        assert_eq!(
            (since[0].start, since[0].data.as_slice()),
            (6, &b"o\nthree\nfour\n"[..])
        );
        let next = ask(&files, LogFrom::Offsets(vec![(2, 14)]));
        assert_eq!(next[0].data, b"four\n");
        assert_eq!(next[0].end(), 19);
        // Past the end (the file was rotated): from the top again.
        assert_eq!(ask(&files, LogFrom::Offsets(vec![(2, 500)]))[0].start, 0);
        // Another service's request reads nothing of this one.
        let other = read(
            &files,
            &LogRequest {
                id: 1,
                service: "web/other".into(),
                from: LogFrom::Tail { lines: 1 },
            },
        );
        assert!(other.pieces.is_empty());
    }

    #[test]
    fn checkpoints_thin_out_and_restart_after_a_rotation() {
        let mut points = Vec::new();
        for i in 0..1_000u64 {
            add_checkpoint(&mut points, i, i + 1);
        }
        assert!(points.len() <= CHECKPOINTS_MAX);
        assert_eq!(points.last(), Some(&(999, 1_000)));
        assert!(
            points[0].0 < 100,
            "the distant past is still covered: {:?}",
            points[0]
        );
        add_checkpoint(&mut points, 1_000, 1_000);
        assert_eq!(
            points.last(),
            Some(&(999, 1_000)),
            "no change, no checkpoint"
        );
        add_checkpoint(&mut points, 1_001, 5);
        assert_eq!(points, vec![(1_001, 5)]);
        let message = AgentMessage::LogRequest(LogRequest {
            id: 1,
            service: "x/y".into(),
            from: LogFrom::Offsets(vec![(1, 2)]),
        });
        assert_eq!(AgentMessage::decode(&message.encode()), Some(message));
        assert_eq!(AgentMessage::decode(b"\xff\xff"), None);
    }
}
