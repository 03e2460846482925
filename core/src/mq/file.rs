//! The embedded backend: newline-delimited JSON appended to `<directory>/events.ndjson`.
//! When the live file would pass `mq.file.max_file_bytes` it is synced, closed and renamed
//! `events-<UTC time>.ndjson` (a batch is split at line ends between the two); rotated
//! files are kept for whatever ships them, within bounds: at each rotation the oldest are
//! removed while more than `mq.file.max_files` remain or while the folder could not take
//! a full live file within `mq.file.max_total_bytes`, so a flood of events cannot fill the
//! disk. Each removal is logged with the file's name and size and counted
//! (`mq_files_removed_total`); readiness reports the queue degraded from 90 % of the total
//! on. Each piece of a batch is written with one `write` and flushed to the operating
//! system; the file is synced at rotation and at close.
//!
//! One instance per folder: the backend holds an exclusive lock on `<directory>/.lock`
//! (`flock`) from start to close, and a second instance given the same folder refuses to
//! start, naming `mq.file.directory`. Several instances on one host each need a folder of
//! their own (or the SQS backend).

use std::{
    fs::{File, OpenOptions},
    io::{Read as _, Seek as _, SeekFrom, Write as _},
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
};

use futures_util::future::BoxFuture;

use super::{BatchLimits, EntryFailure, OutboundMessage, Transport};
use crate::{config::FileMqConfig, metrics::MQ_FILES_REMOVED_TOTAL};

const LIVE: &str = "events.ndjson";
const LOCK: &str = ".lock";

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
}

impl FileTransport {
    /// Creates the folder if needed, locks it and opens the live file for appending.
    pub fn open(config: &FileMqConfig) -> anyhow::Result<Self> {
        let lock = lock_folder(&config.directory)?;
        let mut live = LiveFile {
            directory: config.directory.clone(),
            max_bytes: config.max_file_bytes,
            max_total_bytes: config.max_total_bytes,
            max_files: config.max_files,
            file: None,
            size: 0,
            lock: Some(lock),
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
}

impl LiveFile {
    /// Opens the live file for appending; a line cut short by an earlier failure is ended.
    fn reopen(&mut self) -> std::io::Result<()> {
        std::fs::create_dir_all(&self.directory)?;
        let mut file = OpenOptions::new()
            .create(true)
            .read(true)
            .append(true)
            .open(self.directory.join(LIVE))?;
        let mut size = file.metadata()?.len();
        if size > 0 {
            let mut last = [0u8; 1];
            file.seek(SeekFrom::End(-1))?;
            file.read_exact(&mut last)?;
            if last[0] != b'\n' {
                file.write_all(b"\n")?;
                size += 1;
            }
        }
        self.file = Some(file);
        self.size = size;
        Ok(())
    }

    /// Appends whole lines, rotating between two lines whenever the next piece would
    /// pass `max_bytes`; a single line longer than that goes alone into a fresh file.
    fn append(&mut self, mut data: &[u8]) -> std::io::Result<()> {
        while !data.is_empty() {
            let room =
                usize::try_from(self.max_bytes.saturating_sub(self.size)).unwrap_or(usize::MAX);
            let mut piece = if data.len() <= room {
                data.len()
            } else {
                data[..room]
                    .iter()
                    .rposition(|&b| b == b'\n')
                    .map_or(0, |end| end + 1)
            };
            if piece == 0 {
                if self.size > 0 {
                    self.rotate()?;
                    continue;
                }
                piece = data
                    .iter()
                    .position(|&b| b == b'\n')
                    .map_or(data.len(), |end| end + 1);
            }
            self.write(&data[..piece])?;
            data = &data[piece..];
        }
        Ok(())
    }

    fn write(&mut self, data: &[u8]) -> std::io::Result<()> {
        if self.file.is_none() {
            self.reopen()?;
        }
        let file = self.file.as_mut().ok_or(std::io::ErrorKind::NotFound)?;
        if let Err(error) = file.write_all(data).and_then(|()| file.flush()) {
            self.file = None;
            return Err(error);
        }
        self.size += data.len() as u64;
        Ok(())
    }

    fn rotate(&mut self) -> std::io::Result<()> {
        if let Some(file) = self.file.take() {
            file.sync_all()?;
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

/// Takes the folder's exclusive lock, or says which instance setting to change.
fn lock_folder(directory: &Path) -> anyhow::Result<File> {
    let path = directory.join(LOCK);
    let opened = std::fs::create_dir_all(directory).and_then(|()| {
        OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
    });
    let file = opened
        .map_err(|e| anyhow::anyhow!("`mq.file.directory`: cannot open {}: {e}", path.display()))?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(std::fs::TryLockError::WouldBlock) => Err(anyhow::anyhow!(
            "`mq.file.directory`: {} is in use by another running instance (it holds {}); \
             give each instance a folder of its own",
            directory.display(),
            path.display()
        )),
        Err(std::fs::TryLockError::Error(e)) => Err(anyhow::anyhow!(
            "`mq.file.directory`: cannot lock {}: {e}",
            path.display()
        )),
    }
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
        for message in batch {
            data.extend_from_slice(message.body.as_bytes());
            data.push(b'\n');
        }
        let state = self.state.clone();
        Box::pin(async move {
            tokio::task::spawn_blocking(move || {
                state
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .append(&data)
            })
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())?;
            Ok(Vec::new())
        })
    }

    fn check(&self) -> BoxFuture<'_, Result<(), String>> {
        Box::pin(async move {
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
        }
    }

    /// (name, size) of each event file, and the message numbers they hold.
    fn files(directory: &Path) -> (Vec<(String, u64)>, Vec<usize>) {
        let mut files = Vec::new();
        let mut numbers = Vec::new();
        for entry in std::fs::read_dir(directory).expect("folder") {
            let entry = entry.expect("entry");
            if entry.file_name() == LOCK {
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
        let queue = MessageQueue::with_transport(&MqConfig::default(), transport.clone());
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
