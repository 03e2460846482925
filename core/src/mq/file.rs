//! The embedded backend: newline-delimited JSON appended to `<directory>/events.ndjson`.
//! When the live file would pass `mq.file.max_file_bytes` it is synced, closed and renamed
//! `events-<UTC time>.ndjson`; rotated files are kept for whatever ships them. Each batch
//! is written with one `write` and flushed to the operating system; the file is synced
//! at rotation and at close.

use std::{
    fs::{File, OpenOptions},
    io::{Read as _, Seek as _, SeekFrom, Write as _},
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
};

use futures_util::future::BoxFuture;

use super::{BatchLimits, EntryFailure, OutboundMessage, Transport};
use crate::config::FileMqConfig;

const LIVE: &str = "events.ndjson";

/// Newline-delimited JSON files under a folder.
#[derive(Debug)]
pub struct FileTransport {
    directory: PathBuf,
    state: Arc<Mutex<LiveFile>>,
}

#[derive(Debug)]
struct LiveFile {
    directory: PathBuf,
    max_bytes: u64,
    /// `None` after a write error: reopened on the next batch.
    file: Option<File>,
    size: u64,
}

impl FileTransport {
    /// Creates the folder if needed and opens the live file for appending.
    pub fn open(config: &FileMqConfig) -> anyhow::Result<Self> {
        let mut live = LiveFile {
            directory: config.directory.clone(),
            max_bytes: config.max_file_bytes,
            file: None,
            size: 0,
        };
        live.reopen().map_err(|e| {
            anyhow::anyhow!(
                "`mq.file.directory`: cannot open {}: {e}",
                config.directory.join(LIVE).display()
            )
        })?;
        Ok(Self {
            directory: config.directory.clone(),
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

    fn append(&mut self, data: &[u8]) -> std::io::Result<()> {
        if self.size > 0 && self.size + data.len() as u64 > self.max_bytes {
            self.rotate()?;
        }
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
        self.reopen()
    }

    fn sync(&mut self) -> std::io::Result<()> {
        match &self.file {
            Some(file) => file.sync_all(),
            None => Ok(()),
        }
    }
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

    fn close(&self) -> BoxFuture<'_, Result<(), String>> {
        let state = self.state.clone();
        Box::pin(async move {
            tokio::task::spawn_blocking(move || {
                state.lock().unwrap_or_else(|p| p.into_inner()).sync()
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
