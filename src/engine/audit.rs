//! The audit of thin ids: the pool's thin ids (`thin_ls` on a metadata snapshot) against the
//! store's device records, once in the background after every start and at every Cleanup. A
//! start that finds the store consistent skips `thin_ls` (see `recovery`), so a thin device
//! leaked while the store looked consistent would otherwise never be seen.
//!
//! It reports, it does not delete: a thin id in the pool with no record is not provably
//! thinsnap's (another owner's volume in a shared pool, a device made by hand), so it is logged,
//! counted in `thinsnap status` and the metrics, and left alone. What is provably ours is deleted
//! where it always was: Cleanup deletes devices whose records say Deleting and active dm devices
//! with thinsnap's prefix and no record (thinsnap names and activates only its own), before its
//! audit runs; a start deletes unknown ids only in a pool thinsnap made (`recovery`).
//!
//! The pool changes while the audit reads it: the store is read before and after `thin_ls`, and
//! with a transaction id of thinsnap's (a pool it owns) the audit is read again if a change was
//! numbered meanwhile. Intent is recorded before the kernel is touched and a record is dropped
//! only after its device is deleted, so an id seen by `thin_ls` has its record in one of the two
//! reads unless it was both made and deleted while `thin_ls` ran.

use std::collections::BTreeSet;
use std::sync::Mutex;

use tracing::{info, warn};

use super::{now_ns, pool_err, stopped, Engine, EngineError};
use crate::model::ThinId;
use crate::pool::{PoolError, ThinPool};
use crate::store::State;

/// How many times an audit reads again because the pool changed while it read.
const TRIES: usize = 5;

/// What the last audit found (`thinsnap status`, the metrics).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct AuditReport {
    /// Audits done since start (each a `thin_ls`), whatever they found.
    pub runs: u64,
    /// When the last one ended, in nanoseconds since the epoch; 0: none yet.
    pub at_ns: u64,
    /// Thin ids in the pool with no device record: reported, never deleted (not provably ours).
    pub unknown: Vec<ThinId>,
    /// Thin ids of Ready device records that the pool does not have.
    pub missing: Vec<ThinId>,
    /// Why the last audit could not be made (thin_ls missing, a metadata snapshot held by
    /// someone else, the pool changing all the time); its findings are then the previous ones.
    pub error: Option<String>,
}

/// The engine's record of its audits.
#[derive(Default)]
pub(super) struct Audits {
    last: Mutex<AuditReport>,
}

impl Audits {
    fn lock(&self) -> std::sync::MutexGuard<'_, AuditReport> {
        self.last.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Engine {
    /// What the last audit found.
    pub fn audit_report(&self) -> AuditReport {
        self.audits.lock().clone()
    }

    /// Audits the pool's thin ids against the store (see the module doc), records and logs what
    /// it found, and returns it.
    ///
    /// Returns an error if the pool or the store cannot be read; it is also recorded.
    pub async fn audit(&self) -> Result<AuditReport, EngineError> {
        let found = self.audit_once().await;
        let mut last = self.audits.lock();
        last.runs += 1;
        last.at_ns = now_ns();
        match found {
            Ok((unknown, missing)) => {
                if !unknown.is_empty() {
                    warn!(count = unknown.len(), ids = ?unknown,
                          "audit: thin ids in the pool with no record; not provably thinsnap's, left alone");
                }
                if !missing.is_empty() {
                    warn!(count = missing.len(), ids = ?missing,
                          "audit: thin ids of ready records that the pool does not have");
                }
                if unknown.is_empty() && missing.is_empty() {
                    info!("audit: the pool's thin ids are the store's");
                }
                last.unknown = unknown;
                last.missing = missing;
                last.error = None;
                Ok(last.clone())
            }
            Err(e) => {
                warn!(error = %e, "audit: cannot compare the pool's thin ids with the store's");
                last.error = Some(e.to_string());
                Err(e)
            }
        }
    }

    /// One audit: (unknown, missing), read again while the pool changes under it.
    async fn audit_once(&self) -> Result<(Vec<ThinId>, Vec<ThinId>), EngineError> {
        for _ in 0..TRIES {
            let txid = self.pool.current();
            let before = self.store.devices()?;
            let kernel = self
                .on_pool(|pool| {
                    pool.audit_thin_ids().map_err(|e| match e {
                        PoolError::Busy(what) => EngineError::Unavailable(format!(
                            "audit: {what} is held by someone else; try again later"
                        )),
                        e => pool_err("list the pool's thin ids")(e),
                    })
                })
                .await?;
            let after = self.store.devices()?;
            if txid.is_some() && txid != self.pool.current() {
                continue;
            }
            let known: BTreeSet<ThinId> = before
                .iter()
                .chain(after.iter())
                .map(|d| d.thin_id)
                .collect();
            let unknown = kernel.difference(&known).copied().collect();
            let ready_before: BTreeSet<ThinId> = before
                .iter()
                .filter(|d| d.state == State::Ready)
                .map(|d| d.thin_id)
                .collect();
            let missing = after
                .iter()
                .filter(|d| d.state == State::Ready && ready_before.contains(&d.thin_id))
                .map(|d| d.thin_id)
                .filter(|id| !kernel.contains(id))
                .collect();
            return Ok((unknown, missing));
        }
        Err(EngineError::Unavailable(format!(
            "audit: the pool changed during each of {TRIES} reads; try again later"
        )))
    }

    /// The audit after a start: once, in the background, unless `stop` comes first.
    pub async fn run_start_audit(&self, mut stop: tokio::sync::watch::Receiver<bool>) {
        tokio::select! {
            biased;
            _ = stopped(&mut stop) => {}
            _ = self.audit() => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::{no_format, prep, reopen, setup, T};
    use super::super::{recovery, Settings};
    use super::*;
    use crate::config::FsConfig;

    /// Issue 24 item 7: a start that finds the store consistent skips thin_ls, so a thin id
    /// leaked behind the store's back is not seen by it; the audit after the start finds it,
    /// reports it (status) and leaves it alone; a Ready record whose thin id the pool lost is
    /// reported too; Cleanup audits again.
    #[tokio::test]
    async fn the_audit_finds_what_a_consistent_start_does_not_look_for_and_deletes_nothing() {
        let t = setup();
        prep(&t, "a", "").await.expect("prepare a");
        prep(&t, "b", "").await.expect("prepare b");
        let b = t.engine.record("b").expect("read").expect("b").thin_id;
        t.engine.flush().await.expect("flush");
        let clean = t.engine.audit().await.expect("audit");
        assert_eq!(
            (clean.unknown.len(), clean.missing.len()),
            (0, 0),
            "{clean:?}"
        );

        // Behind the store's back: a thin id made (a leak, or someone else's), and b's deleted.
        t.pool.create_thin(ThinId::from(77)).expect("leak");
        t.pool.deactivate(b).expect("deactivate b");
        t.pool.delete_thin(b).expect("delete b");

        // A start whose store is consistent (the transaction id is the one recorded: the fake
        // pool's changes above are not numbered) does not list thin ids.
        let (_dir, path, pool) = t.into_parts();
        let (engine, report) = recovery::start(
            pool.clone(),
            reopen(&path),
            Settings::with_fs(FsConfig::default()),
            &no_format,
        )
        .expect("restart");
        assert!(!report.thin_ids_listed, "{report:?}");
        let t = T {
            _dir,
            path,
            pool,
            engine: std::sync::Arc::new(engine),
        };
        assert_eq!(t.engine.audit_report().runs, 0);
        let (_stop_tx, stop) = tokio::sync::watch::channel(false);
        t.engine.run_start_audit(stop).await;
        let found = t.engine.audit_report();
        assert_eq!(found.runs, 1);
        assert_eq!(found.unknown, vec![77], "{found:?}");
        assert_eq!(found.missing, vec![b], "{found:?}");
        assert!(
            t.pool.thin_ids().contains(&ThinId::from(77)),
            "the audit deleted a thin id"
        );
        let st = t.engine.status().await.expect("status");
        assert_eq!(st.audit, found);

        // Cleanup audits again (and, 77 being inactive and recordless, leaves it alone).
        t.engine.cleanup().await.expect("cleanup");
        let again = t.engine.audit_report();
        assert_eq!(
            (again.runs, again.unknown.clone()),
            (2, vec![ThinId::from(77)])
        );
        assert!(t.pool.thin_ids().contains(&ThinId::from(77)));
    }

    /// An audit that cannot list the pool's thin ids (thin_ls missing, a metadata snapshot held
    /// by someone else) says why in the report and keeps the previous findings.
    #[tokio::test]
    async fn a_failed_audit_is_reported() {
        let t = setup();
        t.pool.create_thin(ThinId::from(77)).expect("leak");
        t.engine.audit().await.expect("audit");
        t.pool.fail_next("list_thin_ids");
        assert!(t.engine.audit().await.is_err());
        let r = t.engine.audit_report();
        assert_eq!((r.runs, r.unknown.clone()), (2, vec![ThinId::from(77)]));
        assert!(
            r.error.as_deref().is_some_and(|e| e.contains("thin ids")),
            "{r:?}"
        );
    }

    /// A metadata snapshot held while serving is someone else's: the audit fails saying so and
    /// leaves it; a start finding one held (a thin_ls cut short by a kill, maybe the audit's)
    /// lists the pool's thin ids even with a consistent store, which releases it.
    #[tokio::test]
    async fn a_held_metadata_snapshot_fails_the_audit_and_makes_the_next_start_list_thin_ids() {
        let t = setup();
        prep(&t, "a", "").await.expect("prepare a");
        t.engine.flush().await.expect("flush");
        t.pool.set_metadata_snapshot_held(true);
        let err = t.engine.audit().await.expect_err("held");
        assert!(matches!(err, EngineError::Unavailable(_)), "{err:?}");
        assert!(t.pool.status().expect("status").metadata_snapshot_held);
        let (_dir, path, pool) = t.into_parts();
        let (engine, report) = recovery::start(
            pool.clone(),
            reopen(&path),
            Settings::with_fs(FsConfig::default()),
            &no_format,
        )
        .expect("restart");
        assert!(report.thin_ids_listed, "{report:?}");
        assert!(!pool.status().expect("status").metadata_snapshot_held);
        let found = engine.audit().await.expect("audit");
        assert_eq!((found.unknown.len(), found.missing.len()), (0, 0));
    }
}
