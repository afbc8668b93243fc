//! The decision log (`passthrough run --decision-log [DIR]`): what the agent observed, on disk,
//! bounded, kept across restarts, for `passthrough suggest`.
//!
//! The recorder is one more subscriber of the [`Monitor`] (so while it
//! runs the programs report allowed egress decisions, as for a watcher). It writes JSON lines
//! ([`DecisionRecord`], [`LostRecord`]: the format of `monitor --json`) into segments
//! `DIR/decisions-<n>.jsonl`:
//!
//! - **Bounded.** A segment is closed at `max_bytes / SEGMENTS`; the oldest segments are
//!   deleted while the directory holds more than `max_bytes`. Within a segment each distinct
//!   decision (workload, path, verdict, reason, destination, protocol, SNI/Host) is written
//!   once: a busy connection pattern costs one line per segment, not one per connection, so
//!   the log covers a long time at a small size, and a destination still in use is written
//!   again in every new segment (it survives the deletion of old ones).
//! - **Across restarts.** A new agent continues with the next segment number; a segment cut
//!   short by a crash ends in a partial line, which readers skip.
//! - **Losses are written down.** Decisions lost before they reached the recorder (kernel ring
//!   full, the recorder behind) become `lost` lines, and `suggest` warns about them.

use std::{
    collections::HashSet,
    hash::BuildHasher as _,
    io::{self, Write as _},
    path::{Path, PathBuf},
    sync::Arc,
};

use passthrough_policy::decision_log::{DecisionRecord, LostRecord, segment_name, segments};
use tracing::{info, warn};

use crate::monitor::{Item, Monitor, Subscription};

/// Segments the log is divided into: the oldest is deleted when the log is full, so at least
/// `(SEGMENTS - 1) / SEGMENTS` of `max_bytes` always holds recent decisions.
pub const SEGMENTS: u64 = 8;
/// Default bound of the log directory.
pub const DEFAULT_MAX_BYTES: u64 = 64 << 20;

/// The log's writer state (no async: driven by the task [`start`] spawns, testable alone).
pub struct Recorder {
    dir: PathBuf,
    max_bytes: u64,
    segment_bytes: u64,
    seq: u64,
    file: Option<io::BufWriter<std::fs::File>>,
    written: u64,
    seen: HashSet<u64>,
    hasher: std::hash::RandomState,
}

impl Recorder {
    /// Opens `dir` (created if missing) and starts the segment after the last one there.
    pub fn open(dir: &Path, max_bytes: u64) -> io::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let seq = segments(dir)?.last().map_or(0, |(n, _)| n + 1);
        let max_bytes = max_bytes.max(SEGMENTS * 4096);
        Ok(Self {
            dir: dir.to_path_buf(),
            max_bytes,
            segment_bytes: max_bytes / SEGMENTS,
            seq,
            file: None,
            written: 0,
            seen: HashSet::new(),
            hasher: std::hash::RandomState::new(),
        })
    }

    /// The segment being written.
    pub fn current(&self) -> PathBuf {
        self.dir.join(segment_name(self.seq))
    }

    fn key(&self, r: &DecisionRecord) -> u64 {
        self.hasher.hash_one((
            &r.workload,
            &r.path,
            &r.verdict,
            &r.reason,
            r.dst,
            &r.protocol,
            &r.sni,
            &r.host,
        ))
    }

    /// Appends `r` unless the current segment already has the same decision.
    pub fn record(&mut self, r: &DecisionRecord) -> io::Result<()> {
        if !self.seen.insert(self.key(r)) {
            return Ok(());
        }
        let line = serde_json::to_vec(r)?;
        self.append(line)
    }

    /// Appends a loss report.
    pub fn lost(&mut self, l: &LostRecord) -> io::Result<()> {
        let line = serde_json::to_vec(l)?;
        self.append(line)
    }

    fn append(&mut self, mut line: Vec<u8>) -> io::Result<()> {
        line.push(b'\n');
        if self.file.is_none() {
            let f = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(self.current())?;
            self.file = Some(io::BufWriter::new(f));
        }
        if let Some(f) = self.file.as_mut() {
            f.write_all(&line)?;
        }
        self.written += line.len() as u64;
        if self.written >= self.segment_bytes {
            self.rotate()?;
        }
        Ok(())
    }

    /// Writes what is buffered to the file.
    pub fn flush(&mut self) -> io::Result<()> {
        match self.file.as_mut() {
            Some(f) => f.flush(),
            None => Ok(()),
        }
    }

    /// Closes the segment, starts the next one, deletes the oldest while over the bound.
    fn rotate(&mut self) -> io::Result<()> {
        self.flush()?;
        self.file = None;
        self.seq += 1;
        self.written = 0;
        self.seen.clear();
        let mut segs: Vec<(u64, PathBuf, u64)> = segments(&self.dir)?
            .into_iter()
            .map(|(n, p)| {
                let len = std::fs::metadata(&p).map(|m| m.len()).unwrap_or(0);
                (n, p, len)
            })
            .collect();
        let mut total: u64 = segs.iter().map(|s| s.2).sum();
        segs.reverse();
        while total > self.max_bytes.saturating_sub(self.segment_bytes) {
            let Some((_, p, len)) = segs.pop() else { break };
            std::fs::remove_file(&p)?;
            total -= len;
        }
        Ok(())
    }
}

/// Subscribes to `monitor` now and returns the task that writes the log until aborted.
pub fn start(
    monitor: &Arc<Monitor>,
    dir: &Path,
    max_bytes: u64,
) -> io::Result<tokio::task::JoinHandle<()>> {
    let rec = Recorder::open(dir, max_bytes)?;
    info!(dir = %dir.display(), max_bytes, segment = %rec.current().display(), "decision log");
    let sub = monitor.subscribe();
    Ok(tokio::spawn(run(rec, sub)))
}

async fn run(mut rec: Recorder, mut sub: Subscription) {
    let mut failing = false;
    loop {
        let first = sub.recv().await;
        let mut r = write(&mut rec, first);
        // Everything already waiting, then one flush.
        for _ in 0..4096 {
            match sub.try_recv() {
                Some(item) => r = r.and(write(&mut rec, item)),
                None => break,
            }
        }
        r = r.and(rec.flush());
        match r {
            Err(e) if !failing => {
                warn!(error = %e, dir = %rec.dir.display(), "decision log: write failed; decisions are not recorded until it works again");
                failing = true;
            }
            Ok(()) if failing => {
                info!(dir = %rec.dir.display(), "decision log: writing again");
                failing = false;
            }
            _ => {}
        }
    }
}

fn write(rec: &mut Recorder, item: Result<Item, u64>) -> io::Result<()> {
    match item {
        Ok(Item::Decision(r)) => rec.record(&r),
        Ok(Item::Lost(l)) => rec.lost(&l),
        Err(n) => rec.lost(&LostRecord {
            time: crate::events::now_rfc3339(),
            lost: n,
            at: "agent".into(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use passthrough_policy::decision_log::read;

    fn rec(n: u32) -> DecisionRecord {
        DecisionRecord {
            time: format!("2026-01-02T03:04:{:02}.000Z", n % 60),
            workload: "web".into(),
            workload_id: 1,
            path: "kernel".into(),
            verdict: "allow".into(),
            reason: "address_match".into(),
            dst: format!("198.51.{}.{}:443", n / 256, n % 256)
                .parse()
                .unwrap(),
            protocol: "tcp".into(),
            sni: None,
            host: None,
            matched: None,
            pid: n,
            comm: "c".into(),
            sampled: None,
        }
    }

    #[test]
    fn dedupes_per_segment_rotates_bounds_and_continues_after_a_restart() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("log");
        let max = SEGMENTS * 4096;
        let mut r = Recorder::open(&dir, max).unwrap();
        // The same decision again (another pid, another time) is not written twice.
        r.record(&rec(1)).unwrap();
        let mut again = rec(1);
        again.pid = 99;
        again.time = "later".into();
        r.record(&again).unwrap();
        r.flush().unwrap();
        assert_eq!(read(std::slice::from_ref(&dir)).unwrap().records.len(), 1);
        // Many distinct decisions: segments rotate, the directory stays within the bound.
        for n in 0..2000 {
            r.record(&rec(n)).unwrap();
            r.flush().unwrap();
            let total: u64 = segments(&dir)
                .unwrap()
                .iter()
                .map(|(_, p)| std::fs::metadata(p).unwrap().len())
                .sum();
            assert!(total <= max, "{total} > {max} after {n}");
        }
        let segs = segments(&dir).unwrap();
        assert!(segs.len() >= 2 && segs.len() as u64 <= SEGMENTS, "{segs:?}");
        let got = read(std::slice::from_ref(&dir)).unwrap();
        assert_eq!(got.bad_lines, 0);
        // The newest decisions are kept, the oldest were deleted with their segments.
        assert_eq!(got.records.last().unwrap().pid, 1999);
        assert!(got.records.len() < 2000);
        // A decision written before a rotation is written again in the new segment.
        let seg_of = |pid: u32| -> Vec<u64> {
            segments(&dir)
                .unwrap()
                .into_iter()
                .filter(|(_, p)| {
                    read(std::slice::from_ref(p))
                        .unwrap()
                        .records
                        .iter()
                        .any(|x| x.pid == pid)
                })
                .map(|(n, _)| n)
                .collect()
        };
        let first = seg_of(1999);
        for n in 3000..3200 {
            r.record(&rec(n)).unwrap();
        }
        r.record(&rec(1999)).unwrap();
        r.flush().unwrap();
        let now = seg_of(1999);
        assert!(
            now.len() > first.len() || now.last() > first.last(),
            "{first:?} {now:?}"
        );
        // A restarted agent starts the next segment; a partial line left by a crash is skipped.
        let last = segments(&dir).unwrap().last().unwrap().1.clone();
        std::fs::OpenOptions::new()
            .append(true)
            .open(&last)
            .unwrap()
            .write_all(b"{\"time\":\"cut")
            .unwrap();
        drop(r);
        let mut r2 = Recorder::open(&dir, max).unwrap();
        assert!(r2.current() != last);
        r2.lost(&LostRecord {
            time: "t".into(),
            lost: 5,
            at: "kernel".into(),
        })
        .unwrap();
        r2.record(&rec(1)).unwrap();
        r2.flush().unwrap();
        let got = read(std::slice::from_ref(&dir)).unwrap();
        assert_eq!(got.lost, 5);
        assert_eq!(got.bad_lines, 1);
        assert_eq!(got.records.last().unwrap().pid, 1);
    }
}
