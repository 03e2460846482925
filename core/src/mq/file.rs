//! The embedded backend: newline-delimited JSON appended to `<directory>/events.ndjson`.
//! When the live file would pass `mq.file.max_file_bytes` it is synced, closed and renamed
//! `events-<UTC time>.ndjson` (a batch is split at line ends between the two); rotated
//! files are kept for whatever ships them, within bounds: at each rotation the oldest are
//! removed while more than `mq.file.max_files` remain or while the folder could not take
//! a full live file within `mq.file.max_total_bytes`, so a flood of events cannot fill the
//! disk. Each removal is logged with the file's name and size and counted
//! (`mq_files_removed_total`); readiness reports the queue degraded from 90 % of the total
//! on. Each piece of a batch is written with one `write` and synced (`fdatasync`) before
//! the batch counts as delivered; a write or sync that fails (a full disk) is cut off the
//! file again, so the file never holds a cut line, and the batch is sent again later.
//! Behind the spool (`mq.durability = "disk"`) a batch is synced later instead, before
//! the spool's checkpoint moves past it ([`Transport::sync`]): the spool holds it until
//! then, and one sync serves every batch since the last checkpoint. A sync that fails
//! then cannot say which lines it lost: the backend refuses every batch from then on
//! and readiness reports it down, the checkpoint stays, and after a restart everything
//! after it is sent again.
//!
//! One instance per folder: the backend holds an exclusive lock on `<directory>/.lock`
//! (`flock`) from start to close, and a second instance given the same folder refuses to
//! start, naming `mq.file.directory`. Several instances on one host each need a folder of
//! their own (or the SQS backend).

use std::{
    fs::{File, OpenOptions},
    io::Write as _,
    os::unix::fs::FileExt as _,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
};

use futures_util::future::BoxFuture;

use super::{BatchLimits, EntryFailure, OutboundMessage, Transport};
use crate::{config::FileMqConfig, metrics::MQ_FILES_REMOVED_TOTAL};

const LIVE: &str = "events.ndjson";

/// Disk use, as a share of `max_total_bytes`, from which readiness reports degraded.
const NEAR_FULL_PERCENT: u64 = 90;

/// Newline-delimited JSON files under a folder.
#[derive(Debug)]
pub struct FileTransport {
    directory: PathBuf,
    max_total_bytes: u64,
    state: Arc<Mutex<LiveFile>>,
}

#[derive(Debug)]
struct LiveFile {
    directory: PathBuf,
    max_bytes: u64,
    max_total_bytes: u64,
    max_files: usize,
    /// `None` after a write error: reopened on the next batch.
    file: Option<File>,
    size: u64,
    /// The folder's lock, held until the transport closes.
    lock: Option<File>,
    /// Each batch is synced before it counts as delivered; otherwise at [`Self::sync_accepted`].
    sync_each_batch: bool,
    /// Lines were written since the last sync.
    unsynced: bool,
    /// Why a sync of accepted lines failed: they may be lost, and nothing more is accepted.
    sync_failed: Option<String>,
}

impl FileTransport {
    /// Creates the folder if needed, locks it and opens the live file for appending.
    pub fn open(config: &FileMqConfig) -> anyhow::Result<Self> {
        let lock = super::lock_folder(&config.directory, "mq.file.directory")?;
        let mut live = LiveFile {
            directory: config.directory.clone(),
            max_bytes: config.max_file_bytes,
            max_total_bytes: config.max_total_bytes,
            max_files: config.max_files,
            file: None,
            size: 0,
            lock: Some(lock),
            sync_each_batch: true,
            unsynced: false,
            sync_failed: None,
        };
        live.reopen().map_err(|e| {
            anyhow::anyhow!(
                "`mq.file.directory`: cannot open {}: {e}",
                config.directory.join(LIVE).display()
            )
        })?;
        // Registered at 0, so that the series exists before the first removal.
        metrics::counter!(MQ_FILES_REMOVED_TOTAL).increment(0);
        // Files left by an earlier run, or written with larger limits, count too.
        live.enforce_retention();
        Ok(Self {
            directory: config.directory.clone(),
            max_total_bytes: config.max_total_bytes,
            state: Arc::new(Mutex::new(live)),
        })
    }

    /// Syncs accepted batches only when asked ([`Transport::sync`]), not each one as it
    /// is written: for a queue whose spool holds every batch until then.
    pub fn synced_at_checkpoints(self) -> Self {
        self.live().sync_each_batch = false;
        self
    }

    fn live(&self) -> std::sync::MutexGuard<'_, LiveFile> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl LiveFile {
    /// Opens the live file for appending. A line cut short by a crash was never
    /// acknowledged (a batch counts once it is written whole and synced): it is removed,
    /// and the message is sent again.
    fn reopen(&mut self) -> std::io::Result<()> {
        std::fs::create_dir_all(&self.directory)?;
        let file = OpenOptions::new()
            .create(true)
            .read(true)
            .append(true)
            .open(self.directory.join(LIVE))?;
        let size = file.metadata()?.len();
        let whole = whole_lines(&file, size)?;
        if whole < size {
            tracing::warn!(
                file = %self.directory.join(LIVE).display(),
                bytes = size - whole,
                "a line cut short (never acknowledged) removed from the end of the event file"
            );
            file.set_len(whole)?;
            file.sync_all()?;
        }
        self.file = Some(file);
        self.size = whole;
        Ok(())
    }

    /// Appends the lines of `data` (`ends`: the offset after each line's newline),
    /// rotating between two lines whenever the next would pass `max_bytes` (a single line
    /// longer than that goes alone into a fresh file), and syncs them. Answers how many
    /// lines are stored, and the error that stopped the rest: what was written of those
    /// is cut off again, so the file still ends with a whole line.
    fn append(&mut self, data: &[u8], ends: &[usize]) -> (usize, Option<std::io::Error>) {
        if let Some(error) = &self.sync_failed {
            return (0, Some(std::io::Error::other(error.clone())));
        }
        let mut stored = 0;
        let mut piece_start = 0;
        for (line, &end) in ends.iter().enumerate() {
            let start = if line == 0 { 0 } else { ends[line - 1] };
            let held = self.size + (start - piece_start) as u64;
            if held > 0 && held + (end - start) as u64 > self.max_bytes {
                if let Err(error) = self.commit(&data[piece_start..start]) {
                    return (stored, Some(error));
                }
                stored = line;
                piece_start = start;
                if let Err(error) = self.rotate() {
                    return (stored, Some(error));
                }
            }
        }
        match self.commit(&data[piece_start..]) {
            Ok(()) => (ends.len(), None),
            Err(error) => (stored, Some(error)),
        }
    }

    /// Writes `data` at the end of the live file and syncs it (unless the sync waits for
    /// [`Self::sync_accepted`]); on failure cuts it off.
    fn commit(&mut self, data: &[u8]) -> std::io::Result<()> {
        if data.is_empty() {
            return Ok(());
        }
        if self.file.is_none() {
            self.reopen()?;
        }
        let file = self.file.as_mut().ok_or(std::io::ErrorKind::NotFound)?;
        let written = file
            .write_all(data)
            .and_then(|()| match self.sync_each_batch {
                true => file.sync_data(),
                false => Ok(()),
            });
        match written {
            Ok(()) => {
                self.size += data.len() as u64;
                self.unsynced = !self.sync_each_batch;
                Ok(())
            }
            Err(error) => {
                if file.set_len(self.size).is_err() {
                    // Reopened on the next batch: what it holds unsynced is synced first.
                    let _ = self.sync_accepted();
                    self.file = None;
                }
                Err(error)
            }
        }
    }

    /// Syncs the lines written since the last sync. A failure sticks: which lines were
    /// lost is unknown, so nothing more is accepted until a restart sends again what
    /// the spool's checkpoint had not passed.
    fn sync_accepted(&mut self) -> Result<(), String> {
        if let Some(error) = &self.sync_failed {
            return Err(error.clone());
        }
        let Some(file) = self.file.as_ref().filter(|_| self.unsynced) else {
            return Ok(());
        };
        if let Err(error) = file.sync_data() {
            let error = format!(
                "{}: a sync failed ({error}); restart to send again what the spool holds",
                self.directory.join(LIVE).display()
            );
            tracing::error!(
                error,
                "the event file may have lost lines; refusing new batches"
            );
            self.sync_failed = Some(error.clone());
            return Err(error);
        }
        self.unsynced = false;
        Ok(())
    }

    fn rotate(&mut self) -> std::io::Result<()> {
        if let Some(file) = self.file.take() {
            file.sync_all()?;
            self.unsynced = false;
        }
        let stamp = file_stamp();
        let mut target = self.directory.join(format!("events-{stamp}.ndjson"));
        let mut n = 1;
        while target.exists() {
            target = self.directory.join(format!("events-{stamp}-{n}.ndjson"));
            n += 1;
        }
        std::fs::rename(self.directory.join(LIVE), &target)?;
        tracing::info!(file = %target.display(), "event file rotated");
        self.reopen()?;
        self.enforce_retention();
        Ok(())
    }

    /// Removes the oldest rotated files while more than `max_files` remain, or while they
    /// and a full live file would pass `max_total_bytes`. The folder is listed each time:
    /// whatever ships the files may have taken some away.
    fn enforce_retention(&mut self) {
        let mut rotated = match rotated_files(&self.directory) {
            Ok(files) => files,
            Err(error) => {
                tracing::error!(directory = %self.directory.display(), %error, "cannot list the event files");
                return;
            }
        };
        let mut kept_bytes: u64 = rotated.iter().map(|(_, size)| size).sum();
        let mut oldest = rotated.drain(..);
        let mut kept = oldest.len();
        while kept > self.max_files
            || kept_bytes.saturating_add(self.max_bytes) > self.max_total_bytes
        {
            let Some((path, size)) = oldest.next() else {
                break;
            };
            kept -= 1;
            kept_bytes -= size;
            match std::fs::remove_file(&path) {
                Ok(()) => {
                    metrics::counter!(MQ_FILES_REMOVED_TOTAL).increment(1);
                    tracing::warn!(
                        file = %path.display(),
                        bytes = size,
                        "event file removed: `mq.file.max_total_bytes` or `mq.file.max_files` reached"
                    );
                }
                Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
                Err(error) => {
                    tracing::error!(file = %path.display(), %error, "cannot remove an event file");
                }
            }
        }
    }

    fn sync(&mut self) -> std::io::Result<()> {
        match &self.file {
            Some(file) => file.sync_all(),
            None => Ok(()),
        }
    }
}

/// The length of `file`'s first `size` bytes up to and with its last newline.
fn whole_lines(file: &File, size: u64) -> std::io::Result<u64> {
    let mut chunk = vec![0; 64 * 1024];
    let mut end = size;
    while end > 0 {
        let start = end.saturating_sub(chunk.len() as u64);
        let piece = &mut chunk[..(end - start) as usize];
        file.read_exact_at(piece, start)?;
        if let Some(newline) = piece.iter().rposition(|&b| b == b'\n') {
            return Ok(start + newline as u64 + 1);
        }
        end = start;
    }
    Ok(0)
}

/// The rotated event files under `directory` with their sizes, oldest first.
fn rotated_files(directory: &Path) -> std::io::Result<Vec<(PathBuf, u64)>> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(directory)? {
        let entry = entry?;
        let name = entry.file_name();
        let Some(order) = name.to_str().and_then(rotation_order) else {
            continue;
        };
        let size = entry.metadata()?.len();
        files.push((order, entry.path(), size));
    }
    files.sort_unstable_by(|a, b| a.0.cmp(&b.0));
    Ok(files
        .into_iter()
        .map(|(_, path, size)| (path, size))
        .collect())
}

/// Where a rotated file's name puts it in time: its stamp, then the number added when
/// two rotations shared one (`events-<stamp>-<n>.ndjson`). `None` for other files.
fn rotation_order(name: &str) -> Option<(String, u32)> {
    let middle = name.strip_prefix("events-")?.strip_suffix(".ndjson")?;
    Some(match middle.rsplit_once("Z-") {
        Some((stamp, n)) => (format!("{stamp}Z"), n.parse().ok()?),
        None => (middle.to_owned(), 0),
    })
}

/// Bytes of every event file (live and rotated) under `directory`.
async fn disk_use(directory: &Path) -> std::io::Result<u64> {
    let mut total = 0;
    let mut entries = tokio::fs::read_dir(directory).await?;
    while let Some(entry) = entries.next_entry().await? {
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name == LIVE || rotation_order(&name).is_some() {
            total += entry.metadata().await?.len();
        }
    }
    Ok(total)
}

/// `20261124T014512.345Z`: sortable, and valid in file names everywhere.
fn file_stamp() -> String {
    humantime::format_rfc3339_millis(std::time::SystemTime::now())
        .to_string()
        .replace(['-', ':'], "")
}

impl Transport for FileTransport {
    fn backend(&self) -> &'static str {
        "file"
    }

    fn limits(&self) -> BatchLimits {
        BatchLimits {
            max_messages: 1_000,
            max_bytes: 4 * 1024 * 1024,
            // One writer keeps batches whole and in order.
            max_in_flight: 1,
        }
    }

    fn send<'a>(
        &'a self,
        batch: &'a [OutboundMessage],
    ) -> BoxFuture<'a, Result<Vec<EntryFailure>, String>> {
        let mut data = Vec::with_capacity(batch.iter().map(|m| m.body.len() + 1).sum());
        let mut ends = Vec::with_capacity(batch.len());
        for message in batch {
            data.extend_from_slice(message.body.as_bytes());
            data.push(b'\n');
            ends.push(data.len());
        }
        let state = self.state.clone();
        Box::pin(async move {
            let (stored, error) = tokio::task::spawn_blocking(move || {
                state
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .append(&data, &ends)
            })
            .await
            .map_err(|e| e.to_string())?;
            match error {
                None => Ok(Vec::new()),
                Some(error) if stored == 0 => Err(error.to_string()),
                // The lines before the error are stored; the rest are sent again.
                Some(error) => Ok((stored..batch.len())
                    .map(|index| EntryFailure {
                        index,
                        retryable: true,
                        reason: error.to_string(),
                    })
                    .collect()),
            }
        })
    }

    fn check(&self) -> BoxFuture<'_, Result<(), String>> {
        Box::pin(async move {
            if let Some(error) = self.live().sync_failed.clone() {
                return Err(error);
            }
            check_writable(&self.directory)
                .await
                .map_err(|e| format!("{}: {e}", self.directory.display()))
        })
    }

    fn capacity_warning(&self) -> BoxFuture<'_, Option<String>> {
        Box::pin(async move {
            let used = disk_use(&self.directory).await.ok()?;
            (used.saturating_mul(100) >= self.max_total_bytes.saturating_mul(NEAR_FULL_PERCENT))
                .then(|| {
                    format!(
                        "the event files take {used} of {} bytes (`mq.file.max_total_bytes`); \
                         the oldest are removed at the limit",
                        self.max_total_bytes
                    )
                })
        })
    }

    fn sync(&self) -> BoxFuture<'_, Result<(), String>> {
        let state = self.state.clone();
        Box::pin(async move {
            tokio::task::spawn_blocking(move || {
                state
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .sync_accepted()
            })
            .await
            .map_err(|e| e.to_string())?
        })
    }

    fn close(&self) -> BoxFuture<'_, Result<(), String>> {
        let state = self.state.clone();
        Box::pin(async move {
            tokio::task::spawn_blocking(move || {
                let mut live = state.lock().unwrap_or_else(|p| p.into_inner());
                let synced = live.sync();
                // The folder is free for the next instance.
                live.lock = None;
                synced
            })
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())
        })
    }
}

async fn check_writable(directory: &Path) -> std::io::Result<()> {
    let metadata = tokio::fs::metadata(directory).await?;
    if metadata.permissions().readonly() {
        return Err(std::io::Error::other("the folder is read-only"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::{config::MqConfig, mq::MessageQueue, readiness::CheckStatus};

    fn config(directory: &Path, max_file: u64, max_total: u64, max_files: usize) -> FileMqConfig {
        FileMqConfig {
            directory: directory.to_path_buf(),
            max_file_bytes: max_file,
            max_total_bytes: max_total,
            max_files,
        }
    }

    /// Message `n`, a line of exactly `len` bytes plus its newline.
    fn message(n: usize, len: usize) -> OutboundMessage {
        let head = format!("{{\"n\":{n},\"pad\":\"");
        let pad = "x".repeat(len - head.len() - 2);
        OutboundMessage {
            id: n.to_string(),
            body: format!("{head}{pad}\"}}"),
            traceparent: None,
        }
    }

    /// (name, size) of each event file, and the message numbers they hold.
    fn files(directory: &Path) -> (Vec<(String, u64)>, Vec<usize>) {
        let mut files = Vec::new();
        let mut numbers = Vec::new();
        for entry in std::fs::read_dir(directory).expect("folder") {
            let entry = entry.expect("entry");
            if entry.file_name() == ".lock" {
                continue;
            }
            let text = std::fs::read_to_string(entry.path()).expect("file");
            for line in text.lines() {
                let value: serde_json::Value = serde_json::from_str(line).expect("JSON line");
                numbers.push(value["n"].as_u64().expect("n") as usize);
            }
            let name = entry.file_name().to_string_lossy().into_owned();
            files.push((name, entry.metadata().expect("metadata").len()));
        }
        numbers.sort_unstable();
        (files, numbers)
    }

    #[tokio::test]
    async fn a_second_transport_on_the_same_folder_is_refused_until_the_first_closes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let settings = config(dir.path(), 1_000, 3_000, 100);
        let first = FileTransport::open(&settings).expect("opens");
        let refused = FileTransport::open(&settings).expect_err("the folder is taken");
        let text = refused.to_string();
        assert!(text.contains("`mq.file.directory`"), "{text}");
        assert!(text.contains("another running instance"), "{text}");
        first.close().await.expect("closes");
        FileTransport::open(&settings).expect("free again after the close");
    }

    #[tokio::test]
    async fn rotated_files_past_the_total_are_removed_oldest_first() {
        let dir = tempfile::tempdir().expect("tempdir");
        let transport = FileTransport::open(&config(dir.path(), 1_000, 3_000, 100)).expect("opens");
        // 200-byte lines, five to a file; batches of three cross file boundaries.
        for batch in 0..10 {
            let messages: Vec<_> = (0..3).map(|i| message(batch * 3 + i, 199)).collect();
            transport.send(&messages).await.expect("written");
        }
        let (files, numbers) = files(dir.path());
        let total: u64 = files.iter().map(|(_, size)| size).sum();
        assert!(total <= 3_000, "{total} bytes on disk: {files:?}");
        assert!(files.iter().all(|(_, size)| *size <= 1_000), "{files:?}");
        let newest: Vec<usize> = (30 - numbers.len()..30).collect();
        assert_eq!(
            numbers, newest,
            "the newest events are kept, the oldest removed"
        );
        assert!(
            numbers.len() >= 10,
            "two rotated files and the live one: {files:?}"
        );
    }

    #[tokio::test]
    async fn rotated_files_past_the_count_are_removed_oldest_first() {
        let dir = tempfile::tempdir().expect("tempdir");
        let transport =
            FileTransport::open(&config(dir.path(), 1_000, 1_000_000, 2)).expect("opens");
        for n in 0..30 {
            transport.send(&[message(n, 199)]).await.expect("written");
        }
        let (files, numbers) = files(dir.path());
        assert_eq!(
            files.len(),
            3,
            "two rotated files and the live one: {files:?}"
        );
        assert_eq!(numbers, (15..30).collect::<Vec<_>>());
    }

    #[test]
    fn rotated_files_are_ordered_by_stamp_then_number() {
        let mut names = [
            "events-20261124T014512.345Z-1.ndjson",
            "events-20261124T014512.346Z.ndjson",
            "events-20261124T014512.345Z.ndjson",
            "events-20261124T014512.345Z-10.ndjson",
            "events-20261124T014512.345Z-2.ndjson",
        ];
        names.sort_by_key(|name| rotation_order(name));
        assert_eq!(
            names,
            [
                "events-20261124T014512.345Z.ndjson",
                "events-20261124T014512.345Z-1.ndjson",
                "events-20261124T014512.345Z-2.ndjson",
                "events-20261124T014512.345Z-10.ndjson",
                "events-20261124T014512.346Z.ndjson",
            ]
        );
        for other in ["events.ndjson", "notes.txt", "events-x-y.ndjson.tmp"] {
            assert_eq!(rotation_order(other), None, "{other}");
        }
    }

    #[tokio::test]
    async fn disk_use_near_the_limit_degrades_readiness() {
        let dir = tempfile::tempdir().expect("tempdir");
        let transport =
            Arc::new(FileTransport::open(&config(dir.path(), 1_000, 2_000, 100)).expect("opens"));
        let memory = MqConfig {
            durability: crate::config::Durability::Memory,
            ..MqConfig::default()
        };
        let queue = MessageQueue::with_transport(&memory, transport.clone()).expect("opens");
        transport.send(&[message(0, 199)]).await.expect("written");
        assert_eq!(queue.check().await.status, CheckStatus::Up);
        // 1 800 bytes of the 2 000 allowed: one rotated file and most of the live one.
        for n in 1..9 {
            transport.send(&[message(n, 199)]).await.expect("written");
        }
        let outcome = queue.check().await;
        assert_eq!(outcome.status, CheckStatus::Degraded, "{outcome:?}");
        assert!(
            outcome
                .detail
                .as_deref()
                .is_some_and(|d| d.contains("mq.file.max_total_bytes")),
            "{outcome:?}"
        );
        queue.close(std::time::Duration::MAX).await;
    }
}
