//! thinsnap's own admin service (proto/thinsnap/admin/v1): pool status for `thinsnap status`.
//! It converts; the engine decides.

use tonic::{Request, Response, Status};

use crate::engine::EngineHandle;

/// Generated code of proto/thinsnap/admin/v1/admin.proto.
pub mod api {
    #![allow(clippy::all)]
    tonic::include_proto!("thinsnap.admin.v1");
}

use crate::engine::{Entry, Mapped, ThinId};
use api::admin_server::Admin;
use api::{
    GrowRequest, InventoryEntry, InventoryRequest, InventoryResponse, LoopFile, Quarantined, Space,
    StatusRequest, StatusResponse,
};

/// The Admin service over an engine (its calls wait for it while the daemon starts).
pub struct AdminService {
    engine: EngineHandle,
}

impl AdminService {
    pub fn new(engine: EngineHandle) -> AdminService {
        AdminService { engine }
    }

    /// The service ready to add to a tonic server.
    pub fn into_server(self) -> api::admin_server::AdminServer<AdminService> {
        api::admin_server::AdminServer::new(self)
    }
}

/// An inventory entry as the Admin API gives it.
fn entry(e: Entry) -> InventoryEntry {
    let (mapped_known, mapped_bytes, mapped_source) = match e.mapped {
        Mapped::Kernel(m) => (true, m, "kernel"),
        Mapped::Recorded(m) => (true, m, "recorded"),
        Mapped::Unknown => (false, 0, ""),
    };
    InventoryEntry {
        kind: e.kind.as_str().to_string(),
        key: e.key.unwrap_or_default(),
        parent: e.parent.unwrap_or_default(),
        has_thin_id: e.thin_id.is_some(),
        thin_id: e.thin_id.map_or(0, ThinId::get),
        device: e.device,
        state: e.state.as_str().to_string(),
        note: e.note,
        size_bytes: e.size,
        mapped_known,
        mapped_bytes,
        mapped_source: mapped_source.to_string(),
        in_pool: match e.in_pool {
            Some(true) => "yes",
            Some(false) => "no",
            None => "unknown",
        }
        .to_string(),
    }
}

#[tonic::async_trait]
impl Admin for AdminService {
    async fn inventory(
        &self,
        _: Request<InventoryRequest>,
    ) -> Result<Response<InventoryResponse>, Status> {
        let inv = self
            .engine
            .detached("inventory".into(), |e| async move { e.inventory().await })
            .await?;
        let engine = self.engine.engine().await?;
        Ok(Response::new(InventoryResponse {
            pool_name: engine.pool_info().name,
            thin_ids_listed: inv.thin_ids_error.is_none(),
            thin_ids_error: inv.thin_ids_error.unwrap_or_default(),
            entries: inv.entries.into_iter().map(entry).collect(),
        }))
    }

    async fn grow(&self, req: Request<GrowRequest>) -> Result<Response<StatusResponse>, Status> {
        let req = req.into_inner();
        let nz = |v: u64| (v != 0).then_some(v);
        let (data, meta) = (nz(req.data_size_bytes), nz(req.metadata_size_bytes));
        if data.is_none() && meta.is_none() {
            return Err(Status::invalid_argument(
                "give a data size, a metadata size or both",
            ));
        }
        // A task of its own (see `crate::grpc`): a client gone does not stop a grow half way.
        self.engine
            .detached("grow".into(), move |e| async move {
                e.grow_on_request(data, meta).await
            })
            .await?;
        self.status(Request::new(StatusRequest::default())).await
    }

    async fn status(
        &self,
        req: Request<StatusRequest>,
    ) -> Result<Response<StatusResponse>, Status> {
        let list = req.into_inner().list_thin_ids;
        let st = self
            .engine
            .detached("status".into(), |e| async move { e.status().await })
            .await?;
        let engine = self.engine.engine().await?;
        let thin_ids: Vec<u32> = if list {
            engine.thin_ids()?.iter().map(|id| id.get()).collect()
        } else {
            Vec::new()
        };
        let info = engine.pool_info();
        let base = st.base;
        Ok(Response::new(StatusResponse {
            pool_name: info.name,
            pool_mode: info.mode,
            block_size_bytes: st.pool.block_size_bytes,
            base_size_bytes: base.size,
            new_image_size_bytes: base.new_image_size,
            fs_type: base.fs_type,
            data: Some(Space {
                used_bytes: st.pool.data_used_bytes,
                total_bytes: st.pool.data_total_bytes,
            }),
            metadata: Some(Space {
                used_bytes: st.pool.metadata_used_bytes,
                total_bytes: st.pool.metadata_total_bytes,
            }),
            transaction_id: st.pool.transaction_id,
            read_only: st.pool.read_only,
            out_of_data_space: st.pool.out_of_data_space,
            needs_check: st.pool.needs_check,
            error_if_no_space: st.pool.error_if_no_space,
            snapshots_active: st.active,
            snapshots_view: st.views,
            snapshots_committed: st.committed,
            thin_ids_in_use: st.thin_ids,
            loop_files: info
                .loop_files
                .into_iter()
                .map(|(role, file, device)| LoopFile {
                    role,
                    file: file.display().to_string(),
                    device: device.display().to_string(),
                })
                .collect(),
            root: engine.root().display().to_string(),
            base_thin_id: base.thin_id.get(),
            min_free_space_percent: engine.min_free_percent(),
            thin_ids,
            snapshots_inactive: st.inactive,
            spares_ready: st.spares.ready,
            spares_target: st.spares.target,
            spares_taken: st.spares.taken,
            spares_missed: st.spares.missed,
            spares_rounds: st.spares.rounds,
            spares_refilling: st.spares.refilling,
            spare_thin_ids: st.spare_thin_ids.iter().map(|id| id.get()).collect(),
            audit_runs: st.audit.runs,
            audit_at_ns: st.audit.at_ns,
            audit_unknown_thin_ids: st.audit.unknown.iter().map(|id| id.get()).collect(),
            audit_missing_thin_ids: st.audit.missing.iter().map(|id| id.get()).collect(),
            audit_error: st.audit.error.unwrap_or_default(),
            remove_async: engine.remove_async(),
            deleting_devices: st.deleting,
            quarantined: st
                .quarantined
                .into_iter()
                .map(|q| Quarantined {
                    key: q.key,
                    thin_id: q.thin_id.get(),
                    kind: q.kind.as_str().to_string(),
                    reason: q.reason,
                })
                .collect(),
        }))
    }
}
