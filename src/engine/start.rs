//! The daemon's start-up, one function: [`start`]. Open the store, read its records, tell whether
//! they are settled, serve reads from them early if so, make the pool meanwhile, recover from the
//! records (`super::recovery`), publish the engine. `thinsnap serve` and `thinsnap pool adopt`,
//! the start-up bench and the server's tests all start through it.
//!
//! After a reboot most of a start is the kernel making the pool (how long: benches/RESULTS.md,
//! (d') after a reboot). When the database is there already it is opened meanwhile, and if it is
//! settled ([`Records::settled`]) the handle answers Stat and List from it at once while the
//! pool is made and recovery runs (the returned task; it hands the engine to the handle); every
//! other call waits for it. Otherwise (the first start, or a store with a call cut short) the
//! engine is made before anything is served.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio::task::JoinHandle;

use super::recovery::{self, Records};
use super::{EngineError, EngineHandle, Settings};
use crate::fs::FsError;
use crate::pool::{PoolError, ThinPool};
use crate::store::{Store, StoreError};

/// Why a start failed.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot open the database (is another thinsnap using this root?)")]
    Open(#[source] StoreError),
    #[error("cannot read the database")]
    Read(#[source] StoreError),
    /// Making the pool failed.
    #[error(transparent)]
    Pool(PoolError),
    /// Recovery failed (or the base device could not be made).
    #[error(transparent)]
    Recovery(EngineError),
    /// A start-up task panicked or was cancelled.
    #[error("start-up task failed: {0}")]
    Task(String),
}

impl StartError {
    /// The error and its causes on one line, skipping a cause whose text the message before
    /// already carries (our error types print their source inline): what waiting calls are
    /// told when the start fails.
    pub fn describe(&self) -> String {
        let mut msg = self.to_string();
        let mut cause = std::error::Error::source(self);
        while let Some(c) = cause {
            let c_text = c.to_string();
            if !msg.contains(&c_text) {
                msg.push_str(": ");
                msg.push_str(&c_text);
            }
            cause = c.source();
        }
        msg
    }
}

fn task_failed(e: tokio::task::JoinError) -> StartError {
    StartError::Task(e.to_string())
}

/// The task of a start that serves reads before the engine is made: it ends once the engine is
/// published (or the start failed; the waiting calls are then told why).
pub type StartTask = JoinHandle<Result<(), StartError>>;

/// Starts the engine on the store at `db` and the pool `make_pool` makes (run on a blocking
/// thread, while the store is opened and read), with `format` to make the base device's
/// filesystem when the pool has none (see the module doc).
///
/// Returns the handle the services reach the engine through, and, when the store was settled,
/// the task that is still making the engine; an error if the store, the pool or recovery fails
/// before serving.
pub async fn start<P, F>(
    db: &Path,
    make_pool: P,
    settings: Settings,
    format: F,
) -> Result<(EngineHandle, Option<StartTask>), StartError>
where
    P: FnOnce() -> Result<Arc<dyn ThinPool>, PoolError> + Send + 'static,
    F: Fn(&Path) -> Result<(), FsError> + Send + Sync + 'static,
{
    start_opening(db, Store::open, make_pool, settings, format).await
}

/// [`start`] opening the store with `open` (tests open a database just dropped with
/// `crate::store::open_after_drop`).
pub(crate) async fn start_opening<O, P, F>(
    db: &Path,
    open: O,
    make_pool: P,
    settings: Settings,
    format: F,
) -> Result<(EngineHandle, Option<StartTask>), StartError>
where
    O: Fn(&Path) -> Result<Store, StoreError> + Clone + Send + 'static,
    P: FnOnce() -> Result<Arc<dyn ThinPool>, PoolError> + Send + 'static,
    F: Fn(&Path) -> Result<(), FsError> + Send + Sync + 'static,
{
    let pool = tokio::task::spawn_blocking(make_pool);
    let db: PathBuf = db.to_path_buf();
    let open_store = {
        let db = db.clone();
        move || open(&db).map_err(StartError::Open)
    };
    // Only a database already there is opened before the pool exists: a first start whose pool
    // cannot be made leaves nothing behind. Its records are read once for both the settled
    // check and recovery (`recovery::start_from`).
    let (opened, settled_store) = if db.exists() {
        let open = open_store.clone();
        tokio::task::spawn_blocking(move || {
            let store = open()?;
            let records = Records::read(&store).map_err(StartError::Read)?;
            let settled_store = records.settled().then(|| store.clone());
            Ok::<_, StartError>((Some((store, records)), settled_store))
        })
        .await
        .map_err(task_failed)??
    } else {
        (None, None)
    };
    let recover = async move {
        let pool = pool.await.map_err(task_failed)?.map_err(StartError::Pool)?;
        tokio::task::spawn_blocking(move || {
            let (engine, _report) = match opened {
                Some((store, records)) => {
                    recovery::start_from(pool, store, records, settings, &format)
                }
                None => recovery::start(pool, open_store()?, settings, &format),
            }
            .map_err(StartError::Recovery)?;
            Ok(Arc::new(engine))
        })
        .await
        .map_err(task_failed)?
    };
    match settled_store {
        None => Ok((EngineHandle::ready(recover.await?), None)),
        Some(store) => {
            let (handle, publisher) = EngineHandle::starting(Some(store));
            let task = tokio::spawn(async move {
                match recover.await {
                    Ok(engine) => {
                        publisher.ready(engine);
                        Ok(())
                    }
                    Err(e) => {
                        publisher.failed(e.describe());
                        Err(e)
                    }
                }
            });
            Ok((handle, Some(task)))
        }
    }
}
