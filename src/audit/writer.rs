//! The writer: one thread owns the log file. Records arrive over a channel; each batch is
//! chained, written and made durable with one `fdatasync` (group commit), then acknowledged.
//! Checkpoints are signed by the audit key every N records or T seconds. A failed write is
//! rolled back (the file is cut to its last good length) and reported, and the log stays
//! unhealthy until a write succeeds again.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender, channel};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine;
use hsmca_hsm::Signer;
use tokio::sync::oneshot;

use super::{CHECKPOINT_CONTEXT, GENESIS, Kind, Record, log_files, sha256_hex};

/// How the log is kept.
#[derive(Debug, Clone)]
pub struct AuditOptions {
    /// Seal at least every this many records.
    pub checkpoint_every: u64,
    /// Seal at least this often while records are unsealed.
    pub checkpoint_interval: Duration,
    /// Start a new file above this size.
    pub max_file_bytes: u64,
}

impl Default for AuditOptions {
    fn default() -> Self {
        AuditOptions {
            checkpoint_every: 64,
            checkpoint_interval: Duration::from_secs(2),
            max_file_bytes: 64 * 1024 * 1024,
        }
    }
}

/// Why a record could not be made durable.
#[derive(Debug, Clone, thiserror::Error)]
#[error("audit log unavailable: {0}")]
pub struct AuditError(pub String);

type Ack = oneshot::Sender<Result<u64, AuditError>>;

enum Msg {
    Append(Box<Record>, Option<Ack>),
    Stop(oneshot::Sender<()>),
}

/// A handle to the audit log.
pub struct AuditLog {
    /// An exclusive lock on `DIR/.lock`: one writer per log.
    _lock: File,
    tx: Mutex<Option<Sender<Msg>>>,
    healthy: Arc<AtomicBool>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
}

struct State {
    dir: PathBuf,
    file: File,
    index: u32,
    size: u64,
    prev: String,
    seq: u64,
    unsealed: u64,
    last_seal: Instant,
    sealer: Option<Arc<dyn Signer>>,
    key_id: Option<String>,
    options: AuditOptions,
    healthy: Arc<AtomicBool>,
    seal_failing: bool,
    pending_seal: Option<Receiver<Result<Vec<u8>, String>>>,
}

/// How long a checkpoint waits for the audit key to sign.
const SEAL_WAIT: Duration = Duration::from_secs(1);

fn file_name(index: u32) -> String {
    format!("audit-{index:06}.jsonl")
}

fn now_rfc3339() -> String {
    jiff::Timestamp::now().to_string()
}

impl AuditLog {
    /// Opens (or creates) the log in `dir`, recovering a torn last line, and starts the writer.
    /// `sealer` signs checkpoints; without one, no checkpoints are written.
    pub fn open(
        dir: &Path,
        sealer: Option<Arc<dyn Signer>>,
        options: AuditOptions,
    ) -> Result<AuditLog, AuditError> {
        let io = |what: &str, e: std::io::Error| AuditError(format!("{what}: {e}"));
        std::fs::create_dir_all(dir).map_err(|e| io(&dir.display().to_string(), e))?;
        let lock = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .open(dir.join(".lock"))
            .map_err(|e| io("opening the audit lock", e))?;
        if lock.try_lock().is_err() {
            return Err(AuditError(format!(
                "{} is in use by another hsmca process: one CA writes one audit log",
                dir.display()
            )));
        }
        let files = log_files(dir).map_err(|e| io("listing the audit directory", e))?;
        let (index, path) = match files.last() {
            Some(p) => {
                let n = p
                    .file_name()
                    .and_then(|n| n.to_str())
                    .and_then(|n| n[6..12].parse().ok())
                    .unwrap_or(1);
                (n, p.clone())
            }
            None => (1, dir.join(file_name(1))),
        };
        let mut file = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .open(&path)
            .map_err(|e| io(&path.display().to_string(), e))?;
        let mut content = Vec::new();
        file.read_to_end(&mut content)
            .map_err(|e| io("reading the audit log", e))?;
        // Find the chain head: the last complete line of this file (or of the previous file).
        let complete = content
            .iter()
            .rposition(|b| *b == b'\n')
            .map_or(0, |i| i + 1);
        let torn = content[complete..].to_vec();
        let (prev, seq) = match last_line(&content[..complete]) {
            Some(line) => {
                let rec: Record = serde_json::from_slice(line).map_err(|e| {
                    AuditError(format!(
                        "{}: last complete record does not parse: {e}",
                        path.display()
                    ))
                })?;
                (sha256_hex(line), rec.seq + 1)
            }
            None => match files.len() {
                n if n >= 2 => {
                    let before = std::fs::read(&files[n - 2])
                        .map_err(|e| io("reading the previous audit file", e))?;
                    let line = last_line(&before)
                        .ok_or_else(|| AuditError("previous audit file is empty".into()))?;
                    let rec: Record =
                        serde_json::from_slice(line).map_err(|e| AuditError(e.to_string()))?;
                    (sha256_hex(line), rec.seq + 1)
                }
                _ => (GENESIS.to_string(), 0),
            },
        };
        let mut recovered = None;
        if !torn.is_empty() {
            let aside = dir.join(format!(
                "torn-{}-{}.bin",
                file_name(index),
                jiff::Timestamp::now().as_second()
            ));
            crate::files::write_atomic(&aside, &torn, 0o600, crate::files::Overwrite::Never)
                .map_err(|e| io("keeping the torn line aside", e))?;
            file.set_len(complete as u64)
                .map_err(|e| io("cutting the torn line", e))?;
            file.sync_all()
                .map_err(|e| io("syncing the audit log", e))?;
            tracing::warn!(file = %path.display(), bytes = torn.len(), kept = %aside.display(), "audit log ended in a torn line; kept it aside");
            recovered = Some(format!(
                "{} bytes, sha256 {}, kept in {}",
                torn.len(),
                sha256_hex(&torn),
                aside.display()
            ));
        }
        file.seek(SeekFrom::End(0)).map_err(|e| io("seeking", e))?;
        let key_id = sealer
            .as_ref()
            .map(|s| sha256_hex(s.public_key().spki_der()));
        let mut state = State {
            dir: dir.to_owned(),
            file,
            index,
            size: complete as u64,
            prev,
            seq,
            unsealed: 0,
            last_seal: Instant::now(),
            sealer,
            key_id,
            options,
            healthy: Arc::new(AtomicBool::new(true)),
            seal_failing: false,
            pending_seal: None,
        };
        if let Some(torn) = recovered {
            state
                .write_batch(vec![(
                    Box::new(Record {
                        kind: Kind::Recovered,
                        torn: Some(torn),
                        ..Default::default()
                    }),
                    None,
                )])
                .map_err(AuditError)?;
        }
        let healthy = state.healthy.clone();
        let (tx, rx) = channel();
        let thread = std::thread::Builder::new()
            .name("audit-writer".into())
            .spawn(move || run(state, rx))
            .map_err(|e| io("starting the audit writer", e))?;
        Ok(AuditLog {
            _lock: lock,
            tx: Mutex::new(Some(tx)),
            healthy,
            thread: Mutex::new(Some(thread)),
        })
    }

    /// True when the last write succeeded.
    pub fn is_healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }

    fn send(&self, msg: Msg) -> bool {
        match self.tx.lock().unwrap_or_else(|p| p.into_inner()).as_ref() {
            Some(tx) => tx.send(msg).is_ok(),
            None => false,
        }
    }

    /// Appends a record without waiting (it becomes durable with the next batch).
    pub fn append(&self, record: Record) {
        self.send(Msg::Append(Box::new(record), None));
    }

    /// Appends a record and waits until it is on disk; returns its sequence number.
    pub async fn append_durable(&self, record: Record) -> Result<u64, AuditError> {
        let (ack, done) = oneshot::channel();
        if !self.send(Msg::Append(Box::new(record), Some(ack))) {
            return Err(AuditError("the audit writer has stopped".into()));
        }
        done.await
            .map_err(|_| AuditError("the audit writer has stopped".into()))?
    }

    /// Blocking twin of [`AuditLog::append_durable`], for code outside the async runtime.
    pub fn append_durable_blocking(&self, record: Record) -> Result<u64, AuditError> {
        let (ack, done) = oneshot::channel();
        if !self.send(Msg::Append(Box::new(record), Some(ack))) {
            return Err(AuditError("the audit writer has stopped".into()));
        }
        done.blocking_recv()
            .map_err(|_| AuditError("the audit writer has stopped".into()))?
    }

    /// Writes a `stop` record and a final checkpoint, and stops the writer.
    pub fn close(&self) {
        let (ack, done) = oneshot::channel();
        if self.send(Msg::Stop(ack)) {
            let _ = done.blocking_recv();
        }
        self.tx.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(t) = self.thread.lock().unwrap_or_else(|p| p.into_inner()).take() {
            let _ = t.join();
        }
    }
}

fn last_line(content: &[u8]) -> Option<&[u8]> {
    let body = content.strip_suffix(b"\n")?;
    let start = body.iter().rposition(|b| *b == b'\n').map_or(0, |i| i + 1);
    Some(&body[start..])
}

fn run(mut state: State, rx: Receiver<Msg>) {
    loop {
        let wait = if state.unsealed > 0 && state.sealer.is_some() {
            state
                .options
                .checkpoint_interval
                .saturating_sub(state.last_seal.elapsed())
        } else {
            Duration::from_secs(3600)
        };
        let first = match rx.recv_timeout(wait) {
            Ok(m) => Some(m),
            Err(RecvTimeoutError::Timeout) => None,
            Err(RecvTimeoutError::Disconnected) => return,
        };
        let mut batch = Vec::new();
        let mut stop = None;
        let mut push = |m: Msg, batch: &mut Vec<(Box<Record>, Option<Ack>)>| match m {
            Msg::Append(r, a) => batch.push((r, a)),
            Msg::Stop(a) => stop = Some(a),
        };
        if let Some(m) = first {
            push(m, &mut batch);
            while batch.len() < 4096 {
                match rx.try_recv() {
                    Ok(m) => push(m, &mut batch),
                    Err(_) => break,
                }
            }
        }
        if stop.is_some() {
            batch.push((
                Box::new(Record {
                    kind: Kind::Stop,
                    ..Default::default()
                }),
                None,
            ));
        }
        let seal_due = state.sealer.is_some()
            && (state.unsealed > 0 || !batch.is_empty())
            && (stop.is_some() || state.last_seal.elapsed() >= state.options.checkpoint_interval);
        if batch.is_empty() && !seal_due {
            continue;
        }
        if let Err(e) = state.write_batch_sealing(batch, seal_due) {
            tracing::error!(error = %e, "audit log write failed: the CA refuses to issue until it succeeds");
        }
        if let Some(ack) = stop {
            let _ = ack.send(());
            return;
        }
    }
}

impl State {
    fn write_batch(&mut self, batch: Vec<(Box<Record>, Option<Ack>)>) -> Result<(), String> {
        self.write_batch_sealing(batch, false)
    }

    /// Chains, writes and syncs a batch (adding checkpoints where due), then acknowledges it.
    /// On failure the file is cut back and every record of the batch is refused.
    fn write_batch_sealing(
        &mut self,
        batch: Vec<(Box<Record>, Option<Ack>)>,
        seal_at_end: bool,
    ) -> Result<(), String> {
        let (start_prev, start_seq, start_unsealed, start_size) =
            (self.prev.clone(), self.seq, self.unsealed, self.size);
        let mut buf = Vec::with_capacity(batch.len() * 512);
        let mut acks = Vec::with_capacity(batch.len());
        let mut result = Ok(());
        for (mut record, ack) in batch {
            self.chain(&mut record, &mut buf);
            acks.push((ack, record.seq));
            if self.sealer.is_some() && self.unsealed >= self.options.checkpoint_every {
                let sealed = self.checkpoint(&mut buf);
                self.note_seal(sealed);
            }
        }
        if seal_at_end && self.unsealed > 0 {
            let sealed = self.checkpoint(&mut buf);
            self.note_seal(sealed);
        }
        if let Err(e) = self
            .file
            .write_all(&buf)
            .and_then(|()| self.file.sync_data())
        {
            let _ = self.file.set_len(start_size);
            let _ = self.file.seek(SeekFrom::End(0));
            self.prev = start_prev;
            self.seq = start_seq;
            self.unsealed = start_unsealed;
            result = Err(format!("writing {}: {e}", self.dir.display()));
        } else {
            self.size += buf.len() as u64;
        }
        // Health is known before anyone learns the outcome of this batch.
        self.healthy.store(result.is_ok(), Ordering::Relaxed);
        for (ack, seq) in acks {
            if let Some(ack) = ack {
                let _ = ack.send(result.clone().map(|()| seq).map_err(AuditError));
            }
        }
        if result.is_ok()
            && self.size >= self.options.max_file_bytes
            && let Err(e) = self.rotate()
        {
            tracing::error!(error = %e, "audit log rotation failed; continuing in the current file");
        }
        result
    }

    /// Logs a failing seal once, and its recovery, instead of at every batch.
    fn note_seal(&mut self, sealed: Result<(), String>) {
        match (sealed, self.seal_failing) {
            (Err(e), false) => {
                tracing::error!(error = %e, "audit checkpoint could not be signed; records stay unsealed until the audit key signs again");
                self.seal_failing = true;
            }
            (Ok(()), true) => {
                tracing::info!("audit checkpoints are signed again");
                self.seal_failing = false;
            }
            _ => {}
        }
    }

    fn chain(&mut self, record: &mut Record, buf: &mut Vec<u8>) {
        record.v = 1;
        record.seq = self.seq;
        record.time = now_rfc3339();
        record.prev = std::mem::take(&mut self.prev);
        let line = serde_json::to_vec(record).expect("a record serialises");
        self.prev = sha256_hex(&line);
        self.seq += 1;
        if record.kind != Kind::Checkpoint {
            self.unsealed += 1;
        }
        buf.extend_from_slice(&line);
        buf.push(b'\n');
    }

    fn checkpoint(&mut self, buf: &mut Vec<u8>) -> Result<(), String> {
        let Some(sealer) = self.sealer.clone() else {
            return Ok(());
        };
        let mut record = Record {
            v: 1,
            seq: self.seq,
            time: now_rfc3339(),
            prev: self.prev.clone(),
            kind: Kind::Checkpoint,
            key_id: self.key_id.clone(),
            sig: Some(String::new()),
            ..Default::default()
        };
        let unsigned = serde_json::to_vec(&record).expect("a record serialises");
        let mut message = CHECKPOINT_CONTEXT.to_vec();
        message.extend_from_slice(&unsigned);
        let sig = self.seal(sealer, message)?;
        record.sig = Some(base64::engine::general_purpose::STANDARD.encode(sig));
        let line = serde_json::to_vec(&record).expect("a record serialises");
        self.prev = sha256_hex(&line);
        self.seq += 1;
        self.unsealed = 0;
        self.last_seal = Instant::now();
        buf.extend_from_slice(&line);
        buf.push(b'\n');
        Ok(())
    }

    /// Signs a checkpoint on a helper thread and waits at most [`SEAL_WAIT`]: a hung HSM must
    /// not stop the log (records are written unsealed; verify reports the unsealed tail). While
    /// an earlier signature is still outstanding, no new one is asked for.
    fn seal(&mut self, sealer: Arc<dyn Signer>, message: Vec<u8>) -> Result<Vec<u8>, String> {
        if let Some(pending) = &self.pending_seal {
            match pending.try_recv() {
                Err(std::sync::mpsc::TryRecvError::Empty) => {
                    return Err("the audit key has not answered an earlier checkpoint yet".into());
                }
                _ => self.pending_seal = None,
            }
        }
        let (tx, rx) = channel();
        std::thread::Builder::new()
            .name("audit-seal".into())
            .spawn(move || {
                let _ = tx.send(sealer.sign(&message).map_err(|e| e.to_string()));
            })
            .map_err(|e| e.to_string())?;
        match rx.recv_timeout(SEAL_WAIT) {
            Ok(result) => result,
            Err(_) => {
                self.pending_seal = Some(rx);
                Err(format!(
                    "the audit key did not sign within {}s",
                    SEAL_WAIT.as_secs_f64()
                ))
            }
        }
    }

    fn rotate(&mut self) -> std::io::Result<()> {
        let next = self.dir.join(file_name(self.index + 1));
        let file = OpenOptions::new()
            .read(true)
            .append(true)
            .create_new(true)
            .open(&next)?;
        File::open(&self.dir)?.sync_all()?;
        self.file = file;
        self.index += 1;
        self.size = 0;
        Ok(())
    }
}
