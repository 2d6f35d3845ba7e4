//! A snapshot's life in the store: the intent to create it and its outcome, the intent to remove
//! it, a removal given back, its labels; each one transaction over the snapshot and device
//! records.

use std::collections::BTreeMap;

use sled::transaction::{abort, TransactionalTree};
use sled::Transactional;

use super::*;

impl Store {
    /// Records the intent to create snapshot `new.key`: checks that the key is free and the parent
    /// is a committed snapshot, allocates a thin id, and stores the snapshot and device records in
    /// state Creating, all in one transaction.
    ///
    /// Returns AlreadyExists if the key is taken, NotFound if the parent does not exist,
    /// FailedPrecondition if it is not committed, or NoFreeThinId.
    pub fn begin_create(
        &self,
        new: &NewSnapshot,
        base: &BaseRecord,
    ) -> Result<CreatePlan, StoreError> {
        let plan = (&self.snapshots, &self.devices, &self.meta).transaction(
            |(snapshots, devices, meta)| {
                if snapshots.get(new.key.as_bytes())?.is_some() {
                    return abort(StoreError::AlreadyExists(new.key.clone()));
                }
                let (origin, size, origin_mapped, parent) = claim_parent(snapshots, new, base)?;
                if let (Some(p), Some(parent)) = (&new.parent, &parent) {
                    snapshots.insert(p.as_bytes(), enc(parent))?;
                }
                if let Some(want) = new.size {
                    if want < size {
                        return abort(StoreError::SizeBelowParent {
                            key: new.key.clone(),
                            want,
                            parent: size,
                        });
                    }
                }
                let parent_size = size;
                let size = new.size.unwrap_or(size);
                let thin_id = allocate_id(devices, meta)?;
                let rec = new.record(State::Creating, thin_id, size, origin_mapped);
                snapshots.insert(new.key.as_bytes(), enc(&rec))?;
                let dev = DeviceRecord {
                    thin_id,
                    state: State::Creating,
                    size,
                    origin: Some(origin),
                    owner: new.key.clone(),
                    roll_forward: new.roll_forward,
                    commit: None,
                };
                devices.insert(&id_key(thin_id), enc(&dev))?;
                Ok(CreatePlan {
                    thin_id,
                    origin,
                    size,
                    parent_size,
                    origin_mapped,
                })
            },
        )?;
        Ok(plan)
    }

    /// Marks a created snapshot and its device Ready.
    pub fn finish_create(&self, key: &str) -> Result<(), StoreError> {
        (&self.snapshots, &self.devices).transaction(|(snapshots, devices)| {
            let Some(v) = snapshots.get(key.as_bytes())? else {
                return abort(StoreError::NotFound(key.to_string()));
            };
            let mut rec: SnapshotRecord = tx_dec(key, &v)?;
            rec.state = State::Ready;
            snapshots.insert(key.as_bytes(), enc(&rec))?;
            set_device_state(devices, rec.thin_id, State::Ready)?;
            Ok(())
        })?;
        Ok(())
    }

    /// Forgets a snapshot whose creation was undone, with its device record and children entry.
    pub fn forget_snapshot(&self, key: &str) -> Result<(), StoreError> {
        self.drop_snapshot(key, DeviceFate::Forget)
    }

    /// Drops the record of a snapshot whose creation is being undone, keeping its device record
    /// in state Deleting so the thin id is not reused before the device is reaped.
    pub fn forget_snapshot_keep_device(&self, key: &str) -> Result<(), StoreError> {
        self.drop_snapshot(key, DeviceFate::Deleting)
    }

    /// Drops snapshot `key` (nothing to do if it is not there) and its parent's child count;
    /// its device record is dropped too or marked Deleting, as `device` says.
    fn drop_snapshot(&self, key: &str, device: DeviceFate) -> Result<(), StoreError> {
        (&self.snapshots, &self.devices).transaction(|(snapshots, devices)| {
            let Some(v) = snapshots.remove(key.as_bytes())? else {
                return Ok(());
            };
            let rec: SnapshotRecord = tx_dec(key, &v)?;
            if let Some(p) = &rec.parent {
                release_child(snapshots, p)?;
            }
            match device {
                DeviceFate::Forget => {
                    devices.remove(&id_key(rec.thin_id))?;
                }
                DeviceFate::Deleting => {
                    if devices.get(id_key(rec.thin_id))?.is_some() {
                        set_device_state(devices, rec.thin_id, State::Deleting)?;
                    }
                }
            }
            Ok(())
        })?;
        Ok(())
    }

    /// Marks a device record Deleting (recovery found it orphaned).
    pub fn mark_deleting(&self, id: ThinId) -> Result<(), StoreError> {
        self.devices
            .transaction(|devices| set_device_state(devices, id, State::Deleting))?;
        Ok(())
    }

    /// Forgets a device record (its thin device is gone from the pool).
    pub fn forget_device(&self, id: ThinId) -> Result<(), StoreError> {
        self.devices.remove(id_key(id))?;
        Ok(())
    }

    /// Removes snapshot `key` for clients and marks its device Deleting, and its warm spares
    /// (the returned record's `spares`) too; the caller deletes the spares' thin devices, then
    /// its own, and calls [`Store::forget_device`] for each.
    ///
    /// Returns NotFound if `key` is not there, FailedPrecondition if it has children.
    pub fn begin_remove(&self, key: &str) -> Result<SnapshotRecord, StoreError> {
        let rec = (&self.snapshots, &self.devices).transaction(|(snapshots, devices)| {
            let rec = ready_snapshot(snapshots, key)?;
            if rec.children > 0 {
                return abort(StoreError::FailedPrecondition(format!(
                    "snapshot {key:?} has {} child snapshot(s); remove them first",
                    rec.children
                )));
            }
            snapshots.remove(key.as_bytes())?;
            if let Some(p) = &rec.parent {
                release_child(snapshots, p)?;
            }
            set_device_state(devices, rec.thin_id, State::Deleting)?;
            spares::mark_spares_deleting(snapshots, devices, &rec)?;
            Ok(rec)
        })?;
        Ok(rec)
    }

    /// Gives back snapshot `key` as it was before [`Store::begin_remove`] returned `rec`: its
    /// device could not be deleted. The caller holds the key and its parent locked.
    ///
    /// Returns AlreadyExists if the key was taken meanwhile, or Invariant if the parent or the
    /// device record is gone.
    pub fn restore_removed(&self, key: &str, rec: &SnapshotRecord) -> Result<(), StoreError> {
        (&self.snapshots, &self.devices).transaction(|(snapshots, devices)| {
            if snapshots.get(key.as_bytes())?.is_some() {
                return abort(StoreError::AlreadyExists(key.to_string()));
            }
            if let Some(p) = &rec.parent {
                let Some(v) = snapshots.get(p.as_bytes())? else {
                    return abort(StoreError::Invariant(format!(
                        "parent {p:?} of {key:?} went while {key:?} was being removed"
                    )));
                };
                let mut parent: SnapshotRecord = tx_dec(p.clone(), &v)?;
                parent.children += 1;
                snapshots.insert(p.as_bytes(), enc(&parent))?;
            }
            set_device_state(devices, rec.thin_id, State::Ready)?;
            // Its spares went with the Remove (Deleting, reaped): not given back.
            let mut rec = rec.clone();
            rec.spares.clear();
            snapshots.insert(key.as_bytes(), enc(&rec))?;
            Ok(())
        })?;
        Ok(())
    }

    /// Replaces the labels of `key`.
    ///
    /// Returns NotFound if there is no such snapshot.
    pub fn set_labels(
        &self,
        key: &str,
        labels: BTreeMap<String, String>,
        now: u64,
    ) -> Result<SnapshotRecord, StoreError> {
        let rec = self.snapshots.transaction(|snapshots| {
            let Some(v) = snapshots.get(key.as_bytes())? else {
                return abort(StoreError::NotFound(key.to_string()));
            };
            let mut rec: SnapshotRecord = tx_dec(key, &v)?;
            if rec.state != State::Ready {
                return abort(StoreError::NotFound(key.to_string()));
            }
            rec.labels = labels.clone();
            rec.updated_at = now;
            snapshots.insert(key.as_bytes(), enc(&rec))?;
            Ok(rec)
        })?;
        Ok(rec)
    }
}

/// What [`Store::drop_snapshot`] does with the snapshot's device record.
#[derive(Clone, Copy)]
enum DeviceFate {
    /// The device never existed or is gone: drop its record.
    Forget,
    /// The device may exist: keep its record, Deleting, until it is reaped.
    Deleting,
}

/// The origin of a new snapshot of `new.parent` (or of the base): its thin id, size and mapped
/// bytes, with the parent's record as it must be written (one more child). Writes nothing.
///
/// Aborts with NotFound if the parent does not exist, FailedPrecondition if it is not committed
/// or is quarantined.
pub(super) fn claim_parent(
    snapshots: &TransactionalTree,
    new: &NewSnapshot,
    base: &BaseRecord,
) -> TxResult<(ThinId, u64, u64, Option<SnapshotRecord>)> {
    let Some(p) = &new.parent else {
        return Ok((base.thin_id, base.size, base.mapped, None));
    };
    let Some(v) = snapshots.get(p.as_bytes())? else {
        return abort(StoreError::NotFound(p.clone()));
    };
    let mut parent: SnapshotRecord = tx_dec(p.clone(), &v)?;
    if parent.state != State::Ready {
        return abort(StoreError::NotFound(p.clone()));
    }
    if parent.kind != Kind::Committed {
        return abort(StoreError::FailedPrecondition(format!(
            "parent {p:?} is not a committed snapshot (it is {})",
            parent.kind.as_str()
        )));
    }
    // A quarantined parent's thin id is gone (or unusable): a snapshot of it would fail, or
    // snapshot someone else's device.
    if let Some(q) = &parent.quarantine {
        return abort(StoreError::FailedPrecondition(q.refusal(p, parent.thin_id)));
    }
    // The count in the parent's record makes "has children" transactional: a concurrent Remove
    // of the parent conflicts with this write.
    parent.children += 1;
    Ok((parent.thin_id, parent.size, parent.mapped, Some(parent)))
}

pub(super) fn ready_snapshot(snapshots: &TransactionalTree, key: &str) -> TxResult<SnapshotRecord> {
    let Some(v) = snapshots.get(key.as_bytes())? else {
        return abort(StoreError::NotFound(key.to_string()));
    };
    let rec: SnapshotRecord = tx_dec(key, &v)?;
    if rec.state != State::Ready {
        return abort(StoreError::NotFound(key.to_string()));
    }
    Ok(rec)
}

fn release_child(snapshots: &TransactionalTree, parent: &str) -> TxResult<()> {
    if let Some(v) = snapshots.get(parent.as_bytes())? {
        let mut p: SnapshotRecord = tx_dec(parent, &v)?;
        p.children = p.children.saturating_sub(1);
        snapshots.insert(parent.as_bytes(), enc(&p))?;
    }
    Ok(())
}

pub(super) fn set_device_state(
    devices: &TransactionalTree,
    id: ThinId,
    state: State,
) -> TxResult<()> {
    let Some(v) = devices.get(id_key(id))? else {
        return abort(StoreError::Invariant(format!(
            "thin id {id} has no device record"
        )));
    };
    let mut dev: DeviceRecord = tx_dec(format!("device {id}"), &v)?;
    dev.state = state;
    devices.insert(&id_key(id), enc(&dev))?;
    Ok(())
}
