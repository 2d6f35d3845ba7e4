//! containerd's Snapshots service: the `containerd-snapshots` crate's [`Snapshotter`] trait mapped
//! onto the [`Engine`], the gRPC service over it ([`server`]: List replies cut by bytes), and the
//! one exact mapping of [`EngineError`] to gRPC status codes (containerd branches on them: its
//! unpacker relies on AlreadyExists). Nothing else lives here.
//!
//! A call that can touch the kernel is not owned by its request: containerd passes its caller's
//! context down the proxy, so a kubelet timeout, a containerd restart or a ^C cancels the gRPC
//! call and hyper drops the handler's future. Each call but Stat and List (which only read the
//! store) therefore runs as a task of its own, which the request only awaits: the mutating
//! calls, and Mounts and Usage, which may activate a device after a reboot. The engine's work
//! runs to its outcome or its undo whatever the client does, with the locks it holds, and a
//! clean stop waits for it (`engine::Calls`; CONTRIBUTING.md, layering rule 6).

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::sync::Arc;

use containerd_snapshots::api::snapshots::v1::snapshots_server::{Snapshots, SnapshotsServer};
use containerd_snapshots::api::snapshots::v1::{
    CleanupRequest, CommitSnapshotRequest, Info as ApiInfo, ListSnapshotsRequest,
    ListSnapshotsResponse, MountsRequest, MountsResponse, PrepareSnapshotRequest,
    PrepareSnapshotResponse, RemoveSnapshotRequest, StatSnapshotRequest, StatSnapshotResponse,
    UpdateSnapshotRequest, UpdateSnapshotResponse, UsageRequest, UsageResponse,
    ViewSnapshotRequest, ViewSnapshotResponse,
};
use containerd_snapshots::{
    api::types::Mount as ApiMount, Info, Kind as ApiKind, Snapshotter, Usage,
};
use tonic::Status;

use crate::engine::{Engine, EngineError, EngineHandle, Kind, SnapshotInfo};
use crate::metrics::Metrics;

impl From<EngineError> for Status {
    fn from(e: EngineError) -> Status {
        match &e {
            EngineError::NotFound(m) => Status::not_found(m.clone()),
            EngineError::AlreadyExists(m) => Status::already_exists(m.clone()),
            EngineError::FailedPrecondition(m) => Status::failed_precondition(m.clone()),
            EngineError::InvalidArgument(m) => Status::invalid_argument(m.clone()),
            EngineError::ResourceExhausted(m) => Status::resource_exhausted(m.clone()),
            EngineError::Unavailable(m) => Status::unavailable(m.clone()),
            _ => {
                // Internal: the whole source chain, so the log on containerd's side says why.
                let mut msg = e.to_string();
                let mut src = std::error::Error::source(&e);
                while let Some(s) = src {
                    // Our errors print their source inline: add only what is not said yet.
                    let text = s.to_string();
                    if !msg.contains(&text) {
                        msg.push_str(": ");
                        msg.push_str(&text);
                    }
                    src = s.source();
                }
                Status::internal(msg)
            }
        }
    }
}

/// The Snapshots service over an engine, recording every call in `metrics`. While the daemon
/// starts, Stat and List may be answered from the store and every other call waits for the
/// engine (see [`EngineHandle`]).
pub struct Service {
    engine: EngineHandle,
    metrics: Arc<Metrics>,
}

impl Service {
    pub fn new(engine: EngineHandle, metrics: Arc<Metrics>) -> Service {
        Service { engine, metrics }
    }

    /// Runs a read-only call, recording its latency and status code.
    async fn timed<T>(
        &self,
        method: &'static str,
        f: impl Future<Output = Result<T, EngineError>>,
    ) -> Result<T, Status> {
        let start = std::time::Instant::now();
        let r = f.await.map_err(Status::from);
        self.metrics
            .observe(method, start, r.as_ref().err().map(|s| s.code()));
        r
    }

    /// Runs a call that may touch the kernel as a task of its own (see the module doc) in the
    /// set of calls in flight (`engine::Calls`), recording its latency and status code when it
    /// ends, also if its client has gone. While the daemon starts it first waits for the engine;
    /// a client gone meanwhile has changed nothing. `key` names it in the log of a stop that
    /// gives up on it.
    async fn detached<T, F, Fut>(&self, method: &'static str, key: &str, f: F) -> Result<T, Status>
    where
        T: Send + 'static,
        F: FnOnce(Arc<Engine>) -> Fut,
        Fut: Future<Output = Result<T, EngineError>> + Send + 'static,
    {
        let start = std::time::Instant::now();
        let engine = match self.engine.engine().await {
            Ok(engine) => engine,
            Err(e) => {
                let s = Status::from(e);
                self.metrics.observe(method, start, Some(s.code()));
                return Err(s);
            }
        };
        let (call, metrics) = (f(engine), self.metrics.clone());
        let task = self
            .engine
            .calls()
            .spawn(format!("{method} {key:?}"), async move {
                let r = call.await.map_err(Status::from);
                metrics.observe(method, start, r.as_ref().err().map(|s| s.code()));
                r
            });
        task.await
            .map_err(|e| Status::internal(format!("{method} task failed: {e}")))?
    }
}

fn labels(l: HashMap<String, String>) -> BTreeMap<String, String> {
    l.into_iter().collect()
}

fn info(i: SnapshotInfo) -> Info {
    Info {
        kind: match i.kind {
            Kind::Active => ApiKind::Active,
            Kind::View => ApiKind::View,
            Kind::Committed => ApiKind::Committed,
        },
        name: i.key,
        parent: i.parent,
        labels: i.labels.into_iter().collect(),
        created_at: i.created_at,
        updated_at: i.updated_at,
    }
}

fn mounts(m: Vec<crate::engine::Mount>) -> Vec<ApiMount> {
    m.into_iter()
        .map(|m| ApiMount {
            r#type: m.fs_type,
            source: m.source,
            target: String::new(),
            options: m.options,
        })
        .collect()
}

// The trait fixes the error type to tonic::Status, whose size clippy dislikes.
#[allow(clippy::result_large_err)]
#[tonic::async_trait]
impl Snapshotter for Service {
    type Error = Status;

    async fn stat(&self, key: String) -> Result<Info, Status> {
        self.timed("stat", self.engine.stat(&key)).await.map(info)
    }

    async fn update(&self, i: Info, fieldpaths: Option<Vec<String>>) -> Result<Info, Status> {
        let paths = fieldpaths.unwrap_or_default();
        let key = i.name.clone();
        self.detached("update", &key, |e| async move {
            e.update(&i.name, labels(i.labels), &paths).await
        })
        .await
        .map(info)
    }

    async fn usage(&self, key: String) -> Result<Usage, Status> {
        let u = self
            .detached(
                "usage",
                &key.clone(),
                |e| async move { e.usage(&key).await },
            )
            .await?;
        Ok(Usage {
            size: i64::try_from(u.size).unwrap_or(i64::MAX),
            inodes: i64::try_from(u.inodes).unwrap_or(i64::MAX),
        })
    }

    async fn mounts(&self, key: String) -> Result<Vec<ApiMount>, Status> {
        self.detached(
            "mounts",
            &key.clone(),
            |e| async move { e.mounts(&key).await },
        )
        .await
        .map(mounts)
    }

    async fn prepare(
        &self,
        key: String,
        parent: String,
        l: HashMap<String, String>,
    ) -> Result<Vec<ApiMount>, Status> {
        self.detached("prepare", &key.clone(), |e| async move {
            e.create(Kind::Active, &key, &parent, labels(l)).await
        })
        .await
        .map(mounts)
    }

    async fn view(
        &self,
        key: String,
        parent: String,
        l: HashMap<String, String>,
    ) -> Result<Vec<ApiMount>, Status> {
        self.detached("view", &key.clone(), |e| async move {
            e.create(Kind::View, &key, &parent, labels(l)).await
        })
        .await
        .map(mounts)
    }

    async fn commit(
        &self,
        name: String,
        key: String,
        l: HashMap<String, String>,
    ) -> Result<(), Status> {
        self.detached("commit", &key.clone(), |e| async move {
            e.commit(&name, &key, labels(l)).await
        })
        .await
    }

    async fn remove(&self, key: String) -> Result<(), Status> {
        self.detached(
            "remove",
            &key.clone(),
            |e| async move { e.remove(&key).await },
        )
        .await
    }

    async fn clear(&self) -> Result<(), Status> {
        self.detached("cleanup", "", |e| async move { e.cleanup().await })
            .await
            .map(|_| ())
    }

    type InfoStream = futures::stream::Iter<std::vec::IntoIter<Result<Info, Status>>>;

    async fn list(
        &self,
        _snapshotter: String,
        filters: Vec<String>,
    ) -> Result<Self::InfoStream, Status> {
        let infos = self.timed("list", self.engine.list(&filters)).await?;
        Ok(futures::stream::iter(
            infos.into_iter().map(|i| Ok(info(i))).collect::<Vec<_>>(),
        ))
    }
}

/// The most bytes one List reply message may encode to: grpc-go's default limit on a received
/// message (4 MiB), which any gRPC client accepts. containerd's proxy client raises its own to
/// 16 MiB (`grpc.MaxCallRecvMsgSize(defaults.DefaultMaxRecvMsgSize)` in
/// services/server/server.go, `DefaultMaxRecvMsgSize = 16 << 20` in defaults/defaults.go, 1.6
/// to 2.x), so replies under this pass it with room to spare. One snapshot's info is at most
/// about 75 KiB (key and parent 4096 bytes each, labels 64 KiB: see `engine::limits`), so a
/// message always holds at least one.
pub const MAX_LIST_REPLY_BYTES: usize = 4 << 20;

/// Splits `infos` into List replies, each encoding to at most `limit` bytes (an info larger
/// than `limit` alone goes in a message of its own; the limits on keys and labels keep every
/// info far below [`MAX_LIST_REPLY_BYTES`]).
pub fn list_replies(infos: Vec<ApiInfo>, limit: usize) -> Vec<ListSnapshotsResponse> {
    use prost::Message;
    let mut out = Vec::new();
    let (mut batch, mut bytes) = (Vec::new(), 0usize);
    for i in infos {
        let len = i.encoded_len();
        // The field's tag (1 byte) and length prefix, then the info.
        let field = 1 + prost::encoding::encoded_len_varint(len as u64) + len;
        if !batch.is_empty() && bytes + field > limit {
            out.push(ListSnapshotsResponse {
                info: std::mem::take(&mut batch),
            });
            bytes = 0;
        }
        bytes += field;
        batch.push(i);
    }
    if !batch.is_empty() {
        out.push(ListSnapshotsResponse { info: batch });
    }
    out
}

/// containerd's Snapshots gRPC service over [`Service`]: each call converted and handed to the
/// [`Snapshotter`] implementation above, as the `containerd-snapshots` crate's own wrapper does,
/// except List, whose replies are cut by bytes ([`MAX_LIST_REPLY_BYTES`]) where that wrapper cut
/// them by count (100 infos, up to 100 MiB with 1 MiB of labels each).
pub struct Api {
    svc: Arc<Service>,
}

/// The Snapshots service ready to add to a tonic server.
pub fn server(svc: Service) -> SnapshotsServer<Api> {
    SnapshotsServer::new(Api { svc: Arc::new(svc) })
}

type Reply<T> = Result<tonic::Response<T>, Status>;

#[tonic::async_trait]
impl Snapshots for Api {
    async fn prepare(
        &self,
        r: tonic::Request<PrepareSnapshotRequest>,
    ) -> Reply<PrepareSnapshotResponse> {
        let r = r.into_inner();
        let mounts = self.svc.prepare(r.key, r.parent, r.labels).await?;
        Ok(tonic::Response::new(PrepareSnapshotResponse { mounts }))
    }

    async fn view(&self, r: tonic::Request<ViewSnapshotRequest>) -> Reply<ViewSnapshotResponse> {
        let r = r.into_inner();
        let mounts = self.svc.view(r.key, r.parent, r.labels).await?;
        Ok(tonic::Response::new(ViewSnapshotResponse { mounts }))
    }

    async fn mounts(&self, r: tonic::Request<MountsRequest>) -> Reply<MountsResponse> {
        let mounts = self.svc.mounts(r.into_inner().key).await?;
        Ok(tonic::Response::new(MountsResponse { mounts }))
    }

    async fn commit(&self, r: tonic::Request<CommitSnapshotRequest>) -> Reply<()> {
        let r = r.into_inner();
        self.svc.commit(r.name, r.key, r.labels).await?;
        Ok(tonic::Response::new(()))
    }

    async fn remove(&self, r: tonic::Request<RemoveSnapshotRequest>) -> Reply<()> {
        self.svc.remove(r.into_inner().key).await?;
        Ok(tonic::Response::new(()))
    }

    async fn stat(&self, r: tonic::Request<StatSnapshotRequest>) -> Reply<StatSnapshotResponse> {
        let info = self.svc.stat(r.into_inner().key).await?;
        Ok(tonic::Response::new(StatSnapshotResponse {
            info: Some(info.into()),
        }))
    }

    async fn update(
        &self,
        r: tonic::Request<UpdateSnapshotRequest>,
    ) -> Reply<UpdateSnapshotResponse> {
        let r = r.into_inner();
        let info = r
            .info
            .ok_or_else(|| Status::failed_precondition("info is required"))?;
        let info =
            Info::try_from(info).map_err(|e| Status::invalid_argument(format!("info: {e}")))?;
        let info = self
            .svc
            .update(info, r.update_mask.map(|m| m.paths))
            .await?;
        Ok(tonic::Response::new(UpdateSnapshotResponse {
            info: Some(info.into()),
        }))
    }

    type ListStream =
        futures::stream::Iter<std::vec::IntoIter<Result<ListSnapshotsResponse, Status>>>;

    async fn list(&self, r: tonic::Request<ListSnapshotsRequest>) -> Reply<Self::ListStream> {
        let r = r.into_inner();
        let infos = self
            .svc
            .timed("list", self.svc.engine.list(&r.filters))
            .await?;
        // Converting and measuring thousands of infos is CPU work: off the async workers.
        let replies = tokio::task::spawn_blocking(move || {
            let infos = infos.into_iter().map(|i| ApiInfo::from(info(i))).collect();
            list_replies(infos, MAX_LIST_REPLY_BYTES)
        })
        .await
        .map_err(|e| Status::internal(format!("list task failed: {e}")))?;
        Ok(tonic::Response::new(futures::stream::iter(
            replies.into_iter().map(Ok).collect::<Vec<_>>(),
        )))
    }

    async fn usage(&self, r: tonic::Request<UsageRequest>) -> Reply<UsageResponse> {
        let u = self.svc.usage(r.into_inner().key).await?;
        Ok(tonic::Response::new(UsageResponse {
            size: u.size,
            inodes: u.inodes,
        }))
    }

    async fn cleanup(&self, _: tonic::Request<CleanupRequest>) -> Reply<()> {
        self.svc.clear().await?;
        Ok(tonic::Response::new(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;

    /// Replies are cut at the byte limit, never split an info, and keep the order.
    #[test]
    fn list_replies_are_cut_by_bytes() {
        let infos: Vec<ApiInfo> = (0..10)
            .map(|i| ApiInfo {
                name: format!("k{i}"),
                parent: "p".repeat(100),
                ..Default::default()
            })
            .collect();
        let one = ListSnapshotsResponse {
            info: vec![infos[0].clone()],
        }
        .encoded_len();
        let replies = list_replies(infos.clone(), 3 * one);
        assert_eq!(replies.len(), 4, "3 + 3 + 3 + 1");
        assert!(replies.iter().all(|r| r.encoded_len() <= 3 * one));
        let names: Vec<String> = replies
            .into_iter()
            .flat_map(|r| r.info)
            .map(|i| i.name)
            .collect();
        assert_eq!(names, (0..10).map(|i| format!("k{i}")).collect::<Vec<_>>());
        assert_eq!(
            list_replies(infos.clone(), 1).len(),
            10,
            "one each, never none"
        );
        assert!(list_replies(Vec::new(), MAX_LIST_REPLY_BYTES).is_empty());
    }
}
