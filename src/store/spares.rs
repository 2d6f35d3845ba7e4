//! Warm spares in the store: a spare is a device record owned by [`SPARE_OWNER`] whose `origin`
//! is the thin id it is a snapshot of; a committed origin lists its spares in its own record
//! (`SnapshotRecord::spares`), so Remove marks them Deleting in its own transaction (sled's
//! transactional trees cannot be scanned). Each step is one transaction; taking a spare turns
//! its device record into the new snapshot's, and fails (no change) unless the spare is still
//! there and Ready, so no spare is handed out twice.

use sled::transaction::{abort, TransactionalTree};
use sled::Transactional;

use super::{
    allocate_id, claim_parent, enc, id_key, set_device_state, tx_dec, BaseRecord, DeviceRecord,
    Kind, NewSnapshot, SnapshotRecord, State, Store, StoreError, TxResult, SPARE_OWNER,
};
use crate::model::ThinId;

/// Reads the device record of `id` if it is a spare's: owned by [`SPARE_OWNER`], and not the
/// device of a client's snapshot that happens to be named so.
fn spare_record(
    snapshots: &TransactionalTree,
    devices: &TransactionalTree,
    id: ThinId,
) -> TxResult<Option<DeviceRecord>> {
    let Some(v) = devices.get(id_key(id))? else {
        return Ok(None);
    };
    let dev: DeviceRecord = tx_dec(format!("device {id}"), &v)?;
    if dev.owner != SPARE_OWNER {
        return Ok(None);
    }
    if let Some(v) = snapshots.get(SPARE_OWNER.as_bytes())? {
        let named: SnapshotRecord = tx_dec(SPARE_OWNER, &v)?;
        if named.thin_id == id {
            return Ok(None);
        }
    }
    Ok(Some(dev))
}

/// Marks Deleting every spare that `rec` (a snapshot being removed) lists and that is still a
/// spare of its thin id (a stale entry naming a reused id is left alone).
pub(super) fn mark_spares_deleting(
    snapshots: &TransactionalTree,
    devices: &TransactionalTree,
    rec: &SnapshotRecord,
) -> TxResult<()> {
    for &id in &rec.spares {
        if let Some(dev) = spare_record(snapshots, devices, id)? {
            if dev.origin == Some(rec.thin_id) {
                set_device_state(devices, id, State::Deleting)?;
            }
        }
    }
    Ok(())
}

/// Drops `id` from the spare list of `parent`, if it is there.
fn unlist(snapshots: &TransactionalTree, parent: Option<&str>, id: ThinId) -> TxResult<()> {
    let Some(p) = parent else { return Ok(()) };
    if let Some(v) = snapshots.get(p.as_bytes())? {
        let mut rec: SnapshotRecord = tx_dec(p, &v)?;
        if rec.spares.contains(&id) {
            rec.spares.retain(|&s| s != id);
            snapshots.insert(p.as_bytes(), enc(&rec))?;
        }
    }
    Ok(())
}

impl Store {
    /// Records the intent to make a spare of `parent` (None: of the base, `origin`): allocates
    /// a thin id, stores its device record in state Creating and lists it in the parent's record.
    ///
    /// Returns FailedPrecondition if the parent is not a Ready, committed, unquarantined
    /// snapshot of thin id `origin` any more, or NoFreeThinId.
    pub fn begin_spare(
        &self,
        parent: Option<&str>,
        origin: ThinId,
        size: u64,
    ) -> Result<ThinId, StoreError> {
        let id = (&self.snapshots, &self.devices, &self.meta).transaction(
            |(snapshots, devices, meta)| {
                let mut parent_rec = None;
                if let Some(p) = parent {
                    let rec = match snapshots.get(p.as_bytes())? {
                        Some(v) => Some(tx_dec::<SnapshotRecord>(p, &v)?),
                        None => None,
                    };
                    let usable = rec.as_ref().is_some_and(|r| {
                        r.state == State::Ready
                            && r.kind == Kind::Committed
                            && r.quarantine.is_none()
                            && r.thin_id == origin
                    });
                    if !usable {
                        return abort(StoreError::FailedPrecondition(format!(
                            "no spare of {p:?}: not a committed snapshot of thin id {origin} any more"
                        )));
                    }
                    parent_rec = rec;
                }
                let id = allocate_id(devices, meta)?;
                let dev = DeviceRecord {
                    thin_id: id,
                    state: State::Creating,
                    size,
                    origin: Some(origin),
                    owner: SPARE_OWNER.to_string(),
                    roll_forward: false,
                    commit: None,
                };
                devices.insert(&id_key(id), enc(&dev))?;
                if let (Some(p), Some(mut rec)) = (parent, parent_rec) {
                    rec.spares.push(id);
                    snapshots.insert(p.as_bytes(), enc(&rec))?;
                }
                Ok(id)
            },
        )?;
        Ok(id)
    }

    /// Marks spare `id` Ready once its device is made and active.
    ///
    /// Returns false (and changes nothing) if it is no longer a spare in state Creating (a
    /// Remove of its parent marked it Deleting meanwhile).
    pub fn finish_spare(&self, id: ThinId) -> Result<bool, StoreError> {
        let done =
            (&self.snapshots, &self.devices).transaction(
                |(snapshots, devices)| match spare_record(snapshots, devices, id)? {
                    Some(dev) if dev.state == State::Creating => {
                        set_device_state(devices, id, State::Ready)?;
                        Ok(true)
                    }
                    _ => Ok(false),
                },
            )?;
        Ok(done)
    }

    /// Gives up spare `id` of `parent`: its device record goes to state Deleting (the caller
    /// reaps it) and off the parent's list.
    ///
    /// Returns false if it is no longer a spare (taken, or already forgotten).
    pub fn drop_spare(&self, id: ThinId, parent: Option<&str>) -> Result<bool, StoreError> {
        let dropped = (&self.snapshots, &self.devices).transaction(|(snapshots, devices)| {
            unlist(snapshots, parent, id)?;
            if spare_record(snapshots, devices, id)?.is_none() {
                return Ok(false);
            }
            set_device_state(devices, id, State::Deleting)?;
            Ok(true)
        })?;
        Ok(dropped)
    }

    /// Forgets spare `id` of `parent` whose thin device was never made.
    pub fn forget_spare(&self, id: ThinId, parent: Option<&str>) -> Result<(), StoreError> {
        (&self.snapshots, &self.devices).transaction(|(snapshots, devices)| {
            unlist(snapshots, parent, id)?;
            if spare_record(snapshots, devices, id)?.is_some() {
                devices.remove(&id_key(id))?;
            }
            Ok(())
        })?;
        Ok(())
    }

    /// Prepare or View on a warm spare: in one transaction, checks what [`Store::begin_create`]
    /// checks, and turns spare `id` (Ready, a snapshot of the parent's thin id, of its size)
    /// into snapshot `new.key`, Ready, with its parent's child count raised.
    ///
    /// Returns Ok(None), changing nothing, if `id` is not such a spare any more (taken by
    /// another call, being removed with its parent); AlreadyExists, NotFound or
    /// FailedPrecondition as [`Store::begin_create`] does.
    pub fn take_spare(
        &self,
        new: &NewSnapshot,
        base: &BaseRecord,
        id: ThinId,
    ) -> Result<Option<SnapshotRecord>, StoreError> {
        let taken = (&self.snapshots, &self.devices).transaction(|(snapshots, devices)| {
            if snapshots.get(new.key.as_bytes())?.is_some() {
                return abort(StoreError::AlreadyExists(new.key.clone()));
            }
            let (origin, size, origin_mapped, parent) = claim_parent(snapshots, new, base)?;
            let Some(mut dev) = spare_record(snapshots, devices, id)? else {
                return Ok(None);
            };
            if dev.state != State::Ready || dev.origin != Some(origin) || dev.size != size {
                return Ok(None);
            }
            if let (Some(p), Some(mut parent)) = (&new.parent, parent) {
                parent.spares.retain(|&s| s != id);
                snapshots.insert(p.as_bytes(), enc(&parent))?;
            }
            let rec = new.record(State::Ready, id, size, origin_mapped);
            snapshots.insert(new.key.as_bytes(), enc(&rec))?;
            dev.owner = new.key.clone();
            dev.roll_forward = false;
            devices.insert(&id_key(id), enc(&dev))?;
            Ok(Some(rec))
        })?;
        Ok(taken)
    }

    /// Empties the spare list of snapshot `key` (start-up: no spare survives a restart).
    pub fn clear_spare_list(&self, key: &str) -> Result<(), StoreError> {
        self.snapshots.transaction(|snapshots| {
            if let Some(v) = snapshots.get(key.as_bytes())? {
                let mut rec: SnapshotRecord = tx_dec(key, &v)?;
                if !rec.spares.is_empty() {
                    rec.spares.clear();
                    snapshots.insert(key.as_bytes(), enc(&rec))?;
                }
            }
            Ok(())
        })?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::store::BASE_OWNER;

    fn setup() -> (tempfile::TempDir, Store, BaseRecord) {
        let dir = tempfile::tempdir().expect("tempdir");
        let s = Store::open(&dir.path().join("db")).expect("open");
        let id = s.begin_device(BASE_OWNER, 1 << 30).expect("base id");
        let b = BaseRecord {
            thin_id: id,
            fs_type: "ext4".into(),
            size: 1 << 30,
            mapped: 4096,
        };
        s.set_base(&b).expect("set base");
        (dir, s, b)
    }

    fn new(key: &str, parent: Option<&str>) -> NewSnapshot {
        NewSnapshot {
            key: key.to_string(),
            kind: Kind::Active,
            parent: parent.map(str::to_string),
            labels: BTreeMap::new(),
            now: 7,
            size: None,
            roll_forward: false,
        }
    }

    fn committed(s: &Store, b: &BaseRecord, name: &str) -> ThinId {
        let a = format!("{name}-active");
        let plan = s.begin_create(&new(&a, None), b).expect("create");
        s.finish_create(&a).expect("finish");
        s.commit(&a, name, BTreeMap::new(), 0, 1).expect("commit");
        plan.thin_id
    }

    #[test]
    fn a_spare_is_taken_once_and_becomes_the_snapshot() {
        let (_d, s, b) = setup();
        let c = committed(&s, &b, "c");
        let id = s.begin_spare(Some("c"), c, 1 << 30).expect("spare");
        assert_eq!(s.get("c").expect("get").expect("c").spares, vec![id]);
        // Not Ready yet: not taken.
        assert_eq!(s.take_spare(&new("x", Some("c")), &b, id).expect("t"), None);
        assert!(s.finish_spare(id).expect("finish"));
        let rec = s
            .take_spare(&new("x", Some("c")), &b, id)
            .expect("take")
            .expect("taken");
        assert_eq!((rec.thin_id, rec.state), (id, State::Ready));
        let parent = s.get("c").expect("get").expect("c");
        assert_eq!((parent.children, parent.spares.len()), (1, 0));
        let dev = s.device(id).expect("dev").expect("dev");
        assert_eq!((dev.owner.as_str(), dev.state), ("x", State::Ready));
        // A second take of the same spare finds nothing and changes nothing.
        assert_eq!(s.take_spare(&new("y", Some("c")), &b, id).expect("t"), None);
        assert!(s.get("y").expect("get").is_none());
        assert_eq!(s.get("c").expect("get").expect("c").children, 1);
    }

    #[test]
    fn a_spare_of_another_origin_is_not_taken() {
        let (_d, s, b) = setup();
        let c = committed(&s, &b, "c");
        let id = s.begin_spare(None, b.thin_id, b.size).expect("spare");
        s.finish_spare(id).expect("finish");
        assert_eq!(s.take_spare(&new("x", Some("c")), &b, id).expect("t"), None);
        assert_eq!(s.get("c").expect("get").expect("c").children, 0);
        let other = s.begin_spare(Some("c"), c, 1 << 30).expect("spare of c");
        assert_ne!(other, id);
        assert!(s.take_spare(&new("x", None), &b, id).expect("t").is_some());
    }

    #[test]
    fn remove_of_the_parent_marks_its_spares_deleting_and_a_dead_parent_gets_none() {
        let (_d, s, b) = setup();
        let c = committed(&s, &b, "c");
        let ready = s.begin_spare(Some("c"), c, 1 << 30).expect("spare");
        s.finish_spare(ready).expect("finish");
        let creating = s.begin_spare(Some("c"), c, 1 << 30).expect("spare 2");
        let rec = s.begin_remove("c").expect("remove");
        assert_eq!(rec.spares, vec![ready, creating]);
        for id in [ready, creating] {
            assert_eq!(
                s.device(id).expect("dev").expect("dev").state,
                State::Deleting
            );
        }
        // The refiller's finish after the Remove changes nothing; no new spare of a gone parent.
        assert!(!s.finish_spare(creating).expect("finish"));
        assert!(matches!(
            s.begin_spare(Some("c"), c, 1 << 30),
            Err(StoreError::FailedPrecondition(_))
        ));
    }

    #[test]
    fn a_key_named_like_the_spare_owner_is_not_a_spare() {
        let (_d, s, b) = setup();
        let plan = s.begin_create(&new(SPARE_OWNER, None), &b).expect("create");
        s.finish_create(SPARE_OWNER).expect("finish");
        // Its device record is the snapshot's (owner "<spare>" by name) but it is no spare to
        // take: the key's own record holds the thin id.
        assert_eq!(
            s.take_spare(&new("x", None), &b, plan.thin_id)
                .ok()
                .flatten()
                .map(|r| r.thin_id),
            None,
            "a client's snapshot named {SPARE_OWNER:?} was handed out as a spare"
        );
    }
}
