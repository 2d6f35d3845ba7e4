//! Warm spares (`[spares] count`): thin snapshots made and activated ahead of time, of the base
//! and of recently used or committed snapshots, so that Prepare and View on one of them are a
//! store transaction and one flush, with no `create_snap` and no device resume on the caller's
//! path. A committed snapshot and the base never change, so a snapshot of one taken now equals
//! one taken at the next Prepare on it; device names derive from thin ids, so the spare's thin id
//! simply becomes the snapshot's.
//!
//! The store holds each spare as a device record (owner [`SPARE_OWNER`], `origin` its origin's
//! thin id) made as every device is: intent (Creating, flushed), then the kernel, then Ready. This
//! module holds what only this run knows: the spares whose devices were activated by this run
//! (the only ones handed out), the origins wanted (the base, then the most recently used or
//! committed, one spare each; an origin in demand, used by more than one Prepare or View in the
//! last [`DEMAND_WINDOW`], gets up to [`MAX_PER_ORIGIN`], ahead of the idle origins' spares; at
//! most `count` in all) and the refiller ([`Engine::run_spares`]), which makes or deletes one
//! spare at a time, never under the free-space floor or on a read-only pool. With no foreground
//! call in flight it goes on at once; while calls are in flight it waits [`BUSY_GRACE`] after
//! the first of them, and then after each of its rounds rests [`BUSY_REST_FACTOR`] times as long
//! as the round took (at least [`BUSY_GRACE`]), so it takes at most 1 / (1 + factor) of the time
//! while calls are in flight. Recovery deletes every spare it finds at start.
//!
//! It must not touch a spare's device except under its thin id's lock (`thin_locks`), which a
//! Remove's reap of it also takes.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

use tokio::sync::Notify;
use tracing::{debug, info, warn};

use super::{now_ns, pool_err, stopped, Engine, EngineError, Mount};
use crate::model::{Kind, ThinId};
use crate::pool::{PoolError, ThinPool};
use crate::store::{NewSnapshot, State, StoreError};

pub use crate::store::SPARE_OWNER;

/// A spare made and activated by this run.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Spare {
    id: ThinId,
}

/// How far back a parent's Prepares and Views count as its demand.
pub(super) const DEMAND_WINDOW: Duration = Duration::from_secs(10);
/// The most spares one origin in demand gets.
pub(super) const MAX_PER_ORIGIN: usize = 4;
/// While foreground calls are in flight, the refiller waits this long after the first of them
/// before a round, and at least this long between rounds.
pub(super) const BUSY_GRACE: Duration = Duration::from_millis(100);
/// While foreground calls are in flight, the refiller rests this many times as long as its last
/// round took: it takes at most 1 / (1 + this) of the time (a third with 2).
pub(super) const BUSY_REST_FACTOR: u32 = 2;

/// How long a layer committed by an image unpack waits before a spare of it is wanted: the
/// unpack's next Prepare on it (the next layer) comes within this if the layer is not the image's
/// top, and a spare made meanwhile would be deleted again, having cost the unpack's calls a share
/// of the kernel for nothing.
pub(super) const UNPACK_QUIET: Duration = Duration::from_secs(1);

/// The key a containerd client gave, from the key thinsnap receives: containerd's metadata store
/// names every snapshot it keeps in a snapshotter `<namespace>/<n>/<client key>` (a proxy
/// plugin sees `k8s.io/12/extract-...`, `moby/5/<id>-init-key`); a key without that form (a
/// client calling thinsnap directly, as the benches and tests do) is returned as it is.
pub(crate) fn client_key(key: &str) -> &str {
    let mut parts = key.splitn(3, '/');
    match (parts.next(), parts.next(), parts.next()) {
        (Some(ns), Some(n), Some(rest))
            if !ns.is_empty() && !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()) =>
        {
            rest
        }
        _ => key,
    }
}

/// Whether `key` is the key containerd's unpacker gives the snapshot it applies a layer into:
/// `extract-<unique> <chain id>` (containerd's `snapshots.UnpackKeyFormat`; Docker's containerd
/// image store and the CRI pull through that unpacker), under containerd's namespace prefix or
/// not ([`client_key`]).
pub(crate) fn is_unpack_key(key: &str) -> bool {
    client_key(key)
        .strip_prefix("extract-")
        .is_some_and(|rest| {
            rest.split_once(' ')
                .is_some_and(|(u, c)| !u.is_empty() && !c.is_empty())
        })
}

/// Whether `name` is the init layer Docker's containerd image store commits for one container
/// (`<container id>-init`, prepared as `<container id>-init-key`): the container's own layer is
/// prepared on it right away and nothing else ever is, so a spare of it would only be made to be
/// deleted again with the container.
pub(crate) fn is_docker_init_layer(name: &str) -> bool {
    client_key(name)
        .strip_suffix("-init")
        .is_some_and(|id| !id.is_empty())
}

/// What the engine keeps of spares in memory. The parent key `""` stands for the base.
#[derive(Default)]
struct Inner {
    /// Ready spares activated this run, by parent key (oldest first).
    ready: HashMap<String, Vec<Spare>>,
    /// Parents recently used by a Prepare or View, or committed: most recent first.
    recent: VecDeque<String>,
    /// Times of the Prepares and Views on each parent within [`DEMAND_WINDOW`], oldest first.
    uses: HashMap<String, VecDeque<Instant>>,
    /// Layers committed by an image unpack, with when: not wanted before [`UNPACK_QUIET`] has
    /// passed (unless a Prepare or View that is not an unpack's uses one meanwhile).
    unpacked: HashMap<String, Instant>,
}

impl Inner {
    /// `parent` is wanted no more: out of the recent origins, its uses and unpack time dropped
    /// (its ready spares are the caller's to keep or drop).
    fn unwant(&mut self, parent: &str) {
        self.recent.retain(|p| p != parent);
        self.uses.remove(parent);
        self.unpacked.remove(parent);
    }

    /// Spares of `parent` ready now.
    fn ready_of(&self, parent: &str) -> usize {
        self.ready.get(parent).map_or(0, Vec::len)
    }

    /// Takes the oldest ready spare of `parent`.
    fn take(&mut self, parent: &str) -> Option<Spare> {
        let v = self.ready.get_mut(parent)?;
        let spare = (!v.is_empty()).then(|| v.remove(0));
        if v.is_empty() {
            self.ready.remove(parent);
        }
        spare
    }

    /// Uses of `parent` within [`DEMAND_WINDOW`] of `now`.
    fn demand(&mut self, parent: &str, now: Instant) -> usize {
        let Some(q) = self.uses.get_mut(parent) else {
            return 0;
        };
        while q
            .front()
            .is_some_and(|t| now.duration_since(*t) > DEMAND_WINDOW)
        {
            q.pop_front();
        }
        let n = q.len();
        if n == 0 {
            self.uses.remove(parent);
        }
        n
    }
}

/// The warm spares of one engine (see the module doc).
#[derive(Default)]
pub(super) struct Spares {
    /// `[spares] count`; 0: off.
    target: usize,
    inner: Mutex<Inner>,
    /// Wakes the refiller: a spare was taken or missed, a parent was used or committed.
    poke: Notify,
    /// Foreground calls in flight (see [`Spares::call_in_flight`]).
    inflight: AtomicUsize,
    idle: Notify,
    taken: AtomicU64,
    missed: AtomicU64,
    /// Refiller rounds begun and ended: equal while the refiller is idle (tests wait for it).
    rounds: AtomicU64,
    rounds_done: AtomicU64,
    /// Tests only: a pause in [`Engine::make_spare`] between the spare's intent and its thin-id
    /// lock (see [`Engine::pause_spare_after_intent`]).
    #[cfg(test)]
    pause_after_intent: Mutex<Option<Pause>>,
}

/// Tests only: where a paused step tells that it got there, and what it waits for to go on.
#[cfg(test)]
type Pause = (
    ThinId,
    tokio::sync::oneshot::Sender<ThinId>,
    tokio::sync::oneshot::Receiver<()>,
);

/// A foreground call in flight (see [`Spares::call_in_flight`]).
pub(super) struct CallInFlight<'a>(&'a Spares);

impl Drop for CallInFlight<'_> {
    fn drop(&mut self) {
        if self.0.inflight.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}

/// Counts for `thinsnap status` and the metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct SpareCounts {
    /// Spares ready to be taken.
    pub ready: u64,
    /// `[spares] count`.
    pub target: u64,
    /// Prepares and Views served from a spare since start.
    pub taken: u64,
    /// Prepares and Views that could have used a spare but found none since start.
    pub missed: u64,
    /// Refiller rounds begun since start, and whether one is under way: a check of the pool
    /// against the store is only meaningful between rounds.
    pub rounds: u64,
    pub refilling: bool,
}

impl Spares {
    pub(super) fn new(target: u32) -> Spares {
        let s = Spares {
            target: target as usize,
            ..Spares::default()
        };
        if s.target > 0 {
            // The first round (the base's spare) runs as soon as the refiller starts.
            s.poke.notify_one();
        }
        s
    }

    fn inner(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Marks a foreground call in flight until the guard drops: the refiller gives way to it
    /// (see the module doc).
    pub(super) fn call_in_flight(&self) -> CallInFlight<'_> {
        self.inflight.fetch_add(1, Ordering::SeqCst);
        CallInFlight(self)
    }

    /// A Prepare or View on `parent` (`""`: the base): counted in its demand, and it goes first
    /// in the wanted origins.
    fn used(&self, parent: &str) {
        if self.target == 0 {
            return;
        }
        let now = Instant::now();
        {
            let mut inner = self.inner();
            inner
                .uses
                .entry(parent.to_string())
                .or_default()
                .push_back(now);
            // Bounds the memory: only the parents wanted keep their uses.
            let keep: Vec<String> = std::iter::once(String::new())
                .chain(inner.recent.iter().cloned())
                .chain(std::iter::once(parent.to_string()))
                .collect();
            inner.uses.retain(|p, _| keep.contains(p));
            let _ = inner.demand(parent, now);
            // Used by a container or a view: wanted now, unpacked or not.
            inner.unpacked.remove(parent);
        }
        self.touch(parent);
    }

    /// A Prepare of containerd's unpacker on `parent` (`""`: the base): `parent` is a layer
    /// below the one being unpacked, which containers do not start on; it is wanted no more. A
    /// spare of it already ready may still serve this call; the refiller deletes what is left.
    fn unpacking_on(&self, parent: &str) {
        if self.target == 0 || parent.is_empty() {
            return;
        }
        self.inner().unwant(parent);
        self.poke.notify_one();
    }

    /// Layer `name` was just committed by an image unpack: it goes first in the wanted origins
    /// as a committed layer does, but is wanted only once [`UNPACK_QUIET`] has passed without
    /// the unpack's next layer being prepared on it (see [`Spares::unpack_due`]).
    pub(super) fn unpacked(&self, name: &str) {
        if self.target == 0 {
            return;
        }
        self.inner()
            .unpacked
            .insert(name.to_string(), Instant::now());
        self.touch(name);
        // Bounded: only layers still among the recent ones keep their time.
        let mut inner = self.inner();
        let Inner {
            recent, unpacked, ..
        } = &mut *inner;
        unpacked.retain(|p, _| recent.contains(p));
    }

    /// When the oldest layer committed by an unpack becomes wanted, if one waits: the refiller
    /// looks again then.
    pub(super) fn unpack_due(&self) -> Option<Instant> {
        self.inner()
            .unpacked
            .values()
            .min()
            .map(|t| *t + UNPACK_QUIET)
    }

    /// `parent` was just used or committed: it goes first in the wanted origins.
    pub(super) fn touch(&self, parent: &str) {
        if self.target == 0 || parent.is_empty() {
            return;
        }
        let mut inner = self.inner();
        inner.recent.retain(|p| p != parent);
        inner.recent.push_front(parent.to_string());
        // Beyond `target` an origin is never wanted (the base takes one place).
        inner.recent.truncate(self.target);
        drop(inner);
        self.poke.notify_one();
    }

    /// `parent` is gone (removed): it is wanted no more; its spares are the Remove's to reap.
    pub(super) fn forget(&self, parent: &str) {
        if self.target == 0 {
            return;
        }
        let mut inner = self.inner();
        inner.unwant(parent);
        inner.ready.remove(parent);
    }

    /// The counts (see [`SpareCounts`]).
    pub(super) fn counts(&self) -> SpareCounts {
        SpareCounts {
            ready: self.inner().ready.values().map(Vec::len).sum::<usize>() as u64,
            target: self.target as u64,
            taken: self.taken.load(Ordering::Relaxed),
            missed: self.missed.load(Ordering::Relaxed),
            rounds: self.rounds.load(Ordering::SeqCst),
            refilling: self.rounds.load(Ordering::SeqCst)
                != self.rounds_done.load(Ordering::SeqCst),
        }
    }

    /// The origins wanted now, by parent key (`""`: the base), with how many spares each, most
    /// wanted first; `target` in all at most. In order: one each for the base and for the
    /// origins in demand (more than one use in [`DEMAND_WINDOW`]), then the extra ones of the
    /// origins in demand (one per use beyond the first, up to [`MAX_PER_ORIGIN`] each, the
    /// busiest first), then one each for the other recently used or committed origins.
    fn wanted(&self) -> Vec<(String, usize)> {
        let now = Instant::now();
        let mut inner = self.inner();
        inner
            .unpacked
            .retain(|_, at| now.duration_since(*at) < UNPACK_QUIET);
        let origins: Vec<String> = std::iter::once(String::new())
            .chain(
                inner
                    .recent
                    .iter()
                    .filter(|p| !inner.unpacked.contains_key(*p))
                    .cloned(),
            )
            .take(self.target)
            .collect();
        let demand: Vec<usize> = origins.iter().map(|p| inner.demand(p, now)).collect();
        drop(inner);
        // Slots in the order they are granted: (index into origins).
        let mut slots: Vec<usize> = Vec::new();
        for (i, &d) in demand.iter().enumerate() {
            if i == 0 || d > 1 {
                slots.push(i);
            }
        }
        let mut busiest: Vec<usize> = (0..origins.len()).filter(|&i| demand[i] > 1).collect();
        busiest.sort_by_key(|&i| std::cmp::Reverse(demand[i]));
        for &i in &busiest {
            let extra = demand[i].min(MAX_PER_ORIGIN) - 1;
            slots.extend(std::iter::repeat_n(i, extra));
        }
        for (i, &d) in demand.iter().enumerate() {
            if i != 0 && d <= 1 {
                slots.push(i);
            }
        }
        slots.truncate(self.target);
        let mut counts = vec![0usize; origins.len()];
        for i in slots {
            counts[i] += 1;
        }
        origins
            .into_iter()
            .zip(counts)
            .filter(|(_, n)| *n > 0)
            .collect()
    }
}

/// What one round of the refiller did.
enum Step {
    /// Something was done (or skipped); look again.
    Again,
    /// Nothing to do, or nothing may be done now (under the floor): wait for a poke.
    Idle,
}

/// The thin ids among `devices` (the store's device records) that are warm spares'.
///
/// Returns an error if the store cannot be read.
pub(super) fn spare_ids_in(
    store: &crate::store::Store,
    devices: &[crate::store::DeviceRecord],
) -> Result<Vec<ThinId>, EngineError> {
    let named = store.get(SPARE_OWNER)?.map(|r| r.thin_id);
    Ok(devices
        .iter()
        .filter(|d| d.owner == SPARE_OWNER && Some(d.thin_id) != named)
        .map(|d| d.thin_id)
        .collect())
}

impl Engine {
    /// Spares ready, wanted, taken and missed (see [`SpareCounts`]).
    pub fn spare_counts(&self) -> SpareCounts {
        self.spares.counts()
    }

    /// Prepare or View of `key` on a warm spare of `parent`: `Some(mounts)` when one was taken
    /// (one transaction, one flush); `None` when there was none to take (the caller makes the
    /// snapshot as usual). The caller holds the key's lock and checked the free-space floor.
    ///
    /// Returns AlreadyExists, NotFound or FailedPrecondition as Prepare does, or a store error.
    pub(super) async fn take_spare(
        &self,
        kind: Kind,
        key: &str,
        parent: &str,
        labels: &std::collections::BTreeMap<String, String>,
    ) -> Result<Option<Vec<Mount>>, EngineError> {
        let sp = &self.spares;
        if sp.target == 0 {
            return Ok(None);
        }
        if is_docker_init_layer(parent) {
            // Never has a spare (see `is_docker_init_layer`): not a miss either.
            return Ok(None);
        }
        if is_unpack_key(key) {
            sp.unpacking_on(parent);
        } else {
            sp.used(parent);
        }
        let spare = sp.inner().take(parent);
        let Some(spare) = spare else {
            sp.missed.fetch_add(1, Ordering::Relaxed);
            sp.poke.notify_one();
            return Ok(None);
        };
        let new = NewSnapshot {
            key: key.to_string(),
            kind,
            parent: (!parent.is_empty()).then(|| parent.to_string()),
            labels: labels.clone(),
            now: now_ns(),
            size: None,
            roll_forward: false,
        };
        let rec = match self.store.take_spare(&new, &self.base, spare.id) {
            Ok(Some(rec)) => rec,
            Ok(None) => {
                // Gone meanwhile (its parent removed and made again, evicted): the usual path.
                sp.missed.fetch_add(1, Ordering::Relaxed);
                sp.poke.notify_one();
                return Ok(None);
            }
            Err(e) => {
                // The call is refused (the key exists, the parent is not committed): the spare
                // is still there and still a spare; given back (the refiller deletes it if its
                // parent has more than it wants now).
                sp.inner()
                    .ready
                    .entry(parent.to_string())
                    .or_default()
                    .insert(0, spare);
                sp.poke.notify_one();
                return Err(e.into());
            }
        };
        if let Err(e) = self.flush().await {
            // Not durable: undo as a failed Prepare does (the device is reaped).
            warn!(key, thin_id = spare.id.get(), error = %e, "cannot flush the take of a spare; undoing");
            self.undo_create(key, spare.id).await;
            sp.poke.notify_one();
            return Err(e.into());
        }
        crate::failpoint!("prepare:after-take");
        sp.taken.fetch_add(1, Ordering::Relaxed);
        sp.poke.notify_one();
        info!(
            key,
            thin_id = spare.id.get(),
            kind = kind.as_str(),
            "created snapshot from a warm spare"
        );
        Ok(Some(self.mounts_of(&rec)))
    }

    /// Deletes the spares a Remove of their parent marked Deleting (`ids`, from the removed
    /// record), before the parent's own device.
    pub(super) async fn reap_spares(&self, parent: &str, ids: &[ThinId]) {
        self.spares.forget(parent);
        for &id in ids {
            match &self.reaper {
                Some(reaper) => {
                    let _ = reaper.send(id);
                }
                None => {
                    self.reap(id).await;
                }
            }
        }
    }

    /// The refiller: waits for a poke, then makes or deletes spares one at a time until the
    /// wanted ones are there, each only while no foreground call is in flight. Returns when
    /// `stop` turns true; does nothing with `[spares] count = 0`.
    pub async fn run_spares(&self, mut stop: tokio::sync::watch::Receiver<bool>) {
        if self.spares.target == 0 {
            return;
        }
        loop {
            let due = self.spares.unpack_due();
            tokio::select! {
                biased;
                _ = stopped(&mut stop) => return,
                _ = self.spares.poke.notified() => {}
                _ = async {
                    match due {
                        Some(at) => tokio::time::sleep_until(at).await,
                        None => std::future::pending().await,
                    }
                } => {}
            }
            // While calls are in flight: when the next round may start (see the module doc).
            let mut busy_turn: Option<Instant> = None;
            loop {
                // Foreground calls first: go at once if none is in flight, else at the busy turn
                // or when they have all ended.
                loop {
                    let idle = self.spares.idle.notified();
                    tokio::pin!(idle);
                    idle.as_mut().enable();
                    if self.spares.inflight.load(Ordering::SeqCst) == 0 {
                        busy_turn = None;
                        break;
                    }
                    let turn = *busy_turn.get_or_insert_with(|| Instant::now() + BUSY_GRACE);
                    if Instant::now() >= turn {
                        break;
                    }
                    tokio::select! {
                        biased;
                        _ = stopped(&mut stop) => return,
                        _ = idle => {}
                        _ = tokio::time::sleep_until(turn) => {}
                    }
                }
                if *stop.borrow() {
                    return;
                }
                let began = Instant::now();
                self.spares.rounds.fetch_add(1, Ordering::SeqCst);
                let step = self.refill_step().await;
                self.spares.rounds_done.fetch_add(1, Ordering::SeqCst);
                if busy_turn.is_some() {
                    let rest = (began.elapsed() * BUSY_REST_FACTOR).max(BUSY_GRACE);
                    busy_turn = Some(Instant::now() + rest);
                }
                match step {
                    Ok(Step::Again) => {}
                    Ok(Step::Idle) => break,
                    Err(e) => {
                        warn!(error = %e, "spares: cannot refill; trying again at the next call");
                        break;
                    }
                }
            }
        }
    }

    /// One round of the refiller: deletes one unwanted spare, or makes one wanted one.
    async fn refill_step(&self) -> Result<Step, EngineError> {
        let mut wanted = self.spares.wanted();
        // With a raised fs.base_size a new image's first layer is made at the new size, never
        // from a spare of the base at the old one (`Engine::grown_base_size`).
        if self.grown_base_size("").is_some() {
            wanted.retain(|(p, _)| !p.is_empty());
        }
        let wants = |p: &str| wanted.iter().find(|(w, _)| w == p).map_or(0, |(_, n)| *n);
        // One more than wanted: the newest goes.
        let unwanted = {
            let mut inner = self.spares.inner();
            let over = inner
                .ready
                .iter()
                .find(|(p, v)| v.len() > wants(p))
                .map(|(p, _)| p.clone());
            over.and_then(|p| {
                let v = inner.ready.get_mut(&p)?;
                let spare = v.pop()?;
                if v.is_empty() {
                    inner.ready.remove(&p);
                }
                Some((p, spare))
            })
        };
        if let Some((parent, spare)) = unwanted {
            self.evict(&parent, spare.id).await?;
            return Ok(Step::Again);
        }
        let missing = {
            let inner = self.spares.inner();
            wanted
                .iter()
                .find(|(p, n)| inner.ready_of(p) < *n)
                .map(|(p, _)| p.clone())
        };
        let Some(parent) = missing else {
            return Ok(Step::Idle);
        };
        // Never under the free-space floor nor on a read-only pool (a cheap status ioctl).
        if let Err(e) = self.check_space().await {
            debug!(error = %e, "spares: not refilling while the pool is low or read-only");
            return Ok(Step::Idle);
        }
        let (origin, size) = if parent.is_empty() {
            (self.base.thin_id, self.base.size)
        } else {
            match self.store.get(&parent)? {
                Some(r)
                    if r.state == State::Ready
                        && r.kind == Kind::Committed
                        && r.quarantine.is_none() =>
                {
                    (r.thin_id, r.size)
                }
                _ => {
                    self.spares.forget(&parent);
                    return Ok(Step::Again);
                }
            }
        };
        self.make_spare(&parent, origin, size).await?;
        Ok(Step::Again)
    }

    /// Deletes spare `id` of `parent` (no longer wanted).
    async fn evict(&self, parent: &str, id: ThinId) -> Result<(), EngineError> {
        let p = (!parent.is_empty()).then_some(parent);
        if self.store.drop_spare(id, p)? {
            self.flush().await?;
            self.reap(id).await;
            debug!(
                thin_id = id.get(),
                parent, "spares: deleted an unwanted spare"
            );
        }
        Ok(())
    }

    /// Makes a spare of `parent` (thin id `origin`): intent, create_snap, activate, Ready.
    async fn make_spare(&self, parent: &str, origin: ThinId, size: u64) -> Result<(), EngineError> {
        let p = (!parent.is_empty()).then_some(parent);
        let id = match self.store.begin_spare(p, origin, size) {
            Ok(id) => id,
            Err(StoreError::FailedPrecondition(_)) => {
                // Removed or quarantined since it was read.
                self.spares.forget(parent);
                return Ok(());
            }
            Err(e) => return Err(e.into()),
        };
        self.flush().await?;
        crate::failpoint!("spare:after-intent");
        #[cfg(test)]
        self.paused_after_intent(id, origin).await;
        let _device = self.thin_locks.lock(&[&id]).await;
        // Read again under the lock: a Remove of the parent may have reaped this intent-only
        // spare meanwhile (its thin device did not exist, so the delete "succeeded") and dropped
        // its record, or marked it Deleting (its reap, waiting for this lock, deletes the
        // record). Either way no device is made: one made now would be known to no record.
        match self.store.device(id)? {
            Some(d)
                if d.state == State::Creating
                    && d.owner == SPARE_OWNER
                    && d.origin == Some(origin) => {}
            other => {
                info!(
                    thin_id = id.get(),
                    origin = origin.get(),
                    parent = ?parent,
                    state = ?other.map(|d| d.state),
                    "spares: the spare's parent was removed before its device was made; not made"
                );
                return Ok(());
            }
        }
        // Ok(true): made; Ok(false): the thin id is someone else's (a shared pool).
        let made = self
            .on_pool_as(move |pool| {
                match pool.create_snap(id, origin) {
                    Ok(()) => {}
                    Err(PoolError::ThinExists(_)) => return Ok(false),
                    Err(e) => {
                        return Err(SpareError::NotMade(pool_err(format!(
                            "create spare thin id {id}"
                        ))(e)))
                    }
                }
                crate::failpoint!("spare:after-create-snap");
                pool.activate(id, size).map_err(|e| {
                    SpareError::Made(pool_err(format!("activate spare thin id {id}"))(e))
                })?;
                crate::failpoint!("spare:after-activate");
                Ok(true)
            })
            .await;
        match made {
            Ok(true) => {
                if self.store.finish_spare(id)? {
                    self.spares
                        .inner()
                        .ready
                        .entry(parent.to_string())
                        .or_default()
                        .push(Spare { id });
                    debug!(
                        thin_id = id.get(),
                        origin = origin.get(),
                        parent,
                        "spares: made a spare"
                    );
                }
                // Otherwise a Remove of the parent marked it Deleting: its reap (waiting for this
                // thin id's lock) deletes it.
                Ok(())
            }
            Ok(false) => {
                warn!(
                    thin_id = id.get(),
                    "spares: thin id taken by a device thinsnap does not own; not a spare"
                );
                self.store.forget_spare(id, p)?;
                self.flush().await?;
                Ok(())
            }
            Err(SpareError::NotMade(e)) => {
                // The kernel refused the create_snap: no device was made.
                self.store.forget_spare(id, p)?;
                self.flush().await?;
                Err(e)
            }
            Err(SpareError::Made(e)) => {
                if self.store.drop_spare(id, p)? {
                    self.flush().await?;
                    drop(_device);
                    self.reap(id).await;
                }
                Err(e)
            }
        }
    }
}

/// Why making a spare's device failed: before anything was made, or after (or not known).
enum SpareError {
    NotMade(EngineError),
    Made(EngineError),
}

impl From<EngineError> for SpareError {
    /// A failed pool task: whether the device was made is not known, so it is reaped.
    fn from(e: EngineError) -> Self {
        SpareError::Made(e)
    }
}

/// What the engine's tests use to drive and observe the spares.
#[cfg(test)]
mod hooks;
