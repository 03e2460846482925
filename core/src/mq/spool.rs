//! The spool: published messages on disk until the backend has them
//! (`mq.durability = "disk"`).
//!
//! - **Log.** Messages are appended to segment files `<directory>/<number>.spool`, each
//!   message one frame: its length and CRC-32 (4 bytes each, little-endian), then the id's
//!   length (4 bytes), the id, the `traceparent`'s length (1 byte, 0 for none), the
//!   `traceparent` and the body. The CRC covers the segment's number (8 bytes,
//!   little-endian) before the rest, so a frame is only valid in its own segment. A write
//!   starts a new segment once the current one holds `mq.spool.segment_bytes`; the
//!   finished one is cut to its last frame.
//! - **Reuse.** Up to [`SPARES`] delivered segments are kept as `<number>.spare` and
//!   renamed into the next new segment, which is then written over from its start: its
//!   pages are likely still cached, and writing into them costs less than into new
//!   ones. What it held before fails the CRC of its new number, so a restart finds the
//!   end of the log where its last write ended.
//! - **Group commit.** One writer thread takes an append, waits `mq.spool.commit_delay_ms`
//!   for more, encodes every append waiting for it into one buffer, writes it and syncs
//!   the file once (`fdatasync`); only then does each append return. Concurrent requests
//!   share one sync. A write or sync that fails (a full disk) is cut
//!   off the file again and every append of the group fails: nothing was stored, and the
//!   caller says so (503); the next group tries again.
//! - **Delivery.** The queue's pump takes what the writer stored and hands batches to the
//!   backend: from memory while it keeps up (the writer keeps up to 8 MiB of stored
//!   frames for it), from the log when it falls behind or after a restart. When every
//!   batch before a point has been accepted, and the backend has synced them (a backend
//!   that accepts before it syncs: [`Transport::sync`]), that point becomes the checkpoint
//!   (`<directory>/checkpoint`, rewritten at most every 200 ms), and the segments wholly
//!   before it are removed.
//! - **Restart.** Delivery resumes at the checkpoint; what was delivered after the last
//!   checkpoint is sent again (at least once). A frame cut short by a crash at the end of
//!   the log was never acknowledged and is removed.
//!
//! One instance per folder (an exclusive lock on `<directory>/.lock`).

use std::{
    collections::{BTreeMap, VecDeque},
    fs::{File, OpenOptions},
    os::unix::fs::FileExt as _,
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use metrics::{Counter, Gauge, counter, gauge};
use tokio::sync::{oneshot, watch};

use super::{BatchLimits, OutboundMessage, PublishError, Transport, lock_folder};
use crate::{
    config::SpoolConfig,
    metrics::{
        MQ_SPOOL_BYTES, MQ_SPOOL_CORRUPT_BYTES_TOTAL, MQ_SPOOL_SYNCS_TOTAL,
        MQ_SPOOL_WRITE_ERRORS_TOTAL, MQ_SPOOL_WRITTEN_BYTES_TOTAL,
    },
};

const CHECKPOINT: &str = "checkpoint";
const SUFFIX: &str = ".spool";
/// Length and CRC-32.
const HEADER: usize = 8;
/// A frame larger than this is not a frame (a damaged length).
const MAX_FRAME: usize = 256 * 1024 * 1024;
/// Bytes one group commit takes at most.
const GROUP_BYTES: usize = 16 * 1024 * 1024;
/// Bytes one read of the log takes (more for a frame larger than this).
const READ_BYTES: usize = 1024 * 1024;
/// Bytes of stored frames the writer keeps in memory for the reader.
const FRESH_BYTES: usize = 8 * 1024 * 1024;
/// How often the checkpoint is written while deliveries advance it.
const CHECKPOINT_EVERY: Duration = Duration::from_millis(200);
/// Delivered segments kept for reuse, at most.
const SPARES: usize = 2;
const SPARE_SUFFIX: &str = ".spare";

/// A place in the log: a segment and a byte offset in it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct Position {
    segment: u64,
    offset: u64,
}

/// A batch the pump handed out: from `start` to `end`, `bytes` of frames.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Span {
    start: Position,
    end: Position,
    bytes: u64,
}

/// The size of `message`'s frame.
fn frame_len(message: &OutboundMessage) -> usize {
    HEADER + 4 + message.id.len() + 1 + carried(message).len() + message.body.len()
}

/// The `traceparent` a frame carries: none longer than its one length byte says (a W3C
/// `traceparent` has 55 characters).
fn carried(message: &OutboundMessage) -> &str {
    message
        .traceparent
        .as_deref()
        .filter(|t| t.len() <= usize::from(u8::MAX))
        .unwrap_or("")
}

/// Refuses a message too large for a frame.
fn check_size(message: &OutboundMessage) -> Result<(), PublishError> {
    let payload = frame_len(message) - HEADER;
    match payload > MAX_FRAME {
        true => Err(PublishError::Storage {
            error: format!(
                "message {} is {payload} bytes; at most {MAX_FRAME}",
                message.id
            ),
        }),
        false => Ok(()),
    }
}

/// A frame's CRC: the segment's number, then the payload.
fn frame_crc(segment: u64, payload: &[u8]) -> u32 {
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(&segment.to_le_bytes());
    hasher.update(payload);
    hasher.finalize()
}

/// Appends `message` as one frame of `segment` to `out` (its size checked by
/// [`check_size`]).
fn encode(message: &OutboundMessage, segment: u64, out: &mut Vec<u8>) {
    let payload = frame_len(message) - HEADER;
    out.extend_from_slice(&(payload as u32).to_le_bytes());
    let crc_at = out.len();
    out.extend_from_slice(&[0; 4]);
    let start = out.len();
    out.extend_from_slice(&(message.id.len() as u32).to_le_bytes());
    out.extend_from_slice(message.id.as_bytes());
    let traceparent = carried(message);
    out.push(traceparent.len() as u8);
    out.extend_from_slice(traceparent.as_bytes());
    out.extend_from_slice(message.body.as_bytes());
    let crc = frame_crc(segment, &out[start..]);
    out[crc_at..start].copy_from_slice(&crc.to_le_bytes());
}

/// What [`decode`] found in a stretch of the log.
#[derive(Debug, Default)]
struct Decoded {
    /// Whole frames, each with the offset of its end.
    messages: Vec<(OutboundMessage, usize)>,
    /// Bytes of whole frames.
    consumed: usize,
    /// The size of the frame at `consumed` when it is longer than the data.
    wanted: Option<usize>,
    /// The frame at `consumed` is damaged (its length, CRC or text).
    damaged: bool,
}

/// Reads the frames of `segment` at the start of `data`.
fn decode(data: &[u8], segment: u64) -> Decoded {
    let mut decoded = Decoded::default();
    let mut at = 0;
    while data.len() - at >= HEADER {
        let word = |i: usize| u32::from_le_bytes(data[i..i + 4].try_into().expect("4 bytes"));
        let len = word(at) as usize;
        if !(5..=MAX_FRAME).contains(&len) {
            decoded.damaged = true;
            break;
        }
        if data.len() - at - HEADER < len {
            decoded.wanted = Some(HEADER + len);
            break;
        }
        let payload = &data[at + HEADER..at + HEADER + len];
        let id_len = word(at + HEADER) as usize;
        let message = (frame_crc(segment, payload) == word(at + 4) && id_len < len - 4)
            .then(|| {
                let id = std::str::from_utf8(&payload[4..4 + id_len]).ok()?;
                let rest = &payload[4 + id_len..];
                let (&traceparent_len, rest) = rest.split_first()?;
                let (traceparent, body) = rest.split_at_checked(traceparent_len.into())?;
                let traceparent = std::str::from_utf8(traceparent).ok()?;
                Some(OutboundMessage {
                    id: id.to_owned(),
                    body: std::str::from_utf8(body).ok()?.to_owned(),
                    traceparent: (!traceparent.is_empty()).then(|| traceparent.to_owned()),
                })
            })
            .flatten();
        let Some(message) = message else {
            decoded.damaged = true;
            break;
        };
        at += HEADER + len;
        decoded.messages.push((message, at));
        decoded.consumed = at;
    }
    decoded
}

fn segment_path(directory: &Path, segment: u64) -> PathBuf {
    numbered_path(directory, segment, SUFFIX)
}

/// `<directory>/<number><suffix>`: a segment (`.spool`) or a spare (`.spare`).
fn numbered_path(directory: &Path, number: u64, suffix: &str) -> PathBuf {
    directory.join(format!("{number:020}{suffix}"))
}

/// The segments under `directory` with their sizes, oldest first.
fn segments(directory: &Path) -> std::io::Result<Vec<(u64, u64)>> {
    numbered(directory, SUFFIX)
}

/// The files `<number><suffix>` under `directory` with their sizes, by number.
fn numbered(directory: &Path, suffix: &str) -> std::io::Result<Vec<(u64, u64)>> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(directory)? {
        let entry = entry?;
        let name = entry.file_name();
        let Some(number) = name
            .to_str()
            .and_then(|n| n.strip_suffix(suffix))
            .and_then(|n| n.parse::<u64>().ok())
        else {
            continue;
        };
        found.push((number, entry.metadata()?.len()));
    }
    found.sort_unstable();
    Ok(found)
}

fn read_checkpoint(directory: &Path) -> Option<Position> {
    let text = std::fs::read_to_string(directory.join(CHECKPOINT)).ok()?;
    let (segment, offset) = text.trim().split_once(' ')?;
    Some(Position {
        segment: segment.parse().ok()?,
        offset: offset.parse().ok()?,
    })
}

/// Writes the checkpoint (a new file renamed over the old one).
fn write_checkpoint(directory: &Path, at: Position) -> std::io::Result<()> {
    let temporary = directory.join(format!("{CHECKPOINT}.new"));
    std::fs::write(&temporary, format!("{} {}\n", at.segment, at.offset))?;
    std::fs::rename(temporary, directory.join(CHECKPOINT))
}

/// Makes a new file's name durable.
fn sync_folder(directory: &Path) -> std::io::Result<()> {
    File::open(directory)?.sync_all()
}

/// Reads up to `len` bytes at `offset` (fewer at the end of the file).
fn read_at(file: &File, offset: u64, len: usize) -> std::io::Result<Vec<u8>> {
    let mut data = vec![0; len];
    let mut filled = 0;
    while filled < len {
        match file.read_at(&mut data[filled..], offset + filled as u64) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    data.truncate(filled);
    Ok(data)
}

/// Batches handed out and not yet delivered, in log order.
#[derive(Debug, Default)]
struct Acks {
    open: BTreeMap<Position, (Span, bool)>,
    /// Everything before it was delivered.
    checkpoint: Position,
    /// Whether `checkpoint` moved since it was last written.
    moved: bool,
}

/// What the writer, the reader and the checkpoint share.
struct Shared {
    directory: PathBuf,
    max_bytes: u64,
    /// Bytes in the log not yet delivered (or being appended).
    pending: AtomicU64,
    pending_gauge: Gauge,
    /// The last failed write's error, until a write succeeds.
    failure: Mutex<Option<String>>,
    acks: Mutex<Acks>,
    /// Stored appends the reader has not taken yet, oldest first.
    fresh: Mutex<Fresh>,
    syncs: Counter,
    written: Counter,
    write_errors: Counter,
    corrupt: Counter,
}

impl Shared {
    /// `bytes` left the log (delivered, skipped, or never stored). Saturating: damaged
    /// bytes a failed write left behind were never counted.
    fn release(&self, bytes: u64) {
        let before = self
            .pending
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |p| {
                Some(p.saturating_sub(bytes))
            })
            .unwrap_or_default();
        self.pending_gauge.decrement(before.min(bytes) as f64);
    }

    fn acks(&self) -> std::sync::MutexGuard<'_, Acks> {
        self.acks.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn failure(&self) -> std::sync::MutexGuard<'_, Option<String>> {
        self.failure.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn fresh(&self) -> std::sync::MutexGuard<'_, Fresh> {
        self.fresh.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The stored append that starts at `at`, if the writer kept it; drops the ones
    /// before it (the reader read them from the log).
    fn take_fresh(&self, at: Position) -> Option<Stored> {
        let mut fresh = self.fresh();
        while fresh.appends.front()?.start <= at {
            let stored = fresh.appends.pop_front()?;
            fresh.bytes -= stored.bytes;
            if stored.start == at {
                return Some(stored);
            }
        }
        None
    }
}

/// What the writer keeps in memory for the reader, at most [`FRESH_BYTES`] of frames.
#[derive(Default)]
struct Fresh {
    appends: VecDeque<Stored>,
    bytes: usize,
}

/// One append as stored: where its first frame starts, and each message with where its
/// frame ends.
struct Stored {
    start: Position,
    messages: Vec<(OutboundMessage, Position)>,
    bytes: usize,
}

/// Messages waiting for the writer (`bytes` of frames), and who waits for them.
struct Append {
    messages: Vec<OutboundMessage>,
    bytes: usize,
    done: oneshot::Sender<Result<(), String>>,
}

/// The writing side of the spool.
pub(crate) struct Spool {
    shared: Arc<Shared>,
    /// Taken at close: the writer then ends once it has written what it was given.
    writer: Mutex<Option<flume::Sender<Append>>>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
    /// The folder's lock, held until [`release_folder`](Self::release_folder).
    lock: Mutex<Option<File>>,
}

/// What [`Spool::open`] found: the spool, a reader from the checkpoint on, and how many
/// messages wait there.
pub(crate) struct Opened {
    pub spool: Spool,
    pub reader: SpoolReader,
    pub waiting: usize,
}

impl Spool {
    /// Opens (or creates) the spool in `config.directory`: locks the folder, removes a
    /// frame cut short at the end of the log, and starts the writer.
    pub fn open(config: &SpoolConfig) -> anyhow::Result<Opened> {
        let directory = &config.directory;
        let lock = lock_folder(directory, "mq.spool.directory")?;
        let named = |e: std::io::Error| {
            anyhow::anyhow!("`mq.spool.directory`: {}: {e}", directory.display())
        };
        let mut found = segments(directory).map_err(named)?;
        let mut checkpoint = read_checkpoint(directory).unwrap_or_default();
        // Segments before the checkpoint were delivered (removal may not have finished).
        for (segment, _) in found.iter().filter(|(s, _)| *s < checkpoint.segment) {
            std::fs::remove_file(segment_path(directory, *segment)).map_err(named)?;
        }
        found.retain(|(s, _)| *s >= checkpoint.segment);
        match found.first() {
            None => {
                let segment = checkpoint.segment.max(1);
                File::create_new(segment_path(directory, segment)).map_err(named)?;
                sync_folder(directory).map_err(named)?;
                found.push((segment, 0));
                checkpoint = Position { segment, offset: 0 };
            }
            Some(&(first, _)) if first > checkpoint.segment => {
                checkpoint = Position {
                    segment: first,
                    offset: 0,
                };
            }
            Some(_) => {}
        }
        // Count what waits, and cut a damaged or partial frame off the last segment.
        let mut waiting = 0;
        let mut pending = 0;
        let last = found.len() - 1;
        for (index, (segment, size)) in found.iter_mut().enumerate() {
            let path = segment_path(directory, *segment);
            let data = std::fs::read(&path).map_err(named)?;
            let decoded = decode(&data, *segment);
            if *segment == checkpoint.segment {
                checkpoint.offset = checkpoint.offset.min(data.len() as u64);
            }
            let from = if *segment == checkpoint.segment {
                checkpoint.offset
            } else {
                0
            };
            waiting += decoded
                .messages
                .iter()
                .filter(|(_, end)| *end as u64 > from)
                .count();
            if decoded.consumed < data.len() {
                let cut = data.len() - decoded.consumed;
                if index == last {
                    tracing::warn!(
                        segment = %path.display(),
                        bytes = cut,
                        "spool: what follows the last whole frame removed (a write cut short \
                         and never acknowledged, or what a reused segment held before)"
                    );
                    OpenOptions::new()
                        .write(true)
                        .open(&path)
                        .and_then(|f| f.set_len(decoded.consumed as u64).and(f.sync_all()))
                        .map_err(named)?;
                    *size = decoded.consumed as u64;
                } else {
                    tracing::error!(
                        segment = %path.display(),
                        offset = decoded.consumed,
                        bytes = cut,
                        "spool: damaged data; the messages after it in this segment are skipped"
                    );
                }
            }
            pending += size.saturating_sub(from);
        }
        let (segment, size) = found[last];
        let file = OpenOptions::new()
            .write(true)
            .open(segment_path(directory, segment))
            .map_err(named)?;
        let shared = Arc::new(Shared {
            directory: directory.clone(),
            max_bytes: config.max_bytes,
            pending: AtomicU64::new(pending),
            pending_gauge: gauge!(MQ_SPOOL_BYTES),
            failure: Mutex::new(None),
            acks: Mutex::new(Acks {
                checkpoint,
                ..Acks::default()
            }),
            fresh: Mutex::default(),
            syncs: counter!(MQ_SPOOL_SYNCS_TOTAL),
            written: counter!(MQ_SPOOL_WRITTEN_BYTES_TOTAL),
            write_errors: counter!(MQ_SPOOL_WRITE_ERRORS_TOTAL),
            corrupt: counter!(MQ_SPOOL_CORRUPT_BYTES_TOTAL),
        });
        shared.pending_gauge.set(pending as f64);
        let (sender, receiver) = flume::unbounded();
        let end = Position {
            segment,
            offset: size,
        };
        let (committed, watching) = watch::channel(end);
        let writer = Writer {
            shared: shared.clone(),
            segment_bytes: config.segment_bytes,
            commit_delay: Duration::from_secs_f64(config.commit_delay_ms / 1_000.0),
            buffer: Vec::new(),
            file,
            at: end,
            broken: false,
            committed,
        };
        let thread = std::thread::Builder::new()
            .name("trellis-spool".into())
            .spawn(move || writer.run(&receiver))
            .map_err(named)?;
        if waiting > 0 {
            tracing::info!(
                directory = %directory.display(),
                messages = waiting,
                bytes = pending,
                "spool: delivering what an earlier run left"
            );
        }
        Ok(Opened {
            reader: SpoolReader {
                shared: shared.clone(),
                committed: watching,
                at: checkpoint,
                file: None,
                wanted: READ_BYTES,
                ready: VecDeque::new(),
            },
            spool: Self {
                shared,
                writer: Mutex::new(Some(sender)),
                thread: Mutex::new(Some(thread)),
                lock: Mutex::new(Some(lock)),
            },
            waiting,
        })
    }

    /// Stores `messages`: returns once they are on disk, or says why none was stored.
    pub async fn append(&self, messages: Vec<OutboundMessage>) -> Result<(), PublishError> {
        messages.iter().try_for_each(check_size)?;
        let bytes = messages.iter().map(frame_len).sum::<usize>() as u64;
        let shared = &self.shared;
        shared
            .pending
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |pending| {
                (pending + bytes <= shared.max_bytes).then_some(pending + bytes)
            })
            .map_err(|_| PublishError::SpoolFull {
                max_bytes: shared.max_bytes,
            })?;
        shared.pending_gauge.increment(bytes as f64);
        let (done, outcome) = oneshot::channel();
        let sent = self
            .writer
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .map(|w| {
                w.send(Append {
                    messages,
                    bytes: bytes as usize,
                    done,
                })
                .is_ok()
            });
        let stored = match sent {
            Some(true) => outcome
                .await
                .unwrap_or_else(|_| Err("the writer stopped".into())),
            _ => {
                shared.release(bytes);
                return Err(PublishError::Closed);
            }
        };
        stored.map_err(|error| {
            shared.release(bytes);
            PublishError::Storage { error }
        })
    }

    /// Why the spool is not fine, if it is not: the last write failed, or it is nearly full.
    pub fn warning(&self) -> Option<String> {
        if let Some(error) = self.shared.failure().clone() {
            return Some(format!("the spool cannot store messages: {error}"));
        }
        let pending = self.shared.pending.load(Ordering::Relaxed);
        (pending.saturating_mul(10) >= self.shared.max_bytes.saturating_mul(9)).then(|| {
            format!(
                "the spool holds {pending} of {} bytes (`mq.spool.max_bytes`) not yet delivered",
                self.shared.max_bytes
            )
        })
    }

    /// Marks `span` delivered; the checkpoint moves past every delivered batch before
    /// the first undelivered one.
    pub fn delivered(&self, span: Span) {
        let mut acks = self.shared.acks();
        if let Some((_, done)) = acks.open.get_mut(&span.start) {
            *done = true;
        }
        while let Some(entry) = acks.open.first_entry() {
            if !entry.get().1 {
                break;
            }
            let (span, _) = entry.remove();
            acks.checkpoint = span.end;
            acks.moved = true;
            self.shared.release(span.bytes);
        }
    }

    /// Writes the checkpoint if it moved, once `transport` has synced what was delivered
    /// ([`Transport::sync`]), and removes the segments wholly before it. `Err`: the sync
    /// failed, and the checkpoint stays.
    pub async fn save_checkpoint(&self, transport: &dyn Transport) -> Result<(), String> {
        save_checkpoint(&self.shared, transport).await
    }

    /// Writes the checkpoint every 200 ms while deliveries move it (until aborted).
    pub fn keep_checkpoint(&self, transport: Arc<dyn Transport>) -> tokio::task::JoinHandle<()> {
        let shared = self.shared.clone();
        tokio::spawn(async move {
            let mut failing = false;
            loop {
                tokio::time::sleep(CHECKPOINT_EVERY).await;
                let saved = save_checkpoint(&shared, &*transport).await;
                if let Err(error) = &saved
                    && !failing
                {
                    tracing::error!(
                        backend = transport.backend(),
                        error,
                        "the spool's checkpoint stays while the backend cannot sync"
                    );
                }
                failing = saved.is_err();
            }
        })
    }

    /// Lets the next instance open the folder (after the last checkpoint).
    pub fn release_folder(&self) {
        self.lock.lock().unwrap_or_else(|p| p.into_inner()).take();
    }

    /// Stops taking messages; returns once the writer has stored what it was given.
    pub async fn close_writer(&self) {
        self.writer.lock().unwrap_or_else(|p| p.into_inner()).take();
        let thread = self.thread.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(thread) = thread {
            let _ = tokio::task::spawn_blocking(move || thread.join()).await;
        }
    }
}

/// Syncs the backend, then removes the delivered segments and writes the checkpoint, if
/// it moved since the last time; a failure is tried again next time (one to write is
/// logged here, one to sync is returned).
async fn save_checkpoint(shared: &Shared, transport: &dyn Transport) -> Result<(), String> {
    let Some(at) = ({
        let mut acks = shared.acks();
        std::mem::take(&mut acks.moved).then_some(acks.checkpoint)
    }) else {
        return Ok(());
    };
    // Every batch before `at` was accepted before this sync started.
    if let Err(error) = transport.sync().await {
        shared.acks().moved = true;
        return Err(error);
    }
    let directory = shared.directory.clone();
    let saved = tokio::task::spawn_blocking(move || {
        // Delivered segments go first (kept as spares, or removed): a start from an
        // older checkpoint skips to the first segment left.
        let delivered = segments(&directory)?
            .into_iter()
            .take_while(|(segment, _)| *segment < at.segment);
        let spares = numbered(&directory, SPARE_SUFFIX)?.len();
        for (spare, (segment, _)) in (spares..).zip(delivered) {
            let path = segment_path(&directory, segment);
            match spare < SPARES {
                true => std::fs::rename(&path, numbered_path(&directory, segment, SPARE_SUFFIX))?,
                false => std::fs::remove_file(&path)?,
            }
        }
        write_checkpoint(&directory, at)
    })
    .await
    .unwrap_or_else(|e| Err(std::io::Error::other(e)));
    if let Err(error) = saved {
        shared.acks().moved = true;
        tracing::error!(directory = %shared.directory.display(), %error, "spool: cannot write the checkpoint");
    }
    Ok(())
}

/// The writer thread's state.
struct Writer {
    shared: Arc<Shared>,
    segment_bytes: u64,
    commit_delay: Duration,
    /// The group's frames (kept between groups: written from the same memory each time).
    buffer: Vec<u8>,
    file: File,
    /// The end of what is stored.
    at: Position,
    /// A failed write could not be cut off: the next write starts a new segment.
    broken: bool,
    committed: watch::Sender<Position>,
}

impl Writer {
    fn run(mut self, appends: &flume::Receiver<Append>) {
        while let Ok(first) = appends.recv() {
            // Sleeping (rather than waiting on the channel) lets the appends arriving
            // meanwhile queue up without waking the thread for each.
            if !self.commit_delay.is_zero() {
                std::thread::sleep(self.commit_delay);
            }
            let mut bytes = first.bytes;
            let mut group = vec![first];
            while bytes < GROUP_BYTES {
                let Ok(next) = appends.try_recv() else {
                    break;
                };
                bytes += next.bytes;
                group.push(next);
            }
            let outcome = self.write(&group).map_err(|e| e.to_string());
            match outcome {
                Ok(start) => {
                    self.keep_fresh(start, &mut group);
                    self.committed.send_replace(self.at);
                    self.shared.failure().take();
                }
                Err(ref error) => {
                    self.shared.write_errors.increment(1);
                    let mut failure = self.shared.failure();
                    if failure.is_none() {
                        tracing::error!(
                            directory = %self.shared.directory.display(),
                            error,
                            "spool: cannot store messages; publishing is refused until a write succeeds"
                        );
                    }
                    *failure = Some(error.clone());
                }
            }
            let outcome = outcome.map(|_| ());
            for append in group {
                let _ = append.done.send(outcome.clone());
            }
        }
        // A reused segment ends at its last frame, so that the next start finds nothing
        // after it to remove.
        if !self.broken {
            let _ = self.cut_to_end();
        }
    }

    /// Cuts what a reused segment held before off the end of what is stored.
    fn cut_to_end(&self) -> std::io::Result<()> {
        if self.file.metadata()?.len() > self.at.offset {
            self.file.set_len(self.at.offset)?;
            self.file.sync_all()?;
        }
        Ok(())
    }

    /// Writes the group after what is stored and syncs it; answers where it starts. On
    /// failure cuts it off again.
    fn write(&mut self, group: &[Append]) -> std::io::Result<Position> {
        if self.broken || (self.at.offset >= self.segment_bytes && self.at.offset > 0) {
            self.next_segment()?;
        }
        self.buffer.clear();
        for message in group.iter().flat_map(|append| &append.messages) {
            encode(message, self.at.segment, &mut self.buffer);
        }
        let written = self
            .file
            .write_all_at(&self.buffer, self.at.offset)
            .and_then(|()| self.file.sync_data());
        self.shared.syncs.increment(1);
        match written {
            Ok(()) => {
                let start = self.at;
                self.shared.written.increment(self.buffer.len() as u64);
                self.at.offset += self.buffer.len() as u64;
                Ok(start)
            }
            Err(error) => {
                if self.file.set_len(self.at.offset).is_err() {
                    self.broken = true;
                }
                Err(error)
            }
        }
    }

    /// Hands the group's messages, stored from `at` on, to the reader through memory, as
    /// far as [`FRESH_BYTES`] allows; the reader reads the others from the log.
    fn keep_fresh(&self, mut at: Position, group: &mut [Append]) {
        let mut fresh = self.shared.fresh();
        for append in group {
            let (start, bytes) = (at, append.bytes);
            at.offset += bytes as u64;
            if fresh.bytes + bytes > FRESH_BYTES {
                continue;
            }
            let mut end = start;
            let messages = std::mem::take(&mut append.messages)
                .into_iter()
                .map(|message| {
                    end.offset += frame_len(&message) as u64;
                    (message, end)
                })
                .collect();
            fresh.bytes += bytes;
            fresh.appends.push_back(Stored {
                start,
                messages,
                bytes,
            });
        }
    }

    /// Ends the segment at its last frame and starts the next, in a spare if there is one.
    fn next_segment(&mut self) -> std::io::Result<()> {
        if !self.broken {
            // The reader reads a finished segment to its end.
            self.cut_to_end()?;
        }
        let directory = &self.shared.directory;
        let segment = self.at.segment + 1;
        let path = segment_path(directory, segment);
        let spare = numbered(directory, SPARE_SUFFIX).ok().and_then(|spares| {
            spares
                .first()
                .map(|&(n, _)| numbered_path(directory, n, SPARE_SUFFIX))
        });
        let file = match spare.map(|spare| std::fs::rename(spare, &path)) {
            Some(Ok(())) => OpenOptions::new().write(true).open(&path)?,
            _ => OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .open(&path)?,
        };
        sync_folder(directory)?;
        self.file = file;
        self.at = Position { segment, offset: 0 };
        self.broken = false;
        Ok(())
    }
}

/// The reading side: follows the writer from the checkpoint on, through memory while it
/// keeps up and through the log otherwise.
pub(crate) struct SpoolReader {
    shared: Arc<Shared>,
    committed: watch::Receiver<Position>,
    /// The next byte to read.
    at: Position,
    file: Option<Arc<File>>,
    /// Bytes the next read takes.
    wanted: usize,
    /// Read and not yet handed out: each message with where its frame starts and ends.
    ready: VecDeque<(OutboundMessage, Position, Position)>,
}

impl SpoolReader {
    /// The next batch within `limits`, once the log has one; `None` once the writer has
    /// stopped and everything was handed out.
    pub async fn next_batch(
        &mut self,
        limits: BatchLimits,
    ) -> Option<(Vec<OutboundMessage>, Span)> {
        while self.ready.is_empty() {
            if !self.fill().await {
                return None;
            }
        }
        let (first, start, mut end) = self.ready.pop_front()?;
        let mut bytes = first.size();
        let mut batch = vec![first];
        while batch.len() < limits.max_messages {
            match self.ready.front() {
                Some((next, _, _)) if bytes + next.size() <= limits.max_bytes => {}
                _ => break,
            }
            let Some((next, _, next_end)) = self.ready.pop_front() else {
                break;
            };
            bytes += next.size();
            end = next_end;
            batch.push(next);
        }
        let span = Span {
            start,
            end,
            bytes: if start.segment == end.segment {
                end.offset - start.offset
            } else {
                // Frames across two segments: count them one by one.
                batch.iter().map(|m| frame_len(m) as u64).sum()
            },
        };
        self.shared.acks().open.insert(start, (span, false));
        Some((batch, span))
    }

    /// Reads more of the log into `ready`; false once there is no more and will be none.
    async fn fill(&mut self) -> bool {
        loop {
            let committed = *self.committed.borrow_and_update();
            if self.at >= committed {
                if self.committed.changed().await.is_err() && self.at >= *self.committed.borrow() {
                    return false;
                }
                continue;
            }
            if let Some(stored) = self.shared.take_fresh(self.at) {
                for (message, end) in stored.messages {
                    self.ready.push_back((message, self.at, end));
                    self.at = end;
                }
                return true;
            }
            let finished = self.at.segment < committed.segment;
            let file = match &self.file {
                Some(file) => file.clone(),
                None => {
                    let path = segment_path(&self.shared.directory, self.at.segment);
                    match File::open(&path) {
                        Ok(file) => self.file.insert(Arc::new(file)).clone(),
                        Err(error) => {
                            tracing::error!(segment = %path.display(), %error, "spool: cannot open a segment; skipped");
                            self.next_segment();
                            continue;
                        }
                    }
                }
            };
            let len = match finished {
                true => self.wanted,
                false => self
                    .wanted
                    .min((committed.offset - self.at.offset) as usize),
            };
            let offset = self.at.offset;
            let data = tokio::task::spawn_blocking(move || read_at(&file, offset, len))
                .await
                .unwrap_or_else(|e| Err(std::io::Error::other(e)));
            let data = match data {
                Ok(data) => data,
                Err(error) => {
                    tracing::error!(%error, "spool: cannot read a segment; retrying");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
            };
            let decoded = decode(&data, self.at.segment);
            for (message, end) in decoded.messages {
                let start = self.at;
                self.at.offset = offset + end as u64;
                self.ready.push_back((message, start, self.at));
            }
            self.wanted = decoded.wanted.unwrap_or(READ_BYTES).max(READ_BYTES);
            let at_end = data.len() < len;
            if decoded.damaged || (finished && at_end && decoded.consumed < data.len()) {
                // What a write left that cannot be read: skip the rest of the segment
                // (the live one: up to what is stored).
                let skipped = match finished {
                    true => {
                        std::fs::metadata(segment_path(&self.shared.directory, self.at.segment))
                            .map_or(0, |m| m.len().saturating_sub(self.at.offset))
                    }
                    false => committed.offset - self.at.offset,
                };
                tracing::error!(
                    segment = self.at.segment,
                    offset = self.at.offset,
                    bytes = skipped,
                    "spool: damaged data skipped"
                );
                self.shared.corrupt.increment(skipped);
                self.shared.release(skipped);
                match finished {
                    true => self.next_segment(),
                    false => self.at.offset = committed.offset,
                }
            } else if finished && at_end && decoded.consumed == data.len() {
                self.next_segment();
            }
            if !self.ready.is_empty() {
                return true;
            }
        }
    }

    fn next_segment(&mut self) {
        self.file = None;
        self.at = Position {
            segment: self.at.segment + 1,
            offset: 0,
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every other message carries a `traceparent`.
    fn message(n: usize) -> OutboundMessage {
        OutboundMessage {
            id: format!("m{n}"),
            body: format!("{{\"n\":{n}}}"),
            traceparent: (n % 2 == 1)
                .then(|| format!("00-4bf92f3577b34da6a3ce929d0e0e{n:04x}-00f067aa0ba902b7-01")),
        }
    }

    #[test]
    fn frames_decode_to_what_was_encoded_and_a_cut_or_damaged_frame_is_found() {
        let mut data = Vec::new();
        for n in 0..3 {
            encode(&message(n), 7, &mut data);
        }
        let whole = decode(&data, 7);
        assert_eq!(
            whole
                .messages
                .iter()
                .map(|(m, _)| m.clone())
                .collect::<Vec<_>>(),
            (0..3).map(message).collect::<Vec<_>>()
        );
        assert_eq!(whole.consumed, data.len());
        assert!(!whole.damaged && whole.wanted.is_none());

        let cut = decode(&data[..data.len() - 3], 7);
        assert_eq!(cut.messages.len(), 2);
        assert!(cut.wanted.is_some() && !cut.damaged);

        let mut damaged = data.clone();
        let last = damaged.len() - 2;
        damaged[last] ^= 0x20;
        let found = decode(&damaged, 7);
        assert_eq!(found.messages.len(), 2);
        assert!(found.damaged);

        let elsewhere = decode(&data, 8);
        assert!(elsewhere.messages.is_empty() && elsewhere.damaged);
    }

    #[tokio::test]
    async fn what_a_reused_segment_held_before_is_not_read_after_a_crash() {
        let dir = tempfile::tempdir().expect("tempdir");
        // Segment 3 reused segment 1's file: two new frames written over its start, then
        // the crash; four whole frames of segment 1 follow (all frames the same size).
        let mut data = Vec::new();
        for n in 10..12 {
            encode(&message(n), 3, &mut data);
        }
        let mut old = Vec::new();
        for n in 20..26 {
            encode(&message(n), 1, &mut old);
        }
        data.extend_from_slice(&old[data.len()..]);
        std::fs::write(segment_path(dir.path(), 3), &data).expect("write");

        let config = SpoolConfig {
            directory: dir.path().to_path_buf(),
            ..SpoolConfig::default()
        };
        let Opened {
            spool,
            mut reader,
            waiting,
        } = Spool::open(&config).expect("opens");
        assert_eq!(waiting, 2);
        let limits = BatchLimits {
            max_messages: 100,
            max_bytes: 1 << 20,
            max_in_flight: 1,
        };
        let (batch, _) = reader.next_batch(limits).await.expect("a batch");
        assert_eq!(batch, [message(10), message(11)]);
        spool.append(vec![message(12)]).await.expect("stored");
        let (batch, _) = reader.next_batch(limits).await.expect("a batch");
        assert_eq!(batch, [message(12)]);
        spool.close_writer().await;
        assert!(reader.next_batch(limits).await.is_none());
    }
}
