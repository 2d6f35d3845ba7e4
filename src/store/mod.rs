//! The sled database: snapshot records, device records, thin id allocation, the base device and
//! a schema version.
//!
//! Only this module imports `sled`. Every method that changes more than one record does it in one
//! sled transaction across the trees, so a reader never sees half an operation; nothing is durable
//! until [`Store::flush`] returns (sled's background flush is off), and a flush makes every write
//! before it durable. The engine flushes a call's intent before it touches the kernel; the
//! outcome is durable with the next flush. [`Store::flushes`] counts them. The store knows
//! nothing of the kernel.

mod commit;
mod quarantine;
pub mod records;
mod snapshots;
mod spares;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use sled::transaction::{abort, ConflictableTransactionError, TransactionError, TransactionalTree};
use sled::Transactional;

pub use records::{
    BaseRecord, CommitIntent, DeviceRecord, Kind, Quarantine, SnapshotRecord, State, BASE_OWNER,
    SPARE_OWNER,
};

use crate::model::{ThinId, MAX_THIN_ID};
use snapshots::{claim_parent, ready_snapshot, set_device_state};

/// The layout version this code reads and writes. A database of an older version is migrated at
/// open ([`MIGRATIONS`]); a newer one is refused.
pub const SCHEMA_VERSION: u32 = 2;

/// The release that writes the database, recorded at every open (schema 2 on): what a refusal
/// of a newer database names.
pub const WRITER: &str = concat!("thinsnap ", env!("CARGO_PKG_VERSION"));

const META_SCHEMA: &[u8] = b"schema_version";
const META_WRITER: &[u8] = b"writer";
const META_NEXT_ID: &[u8] = b"next_thin_id";
const META_BASE: &[u8] = b"base";
/// The pool's transaction id as of the last flush (pools thinsnap owns; see pool::txid).
const META_POOL_TXID: &[u8] = b"pool_transaction_id";
/// The identity of the pool this database belongs to (text made by the pool layer).
const META_POOL_IDENTITY: &[u8] = b"pool_identity";
/// Thin ids adopted as someone else's (`thinsnap pool adopt --keep-foreign`): never deleted,
/// never allocated. Big-endian u32s.
const META_FOREIGN: &[u8] = b"foreign_thin_ids";

/// One step of the schema: from version `from` to `from + 1`. A step must be safe to run again
/// (a crash between the step and the flush of its new version runs it twice).
struct Migration {
    from: u32,
    what: &'static str,
    run: fn(&Store) -> Result<(), StoreError>,
}

/// Every step, oldest first: a database of any older version is brought to [`SCHEMA_VERSION`]
/// by the steps from its own version on. Fixtures of each older version live in
/// `src/store/fixtures/` (`engine::tests::upgrade`).
const MIGRATIONS: &[Migration] = &[Migration {
    from: 1,
    what: "record the release that writes the database",
    run: |store| {
        // Additive: schema 1 had no writer; the refusal of a newer database names it from now on.
        if store.meta.get(META_WRITER)?.is_none() {
            store.meta.insert(META_WRITER, WRITER.as_bytes())?;
        }
        Ok(())
    },
}];

/// Errors of the store. Semantic ones name the key; the engine maps them to gRPC codes.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("snapshot {0:?} not found")]
    NotFound(String),
    #[error("snapshot {0:?} already exists")]
    AlreadyExists(String),
    #[error("{0}")]
    FailedPrecondition(String),
    /// A snapshot's size label asks for less than its parent's size.
    #[error("size {want} of snapshot {key:?} is smaller than its parent's {parent}")]
    SizeBelowParent { key: String, want: u64, parent: u64 },
    /// The database contradicts itself (a record pointing at one that is not there): ours to
    /// fix, never the caller's precondition.
    #[error("broken invariant: {0}")]
    Invariant(String),
    #[error("no free thin id left in the 24-bit space")]
    NoFreeThinId,
    /// Written by a newer release: an older one never guesses at a layout it does not know.
    #[error("database at {path} has schema version {found} (written by {writer}); this {WRITER} reads schema versions up to {supported}: run {writer} or newer, or move the database away to start empty")]
    Newer {
        path: String,
        found: u32,
        supported: u32,
        writer: String,
    },
    #[error("database at {path}: unreadable schema version {raw:?}")]
    BadSchema { path: String, raw: Vec<u8> },
    #[error("database at {path}: migrating schema {from} to {to} ({what}): {source}")]
    Migration {
        path: String,
        from: u32,
        to: u32,
        what: &'static str,
        source: Box<StoreError>,
    },
    #[error("corrupt record {what}: {source}")]
    Corrupt {
        what: String,
        source: serde_json::Error,
    },
    #[error("database at {path}: {source}")]
    Open { path: String, source: sled::Error },
    #[error("database: {0}")]
    Db(#[from] sled::Error),
    #[error("database flush task failed: {0}")]
    FlushTask(String),
}

impl From<TransactionError<StoreError>> for StoreError {
    fn from(e: TransactionError<StoreError>) -> Self {
        match e {
            TransactionError::Abort(e) => e,
            TransactionError::Storage(e) => StoreError::Db(e),
        }
    }
}

type TxResult<T> = Result<T, ConflictableTransactionError<StoreError>>;

fn enc<T: serde::Serialize>(v: &T) -> Vec<u8> {
    serde_json::to_vec(v).expect("records serialize to JSON infallibly")
}

fn dec<T: serde::de::DeserializeOwned>(
    what: impl Into<String>,
    bytes: &[u8],
) -> Result<T, StoreError> {
    serde_json::from_slice(bytes).map_err(|source| StoreError::Corrupt {
        what: what.into(),
        source,
    })
}

fn tx_dec<T: serde::de::DeserializeOwned>(what: impl Into<String>, bytes: &[u8]) -> TxResult<T> {
    dec(what, bytes).or_else(abort)
}

fn id_key(id: ThinId) -> [u8; 4] {
    id.get().to_be_bytes()
}

/// A new snapshot to record (see [`Store::begin_create`]).
#[derive(Debug, Clone)]
pub struct NewSnapshot {
    pub key: String,
    pub kind: Kind,
    pub parent: Option<String>,
    pub labels: BTreeMap<String, String>,
    pub now: u64,
    /// A device larger than the parent's (the size label); None: the parent's size.
    pub size: Option<u64>,
    /// The call answers before its outcome is durable: see [`DeviceRecord::roll_forward`].
    pub roll_forward: bool,
}

impl NewSnapshot {
    /// The record of this new snapshot in `state`, on thin device `thin_id` of `size` bytes
    /// whose origin had `origin_mapped` bytes mapped.
    fn record(
        &self,
        state: State,
        thin_id: ThinId,
        size: u64,
        origin_mapped: u64,
    ) -> SnapshotRecord {
        SnapshotRecord {
            kind: self.kind,
            state,
            parent: self.parent.clone(),
            labels: self.labels.clone(),
            created_at: self.now,
            updated_at: self.now,
            thin_id,
            size,
            origin_mapped,
            mapped: 0,
            children: 0,
            quarantine: None,
            spares: Vec::new(),
        }
    }
}

/// What [`Store::begin_create`] decided.
#[derive(Debug, Clone, PartialEq)]
pub struct CreatePlan {
    pub thin_id: ThinId,
    /// The thin id to snapshot: the parent's, or the base's.
    pub origin: ThinId,
    pub size: u64,
    /// The origin's size: when `size` is larger, the filesystem must be grown.
    pub parent_size: u64,
    pub origin_mapped: u64,
}

/// The sled database. Cheap to clone.
#[derive(Clone)]
pub struct Store {
    db: sled::Db,
    snapshots: sled::Tree,
    devices: sled::Tree,
    meta: sled::Tree,
    /// Durable writes (sled flushes, each an fsync on a disk) made through this handle and its
    /// clones: [`Store::flushes`].
    flushes: Arc<AtomicU64>,
}

impl Store {
    /// Opens (or creates) the database at `path` and checks its schema version.
    ///
    /// Returns an error if the database cannot be opened (another process holds it) or was
    /// written by an incompatible version.
    pub fn open(path: &Path) -> Result<Store, StoreError> {
        let db = sled::Config::new()
            .path(path)
            .mode(sled::Mode::LowSpace)
            // sled's default page cache is 1 GiB. A record is ~200 bytes: 10,000 snapshots fit
            // many times over in 16 MiB, and resident memory stays small on a busy node.
            .cache_capacity(16 * 1024 * 1024)
            // No background flush every 500 ms: a write is durable when the engine flushes it,
            // never earlier by chance, so every fsync is one the engine asked for (and counted)
            // and the crash tests meet the windows the design has, not fewer.
            .flush_every_ms(None)
            .open()
            .map_err(|source| StoreError::Open {
                path: path.display().to_string(),
                source,
            })?;
        let store = Store {
            snapshots: db.open_tree("snapshots")?,
            devices: db.open_tree("devices")?,
            meta: db.open_tree("meta")?,
            db,
            flushes: Arc::new(AtomicU64::new(0)),
        };
        store.upgrade(path)?;
        Ok(store)
    }

    /// Brings the database at `path` to [`SCHEMA_VERSION`]: a new one is stamped, an older one
    /// migrated one step at a time (each step durable with its new version before the next), and
    /// the release that writes it recorded ([`WRITER`]).
    ///
    /// Returns an error if the database is newer than this code ([`StoreError::Newer`]), its
    /// version is unreadable, or a step fails (the database then stays at the last version
    /// reached, which a retry migrates on from).
    fn upgrade(&self, path: &Path) -> Result<(), StoreError> {
        let path_s = || path.display().to_string();
        let mut version = match self.meta.get(META_SCHEMA)? {
            None => {
                self.meta
                    .insert(META_SCHEMA, &SCHEMA_VERSION.to_be_bytes())?;
                self.meta.insert(META_WRITER, WRITER.as_bytes())?;
                self.db.flush()?;
                return Ok(());
            }
            Some(v) => match <[u8; 4]>::try_from(v.as_ref()) {
                Ok(b) => u32::from_be_bytes(b),
                Err(_) => {
                    return Err(StoreError::BadSchema {
                        path: path_s(),
                        raw: v.to_vec(),
                    })
                }
            },
        };
        if version > SCHEMA_VERSION {
            let writer = self
                .meta
                .get(META_WRITER)?
                .map(|w| String::from_utf8_lossy(&w).into_owned())
                .unwrap_or_else(|| "a newer thinsnap".to_string());
            return Err(StoreError::Newer {
                path: path_s(),
                found: version,
                supported: SCHEMA_VERSION,
                writer,
            });
        }
        while version < SCHEMA_VERSION {
            let step = MIGRATIONS
                .iter()
                .find(|m| m.from == version)
                .expect("MIGRATIONS has a step from every version below SCHEMA_VERSION");
            let to = version + 1;
            (step.run)(self).map_err(|e| StoreError::Migration {
                path: path_s(),
                from: version,
                to,
                what: step.what,
                source: Box::new(e),
            })?;
            self.meta.insert(META_SCHEMA, &to.to_be_bytes())?;
            self.db.flush()?;
            tracing::info!(path = %path.display(), from = version, to, step = step.what, "database migrated");
            version = to;
        }
        if self.meta.get(META_WRITER)?.as_deref() != Some(WRITER.as_bytes()) {
            self.meta.insert(META_WRITER, WRITER.as_bytes())?;
            self.db.flush()?;
        }
        Ok(())
    }

    /// The release that last opened the database for writing ([`WRITER`]), if recorded.
    ///
    /// Returns an error if the database cannot be read.
    pub fn writer(&self) -> Result<Option<String>, StoreError> {
        Ok(self
            .meta
            .get(META_WRITER)?
            .map(|w| String::from_utf8_lossy(&w).into_owned()))
    }

    /// Makes every change so far durable.
    ///
    /// Returns an error if the write-ahead log cannot be synced.
    pub async fn flush(&self) -> Result<(), StoreError> {
        // Not sled's `flush_async`: in sled 0.34 (the latest release) concurrent `flush_async`
        // futures can all stay pending for ever (spacejam/sled#1241, #1308; fixed only on sled's
        // unreleased main), which hung every call of the daemon under concurrent load. The
        // blocking flush, on the blocking pool, is safe to call from many threads at once and
        // shares the log writes of concurrent callers.
        let store = self.clone();
        tokio::task::spawn_blocking(move || store.flush_sync())
            .await
            .map_err(|e| StoreError::FlushTask(e.to_string()))?
    }

    /// Blocking form of [`Store::flush`], for start-up and shutdown.
    pub fn flush_sync(&self) -> Result<(), StoreError> {
        self.flushes.fetch_add(1, Ordering::Relaxed);
        self.db.flush()?;
        Ok(())
    }

    /// How many flushes ([`Store::flush`], [`Store::flush_sync`]) were asked of this store since
    /// it was opened: the durable writes, each an fsync of sled's log on a disk.
    pub fn flushes(&self) -> u64 {
        self.flushes.load(Ordering::Relaxed)
    }

    /// The snapshot stored under `key`, in any state.
    pub fn get(&self, key: &str) -> Result<Option<SnapshotRecord>, StoreError> {
        self.snapshots
            .get(key.as_bytes())?
            .map(|v| dec(key, &v))
            .transpose()
    }

    /// Every snapshot record, in key order.
    pub fn snapshots(&self) -> Result<Vec<(String, SnapshotRecord)>, StoreError> {
        self.snapshots
            .iter()
            .map(|kv| {
                let (k, v) = kv?;
                let key = String::from_utf8_lossy(&k).into_owned();
                let rec = dec(key.clone(), &v)?;
                Ok((key, rec))
            })
            .collect()
    }

    /// The device record of thin id `id`.
    pub fn device(&self, id: ThinId) -> Result<Option<DeviceRecord>, StoreError> {
        self.devices
            .get(id_key(id))?
            .map(|v| dec(format!("device {id}"), &v))
            .transpose()
    }

    /// Every device record, in thin id order.
    pub fn devices(&self) -> Result<Vec<DeviceRecord>, StoreError> {
        self.devices
            .iter()
            .map(|kv| {
                let (k, v) = kv?;
                dec(format!("device {k:?}"), &v)
            })
            .collect()
    }

    /// The base device, once made.
    pub fn base(&self) -> Result<Option<BaseRecord>, StoreError> {
        self.meta
            .get(META_BASE)?
            .map(|v| dec("base", &v))
            .transpose()
    }

    /// The pool's transaction id recorded with the last flush, if any.
    pub fn pool_transaction_id(&self) -> Result<Option<u64>, StoreError> {
        Ok(self.meta.get(META_POOL_TXID)?.and_then(|v| {
            let bytes: [u8; 8] = v.as_ref().try_into().ok()?;
            Some(u64::from_be_bytes(bytes))
        }))
    }

    /// Records the pool's transaction id; durable with the next flush, together with (sled
    /// recovers a prefix of the writes) everything written before it.
    pub fn set_pool_transaction_id(&self, id: u64) -> Result<(), StoreError> {
        self.meta.insert(META_POOL_TXID, &id.to_be_bytes())?;
        Ok(())
    }

    /// The identity of the pool this database belongs to, recorded at its first start with it
    /// (None: a new database, or one written by a release that did not record it).
    pub fn pool_identity(&self) -> Result<Option<String>, StoreError> {
        Ok(self
            .meta
            .get(META_POOL_IDENTITY)?
            .map(|v| String::from_utf8_lossy(&v).into_owned()))
    }

    /// Records the identity of the pool this database belongs to; durable with the next flush.
    pub fn set_pool_identity(&self, identity: &str) -> Result<(), StoreError> {
        self.meta.insert(META_POOL_IDENTITY, identity.as_bytes())?;
        Ok(())
    }

    /// Forgets the recorded pool identity, as a database of the previous release has none.
    #[cfg(test)]
    pub(crate) fn forget_pool_identity(&self) -> Result<(), StoreError> {
        self.meta.remove(META_POOL_IDENTITY)?;
        self.flush_sync()
    }

    /// Thin ids adopted as someone else's: recovery never deletes them and they are never
    /// allocated.
    pub fn foreign_ids(&self) -> Result<std::collections::BTreeSet<ThinId>, StoreError> {
        Ok(self
            .meta
            .get(META_FOREIGN)?
            .map(|v| decode_ids(&v))
            .unwrap_or_default())
    }

    /// Adds `ids` to the adopted foreign thin ids, and makes every later thin id larger than
    /// theirs; durable with the next flush.
    pub fn add_foreign_ids(
        &self,
        ids: &std::collections::BTreeSet<ThinId>,
    ) -> Result<(), StoreError> {
        let mut all = self.foreign_ids()?;
        all.extend(ids.iter().copied());
        let bytes: Vec<u8> = all.iter().flat_map(|id| id.get().to_be_bytes()).collect();
        self.meta.insert(META_FOREIGN, bytes)?;
        if let Some(&max) = ids.iter().max() {
            self.allocate_past(max)?;
        }
        Ok(())
    }

    /// Allocates a thin id and records a device in state Creating for `owner` (used for the base
    /// device, whose snapshot record does not exist).
    ///
    /// Returns [`StoreError::NoFreeThinId`] when the 24-bit space is exhausted.
    pub fn begin_device(&self, owner: &str, size: u64) -> Result<ThinId, StoreError> {
        let id = (&self.devices, &self.meta).transaction(|(devices, meta)| {
            let id = allocate_id(devices, meta)?;
            let rec = DeviceRecord {
                thin_id: id,
                state: State::Creating,
                size,
                origin: None,
                owner: owner.to_string(),
                roll_forward: false,
                commit: None,
            };
            devices.insert(&id_key(id), enc(&rec))?;
            Ok(id)
        })?;
        Ok(id)
    }

    /// Makes every later thin id larger than `id` (unless the ids wrap): a shared pool's
    /// foreign ids, read at start, are then never tried (ids are handed out in increasing order).
    pub fn allocate_past(&self, id: ThinId) -> Result<(), StoreError> {
        let next = id.get().saturating_add(1) & MAX_THIN_ID.get();
        (&self.meta,).transaction(|(meta,)| {
            let now = match meta.get(META_NEXT_ID)? {
                Some(v) => u32::from_be_bytes(v.as_ref().try_into().unwrap_or([0; 4])),
                None => 0,
            };
            if now <= id.get() {
                meta.insert(META_NEXT_ID, &next.to_be_bytes())?;
            }
            Ok(())
        })?;
        Ok(())
    }

    /// Records the finished base device and marks its device record Ready.
    pub fn set_base(&self, base: &BaseRecord) -> Result<(), StoreError> {
        (&self.devices, &self.meta).transaction(|(devices, meta)| {
            set_device_state(devices, base.thin_id, State::Ready)?;
            meta.insert(META_BASE, enc(base))?;
            Ok(())
        })?;
        Ok(())
    }
}

/// The thin ids of a [`META_FOREIGN`] value.
fn decode_ids(bytes: &[u8]) -> std::collections::BTreeSet<ThinId> {
    bytes
        .chunks_exact(4)
        .filter_map(|c| ThinId::new(u32::from_be_bytes(c.try_into().ok()?)))
        .collect()
}

/// Takes the next thin id not held by any device record: the one place thin ids are made
/// ([`ThinId::new`], within dm-thin's 24 bits). Ids are handed out in increasing order and wrap
/// at 2^24, so an id is not reused soon after it was freed; one with a record (whatever its
/// state) is never reused.
fn allocate_id(devices: &TransactionalTree, meta: &TransactionalTree) -> TxResult<ThinId> {
    let mut next = match meta.get(META_NEXT_ID)? {
        Some(v) => u32::from_be_bytes(v.as_ref().try_into().unwrap_or([0; 4])),
        None => 0,
    };
    let foreign = meta
        .get(META_FOREIGN)?
        .map(|v| decode_ids(&v))
        .unwrap_or_default();
    let mask = MAX_THIN_ID.get();
    for _ in 0..=mask {
        let n = next & mask;
        next = (n + 1) & mask;
        let candidate = ThinId::new(n).expect("masked to dm-thin's 24 bits");
        if !foreign.contains(&candidate) && devices.get(id_key(candidate))?.is_none() {
            meta.insert(META_NEXT_ID, &next.to_be_bytes())?;
            return Ok(candidate);
        }
    }
    abort(StoreError::NoFreeThinId)
}

/// The schema version recorded in the database at `path`, read without migrating it (tests of
/// upgrades). Like [`open_after_drop`], a database still locked by a handle just dropped is
/// tried again for up to two seconds. Returns an error if it cannot be opened by then or records
/// no version.
#[cfg(test)]
pub(crate) fn schema_version_at(path: &Path) -> Result<u32, StoreError> {
    retry_while_locked(|| {
        let db = sled::Config::new().path(path).open()?;
        let v = db.open_tree("meta")?.get(META_SCHEMA)?.ok_or_else(|| {
            StoreError::Invariant(format!("no schema version in {}", path.display()))
        })?;
        Ok(u32::from_be_bytes(
            v.as_ref().try_into().unwrap_or([0xff; 4]),
        ))
    })
}

/// [`Store::open`] for tests that open a database right after dropping it: sled's threads may
/// hold its file lock a few milliseconds longer, so a locked database is tried again (for up to
/// two seconds) instead of failing the test.
///
/// Panics if it cannot be opened by then.
#[cfg(test)]
pub(crate) fn open_after_drop(path: &Path) -> Store {
    retry_while_locked(|| Store::open(path))
        .unwrap_or_else(|e| panic!("store {}: {e}", path.display()))
}

/// Whether `e` is sled's refusal of a database whose file lock another handle holds (sled 0.34
/// reports it only as an io::Error of kind Other with this message; config.rs).
#[cfg(test)]
fn is_locked(e: &StoreError) -> bool {
    match e {
        StoreError::Open { source, .. } | StoreError::Db(source) => {
            matches!(source, sled::Error::Io(io) if io.to_string().starts_with("could not acquire lock"))
        }
        _ => false,
    }
}

/// Runs `open` until it succeeds, fails otherwise than on sled's file lock, or two seconds have
/// passed; returns its result then. Tests only: sled's background threads keep a dropped
/// database's lock for a moment, and under load (CI's shared machine) that moment was long
/// enough to fail a test that opened the database once.
#[cfg(test)]
fn retry_while_locked<T>(mut open: impl FnMut() -> Result<T, StoreError>) -> Result<T, StoreError> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
    let mut said = false;
    loop {
        match open() {
            Err(e) if is_locked(&e) && std::time::Instant::now() < deadline => {
                if !said {
                    eprintln!("database still locked by a dropped handle ({e}); trying again");
                    said = true;
                }
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            other => return other,
        }
    }
}

#[cfg(test)]
mod tests;
