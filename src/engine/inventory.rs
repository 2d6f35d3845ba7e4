//! The inventory of the pool for `thinsnap ls`: every snapshot with its thin id, dm device, the
//! state of that device and its usage; the warm spares and the base; and what no record owns:
//! thin ids in the pool (`thin_ls`, as the audit reads them) and dm devices named with the
//! pool's prefix, apart from the foreign thin ids kept by `thinsnap pool adopt --keep-foreign`.
//!
//! It reads, it changes nothing: not the kernel (no activation, no metadata snapshot left
//! held), not the store, not the audit's report. The pool changes while it reads; the store's
//! device records are read before and after the pool, so a thin id made or dropped meanwhile is
//! owned by one of the two reads (as in `audit`) and never shown as unowned by mistake.

use std::collections::{BTreeMap, BTreeSet};

use super::{pool_err, Engine, EngineError};
use crate::model::{Kind, ThinId};
use crate::pool::{PoolError, PrefixedDevice, ThinPool};
use crate::store::{DeviceRecord, SnapshotRecord, State, BASE_OWNER, SPARE_OWNER};

/// What an inventory entry is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryKind {
    Snapshot(Kind),
    /// A warm spare (see `spares`).
    Spare,
    /// The base device every parentless snapshot is a snapshot of.
    Base,
    /// A device record of a snapshot already removed, its device still to be deleted.
    Removing,
    /// A thin id in the pool, or a dm device with the pool's prefix, that no record owns.
    Unowned,
    /// A thin id kept as someone else's by `thinsnap pool adopt --keep-foreign`.
    Foreign,
}

impl EntryKind {
    pub fn as_str(&self) -> &'static str {
        match self {
            EntryKind::Snapshot(k) => k.as_str(),
            EntryKind::Spare => "spare",
            EntryKind::Base => "base",
            EntryKind::Removing => "removing",
            EntryKind::Unowned => "unowned",
            EntryKind::Foreign => "foreign",
        }
    }
}

/// The state of an entry's dm device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceState {
    /// The dm device exists now.
    Active,
    /// An active snapshot or view whose device is not made yet this run (after a reboot: made
    /// on first use, see `activate`).
    AwaitingActivation,
    /// No dm device, and none needed now (committed snapshots, a device removed).
    Inactive,
    /// The snapshot's device cannot be used (see `activate`); the entry's note says why.
    Quarantined,
    /// No record owns it (kinds unowned and foreign).
    Unowned,
}

impl DeviceState {
    pub fn as_str(&self) -> &'static str {
        match self {
            DeviceState::Active => "active",
            DeviceState::AwaitingActivation => "awaiting-activation",
            DeviceState::Inactive => "inactive",
            DeviceState::Quarantined => "quarantined",
            DeviceState::Unowned => "unowned",
        }
    }
}

/// Where an entry's mapped bytes come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mapped {
    /// The active device's thin status, read now.
    Kernel(u64),
    /// Recorded when the device stopped changing (a commit, the base's format).
    Recorded(u64),
    /// Not active and nothing recorded: not known without reading the pool's metadata.
    Unknown,
}

/// One thin id or dm device of the pool.
#[derive(Debug, Clone, PartialEq)]
pub struct Entry {
    pub kind: EntryKind,
    /// The snapshot's key (kinds Snapshot and Removing).
    pub key: Option<String>,
    /// The committed parent's key; a spare's: the committed snapshot it is of (None: the base).
    pub parent: Option<String>,
    /// None only for a dm device with the prefix whose name has no thin id.
    pub thin_id: Option<ThinId>,
    /// The dm device name: derived from the thin id (it exists when the state is Active), or
    /// the name found.
    pub device: String,
    pub state: DeviceState,
    /// Why quarantined, why unowned, a record being made or deleted, a thin id the pool lacks.
    pub note: String,
    /// Virtual size in bytes (0: not known, for what no record owns).
    pub size: u64,
    pub mapped: Mapped,
    /// Whether `thin_ls` found the thin id in the pool; None when it could not run.
    pub in_pool: Option<bool>,
}

/// Everything `thinsnap ls` shows.
#[derive(Debug, Clone, PartialEq)]
pub struct Inventory {
    pub entries: Vec<Entry>,
    /// Why the pool's thin ids could not be listed (thin_ls missing, a metadata snapshot held
    /// by someone else); unowned thin ids without a dm device are then not shown.
    pub thin_ids_error: Option<String>,
}

/// What the pool said, read in one blocking call.
struct Kernel {
    devices: Vec<PrefixedDevice>,
    /// Mapped bytes of our active devices (those whose thin status could be read).
    mapped: BTreeMap<ThinId, u64>,
    thin_ids: Result<BTreeSet<ThinId>, String>,
}

impl Engine {
    /// The inventory of the pool (see the module doc).
    ///
    /// Returns an error if the store cannot be read or the pool's dm devices cannot be listed;
    /// a failed thin_ls is not an error but said in [`Inventory::thin_ids_error`].
    pub async fn inventory(&self) -> Result<Inventory, EngineError> {
        let store = self.store.clone();
        let (before, kernel, snapshots, after, foreign) = self
            .on_pool(move |pool| {
                let before = store.devices()?;
                let thin_ids = pool.audit_thin_ids().map_err(|e| match e {
                    PoolError::Busy(what) => format!("{what} is held by someone else"),
                    e => e.to_string(),
                });
                let devices = pool
                    .prefixed_devices()
                    .map_err(pool_err("list the pool's dm devices"))?;
                let mut mapped = BTreeMap::new();
                for id in devices
                    .iter()
                    .filter(|d| d.not_ours.is_none())
                    .filter_map(|d| d.thin_id)
                {
                    // A device removed since the list has no status: its usage is unknown.
                    if let Ok(m) = pool.mapped_bytes(id) {
                        mapped.insert(id, m);
                    }
                }
                let snapshots = store.snapshots()?;
                let after = store.devices()?;
                let foreign = store.foreign_ids()?;
                let kernel = Kernel {
                    devices,
                    mapped,
                    thin_ids,
                };
                Ok((before, kernel, snapshots, after, foreign))
            })
            .await?;
        Ok(self.assemble(before, kernel, snapshots, after, foreign))
    }

    fn assemble(
        &self,
        before: Vec<DeviceRecord>,
        kernel: Kernel,
        snapshots: Vec<(String, SnapshotRecord)>,
        after: Vec<DeviceRecord>,
        foreign: BTreeSet<ThinId>,
    ) -> Inventory {
        let active: BTreeSet<ThinId> = kernel
            .devices
            .iter()
            .filter(|d| d.not_ours.is_none())
            .filter_map(|d| d.thin_id)
            .collect();
        let in_pool = |id: ThinId| kernel.thin_ids.as_ref().ok().map(|ids| ids.contains(&id));
        let name = |id: ThinId| {
            self.pool
                .device_path(id)
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default()
        };
        let state = |id: ThinId| {
            if active.contains(&id) {
                DeviceState::Active
            } else if self.lazy.is_pending(id) {
                DeviceState::AwaitingActivation
            } else {
                DeviceState::Inactive
            }
        };
        let mapped = |id: ThinId, recorded: Option<u64>| match (kernel.mapped.get(&id), recorded) {
            (Some(m), _) => Mapped::Kernel(*m),
            (None, Some(r)) => Mapped::Recorded(r),
            (None, None) => Mapped::Unknown,
        };
        let mut entries = Vec::new();
        let mut owned = BTreeSet::new();
        // Committed snapshots by thin id: a spare's parent.
        let committed: BTreeMap<ThinId, &str> = snapshots
            .iter()
            .filter(|(_, r)| r.kind == Kind::Committed && r.state == State::Ready)
            .map(|(k, r)| (r.thin_id, k.as_str()))
            .collect();
        for (key, rec) in &snapshots {
            if rec.state == State::Creating {
                // Invisible to clients until made; its device record shows below if any.
                continue;
            }
            let id = rec.thin_id;
            owned.insert(id);
            let (st, note) = match &rec.quarantine {
                Some(q) => (DeviceState::Quarantined, q.reason.clone()),
                None if rec.state == State::Deleting => {
                    (state(id), "removed; its device is being deleted".into())
                }
                None => (state(id), String::new()),
            };
            entries.push(Entry {
                kind: EntryKind::Snapshot(rec.kind),
                key: Some(key.clone()),
                parent: rec.parent.clone(),
                thin_id: Some(id),
                device: name(id),
                state: st,
                note,
                size: rec.size,
                mapped: mapped(
                    id,
                    (rec.kind == Kind::Committed && rec.quarantine.is_none()).then_some(rec.mapped),
                ),
                in_pool: in_pool(id),
            });
        }
        let base = &self.base;
        owned.insert(base.thin_id);
        entries.push(Entry {
            kind: EntryKind::Base,
            key: None,
            parent: None,
            thin_id: Some(base.thin_id),
            device: name(base.thin_id),
            state: state(base.thin_id),
            note: String::new(),
            size: base.size,
            mapped: mapped(base.thin_id, Some(base.mapped)),
            in_pool: in_pool(base.thin_id),
        });
        let held_by_key: BTreeSet<ThinId> = snapshots.iter().map(|(_, r)| r.thin_id).collect();
        for d in &after {
            if owned.contains(&d.thin_id) || d.owner == BASE_OWNER {
                owned.insert(d.thin_id);
                continue;
            }
            owned.insert(d.thin_id);
            let spare = d.owner == SPARE_OWNER && !held_by_key.contains(&d.thin_id);
            let (kind, key, parent) = if spare {
                let parent = d
                    .origin
                    .and_then(|o| committed.get(&o))
                    .map(|k| k.to_string());
                (EntryKind::Spare, None, parent)
            } else {
                (EntryKind::Removing, Some(d.owner.clone()), None)
            };
            let note = match d.state {
                State::Creating => "being made",
                State::Deleting => "being deleted",
                State::Ready if spare => "",
                State::Ready => "its snapshot record is gone",
            };
            entries.push(Entry {
                kind,
                key,
                parent,
                thin_id: Some(d.thin_id),
                device: name(d.thin_id),
                state: state(d.thin_id),
                note: note.into(),
                size: d.size,
                mapped: mapped(d.thin_id, None),
                in_pool: in_pool(d.thin_id),
            });
        }
        // What no record owns: device records of either read own it (see the module doc).
        owned.extend(before.iter().map(|d| d.thin_id));
        let mut unowned: BTreeMap<ThinId, Entry> = BTreeMap::new();
        if let Ok(ids) = &kernel.thin_ids {
            for &id in ids.iter().filter(|id| !owned.contains(id)) {
                let e = self.stray(id, &foreign, name(id), &active, &mapped, Some(true));
                unowned.insert(id, e);
            }
        }
        for d in &kernel.devices {
            match (d.thin_id, &d.not_ours) {
                (Some(id), None) if !owned.contains(&id) => {
                    let in_pool = in_pool(id);
                    unowned.entry(id).or_insert_with(|| {
                        self.stray(id, &foreign, name(id), &active, &mapped, in_pool)
                    });
                }
                (_, Some(why)) => entries.push(Entry {
                    kind: EntryKind::Unowned,
                    key: None,
                    parent: None,
                    thin_id: d.thin_id,
                    device: d.name.clone(),
                    state: DeviceState::Unowned,
                    note: format!("a dm device with this pool's name prefix, not ours: {why}"),
                    size: 0,
                    mapped: Mapped::Unknown,
                    in_pool: None,
                }),
                _ => {}
            }
        }
        entries.extend(unowned.into_values());
        Inventory {
            entries,
            thin_ids_error: kernel.thin_ids.err(),
        }
    }

    /// The entry of thin id `id`, which no record owns.
    fn stray(
        &self,
        id: ThinId,
        foreign: &BTreeSet<ThinId>,
        device: String,
        active: &BTreeSet<ThinId>,
        mapped: &dyn Fn(ThinId, Option<u64>) -> Mapped,
        in_pool: Option<bool>,
    ) -> Entry {
        let (kind, mut note) = if foreign.contains(&id) {
            (
                EntryKind::Foreign,
                "kept as someone else's (thinsnap pool adopt --keep-foreign)".to_string(),
            )
        } else {
            (
                EntryKind::Unowned,
                "in the pool, but no record owns it: not provably thinsnap's, left alone"
                    .to_string(),
            )
        };
        if active.contains(&id) {
            note.push_str("; its dm device is active");
        }
        Entry {
            kind,
            key: None,
            parent: None,
            thin_id: Some(id),
            device: if active.contains(&id) {
                device
            } else {
                String::new()
            },
            state: DeviceState::Unowned,
            note,
            size: 0,
            mapped: mapped(id, None),
            in_pool,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::{no_labels, prep, setup, setup_with};
    use super::super::Settings;
    use super::*;
    use crate::config::FsConfig;

    fn find(inv: &Inventory, id: ThinId) -> &Entry {
        inv.entries
            .iter()
            .find(|e| e.thin_id == Some(id))
            .unwrap_or_else(|| panic!("thin id {id} not in {inv:#?}"))
    }

    fn by_key<'a>(inv: &'a Inventory, key: &str) -> &'a Entry {
        inv.entries
            .iter()
            .find(|e| e.key.as_deref() == Some(key))
            .unwrap_or_else(|| panic!("{key:?} not in {inv:#?}"))
    }

    /// Every kind and state: an active snapshot, a view and a committed parent, one snapshot
    /// awaiting activation after a reboot and one quarantined (its thin id gone), the base, a
    /// thin id nobody owns (inactive), one whose dm device is active, and someone else's device
    /// named with the prefix. Nothing is changed by looking.
    #[tokio::test]
    async fn the_inventory_names_every_device_and_what_owns_it() {
        let t = setup();
        prep(&t, "l1", "").await.expect("prepare");
        let l1 = t.engine.record("l1").expect("rec").expect("l1").thin_id;
        t.pool.write(l1, 4096);
        t.engine
            .commit("c", "l1", no_labels())
            .await
            .expect("commit");
        prep(&t, "a", "c").await.expect("a");
        prep(&t, "q", "c").await.expect("q");
        prep(&t, "lazy", "").await.expect("lazy");
        t.engine
            .create(Kind::View, "v", "c", no_labels())
            .await
            .expect("v");
        let id = |t: &super::super::tests::T, k: &str| {
            t.engine.record(k).expect("rec").expect("k").thin_id
        };
        let (a, q, lazy, v) = (id(&t, "a"), id(&t, "q"), id(&t, "lazy"), id(&t, "v"));
        t.pool.reboot();
        let (t, _) = t.restart();
        t.engine.mounts("a").await.expect("activate a");
        t.engine.mounts("v").await.expect("activate v");
        t.pool.delete_thin(q).expect("behind our back");
        assert!(t.engine.mounts("q").await.is_err(), "q is quarantined");
        t.pool.create_thin(77.into()).expect("unowned, inactive");
        t.pool.create_thin(78.into()).expect("unowned");
        t.pool
            .activate(78.into(), 1 << 20)
            .expect("unowned, active");
        t.pool.add_foreign_device("fake-snap-x", None);
        let calls = t.pool.calls().len();

        let inv = t.engine.inventory().await.expect("inventory");
        assert_eq!(inv.thin_ids_error, None);

        let e = by_key(&inv, "a");
        assert_eq!(
            (e.kind, e.state, e.parent.as_deref(), e.thin_id, e.in_pool),
            (
                EntryKind::Snapshot(Kind::Active),
                DeviceState::Active,
                Some("c"),
                Some(a),
                Some(true)
            )
        );
        assert_eq!(e.device, format!("fake-snap-{a}"));
        assert!(matches!(e.mapped, Mapped::Kernel(4096)), "{e:?}");
        let e = by_key(&inv, "v");
        assert_eq!(
            (e.kind, e.state, e.thin_id),
            (
                EntryKind::Snapshot(Kind::View),
                DeviceState::Active,
                Some(v)
            )
        );
        let e = by_key(&inv, "c");
        assert_eq!(
            (e.kind, e.state, e.mapped),
            (
                EntryKind::Snapshot(Kind::Committed),
                DeviceState::Inactive,
                Mapped::Recorded(4096)
            )
        );
        let e = by_key(&inv, "lazy");
        assert_eq!(
            (e.state, e.mapped, e.thin_id),
            (DeviceState::AwaitingActivation, Mapped::Unknown, Some(lazy))
        );
        let e = by_key(&inv, "q");
        assert_eq!(
            (e.state, e.in_pool),
            (DeviceState::Quarantined, Some(false))
        );
        assert!(e.note.contains("gone"), "{e:?}");
        let e = find(&inv, t.base_id());
        assert_eq!((e.kind, e.key.as_deref()), (EntryKind::Base, None));

        let e = find(&inv, 77.into());
        assert_eq!(
            (e.kind, e.state, e.device.as_str(), e.in_pool),
            (EntryKind::Unowned, DeviceState::Unowned, "", Some(true))
        );
        let e = find(&inv, 78.into());
        assert_eq!(
            (e.kind, e.device.as_str()),
            (EntryKind::Unowned, "fake-snap-78")
        );
        assert!(e.note.contains("active"), "{e:?}");
        let e = inv
            .entries
            .iter()
            .find(|e| e.device == "fake-snap-x")
            .expect("the foreign device");
        assert_eq!((e.kind, e.thin_id), (EntryKind::Unowned, None));
        assert!(e.note.contains("not ours"), "{e:?}");

        // Every thin id of the pool is in it, each once.
        let mut ids: Vec<ThinId> = inv.entries.iter().filter_map(|e| e.thin_id).collect();
        ids.sort();
        let pool: Vec<ThinId> = t
            .pool
            .thin_ids()
            .into_iter()
            .chain([q]) // quarantined: its record remains, its thin id is gone
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        assert_eq!(ids, pool);

        // It looked, and changed nothing.
        let since: Vec<String> = t.pool.calls()[calls..].to_vec();
        assert!(
            since.iter().all(|c| c == "audit_thin_ids"
                || c == "prefixed_devices"
                || c == "status"
                || c.starts_with("mapped_bytes")),
            "{since:?}"
        );
        assert!(!t.pool.active().contains(&lazy));
        assert_eq!(t.engine.audit_report().runs, 0, "not an audit");
    }

    /// Warm spares and their parent, and the thin ids kept by `pool adopt --keep-foreign`.
    #[tokio::test]
    async fn spares_and_foreign_thin_ids() {
        let mut s = Settings::with_fs(FsConfig::default());
        s.spares = 1;
        let t = setup_with(s);
        t.engine.refill_until_idle().await;
        t.engine
            .store
            .add_foreign_ids(&[ThinId::from(90)].into_iter().collect())
            .expect("adopt");
        t.pool.create_thin(90.into()).expect("someone else's");
        let spare = t.engine.spare_of("").expect("the base's spare");
        let inv = t.engine.inventory().await.expect("inventory");
        let e = find(&inv, spare);
        assert_eq!(
            (e.kind, e.state, e.parent.as_deref(), e.key.as_deref()),
            (EntryKind::Spare, DeviceState::Active, None, None)
        );
        let e = find(&inv, 90.into());
        assert_eq!(
            (e.kind, e.state),
            (EntryKind::Foreign, DeviceState::Unowned)
        );
        assert!(e.note.contains("keep-foreign"), "{e:?}");
    }

    /// Without thin_ls (missing, or a metadata snapshot held by someone else) the inventory
    /// says why and still names the active dm devices nobody owns.
    #[tokio::test]
    async fn without_thin_ls_it_says_why_and_shows_what_dm_has() {
        let t = setup();
        t.pool.create_thin(77.into()).expect("unowned, inactive");
        t.pool.create_thin(78.into()).expect("unowned");
        t.pool
            .activate(78.into(), 1 << 20)
            .expect("unowned, active");
        t.pool.fail_next("list_thin_ids");
        let inv = t.engine.inventory().await.expect("inventory");
        assert!(inv.thin_ids_error.is_some(), "{inv:?}");
        assert!(inv.entries.iter().all(|e| e.thin_id != Some(77.into())));
        let e = find(&inv, 78.into());
        assert_eq!((e.kind, e.in_pool), (EntryKind::Unowned, None));
        assert_eq!(find(&inv, t.base_id()).in_pool, None);
    }
}
