//! The typed records kept in sled, serialized as JSON (readable with any sled dump, and
//! tolerant of added fields through `#[serde(default)]`).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

pub use crate::model::Kind;
use crate::model::ThinId;

/// Whether the kernel side of a record is known to exist.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum State {
    /// Intent recorded; the kernel may or may not have the device yet. Invisible to clients.
    Creating,
    /// The device exists; the record is what clients see.
    Ready,
    /// The snapshot is gone for clients; the thin device is still to be deleted.
    Deleting,
}

/// A snapshot, keyed by its key (active, view) or name (committed).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SnapshotRecord {
    pub kind: Kind,
    pub state: State,
    /// Key of the committed parent, if any.
    #[serde(default)]
    pub parent: Option<String>,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Nanoseconds since the Unix epoch.
    pub created_at: u64,
    pub updated_at: u64,
    pub thin_id: ThinId,
    /// Virtual size of the device in bytes.
    pub size: u64,
    /// Bytes the parent (or base) had mapped when this snapshot was made: Usage subtracts them.
    #[serde(default)]
    pub origin_mapped: u64,
    /// Committed snapshots: bytes mapped by the device at commit time.
    #[serde(default)]
    pub mapped: u64,
    /// How many snapshots name this one as parent (Remove refuses while non-zero).
    #[serde(default)]
    pub children: u32,
    /// Set when the snapshot's device cannot be used (its thin id is gone from the pool, the
    /// kernel refuses it): its calls answer FailedPrecondition with the reason; Remove clears it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quarantine: Option<Quarantine>,
    /// Committed snapshots: thin ids of the warm spares made of this one (device records owned
    /// by [`SPARE_OWNER`]): Remove marks them Deleting in its own transaction.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub spares: Vec<ThinId>,
}

/// Why a snapshot is quarantined (see [`SnapshotRecord::quarantine`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Quarantine {
    pub reason: String,
    /// The pool has no thin device of this id any more: Remove must not send it a delete (the id
    /// may be someone else's by now), only drop the records.
    #[serde(default)]
    pub thin_id_gone: bool,
    /// Nanoseconds since the Unix epoch.
    #[serde(default)]
    pub since: u64,
}

impl Quarantine {
    /// What a call on quarantined snapshot `key` (thin id `id`) is told.
    pub fn refusal(&self, key: &str, id: crate::model::ThinId) -> String {
        format!(
            "snapshot {key:?} (thin id {id}) is quarantined: {}; remove it",
            self.reason
        )
    }
}

/// A thin device of the pool, keyed by thin id.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeviceRecord {
    pub thin_id: ThinId,
    pub state: State,
    pub size: u64,
    /// The thin id it is a snapshot of (None for the base).
    #[serde(default)]
    pub origin: Option<ThinId>,
    /// The snapshot key that owns it, or [`BASE_OWNER`].
    pub owner: String,
    /// State Creating only: the call answers before its outcome is durable, so recovery
    /// completes it (the record becomes Ready) when the pool has the thin device, and undoes it
    /// otherwise. False (and records written before this field): recovery always undoes it.
    #[serde(default)]
    pub roll_forward: bool,
    /// A Commit of the owning active snapshot whose intent is durable: recovery completes it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub commit: Option<CommitIntent>,
}

/// What a Commit records before it touches the kernel (see `Store::begin_commit`): everything
/// the committed record needs, so recovery can finish the Commit without the kernel.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CommitIntent {
    /// The name the snapshot is committed under.
    pub name: String,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Bytes mapped by the device, read before the intent.
    pub mapped: u64,
    /// Nanoseconds since the Unix epoch.
    pub now: u64,
}

/// Owner name of the base device's record.
pub const BASE_OWNER: &str = "<base>";

/// Owner name of a warm spare's device record (a thin snapshot of `origin` made ahead of a
/// Prepare or View; see `engine::spares`). Recognised by this owner *and* by no snapshot record
/// holding its thin id: keys are opaque, a client may use this name too.
pub const SPARE_OWNER: &str = "<spare>";

/// The base device every parentless snapshot is a thin snapshot of.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BaseRecord {
    pub thin_id: ThinId,
    pub fs_type: String,
    pub size: u64,
    /// Bytes mapped by the formatted base device.
    pub mapped: u64,
}
