//! thinsnap: a containerd snapshotter on device-mapper thin provisioning. Every image layer and
//! every container gets its own copy-on-write block device: a thin snapshot of its parent's, or of
//! a base device formatted once per pool.
//!
//! # Layout
//! - [`config`]: typed TOML configuration, every default, validation naming the key.
//! - [`server`]: the running daemon: the tonic servers on the two unix sockets (Snapshots, Admin) and the
//!   background tasks (reaper, autogrow, the spares' refiller, metrics), graceful stop; the
//!   client side. While the daemon starts, calls reach the engine through
//!   `engine::EngineHandle` (Stat and List answered from a settled store, the rest wait).
//! - [`grpc`]: containerd's Snapshots service -> [`engine`]; `EngineError` -> gRPC status codes.
//! - [`admin`]: thinsnap's own Admin service (proto/) -> [`engine`].
//! - [`status`]: renders the Admin service's status for `thinsnap status` (text or JSON).
//! - [`ls`]: renders the Admin service's inventory for `thinsnap ls` (table or JSON, filters,
//!   the reverse lookup from a dm device or thin id to its snapshot).
//! - [`model`]: the vocabulary every layer shares (thin ids, snapshot kinds); imports nothing.
//! - [`metrics`]: the opt-in Prometheus endpoint; call latency and errors, pool space.
//! - [`engine`]: snapshot semantics, each call of the Snapshots API in a file named after it
//!   (`engine::create` for Prepare and View, `engine::commit`, `engine::remove`, `engine::mounts`,
//!   `engine::update`, `engine::usage`, `engine::reads` for Stat and List), per-key locking,
//!   intent -> kernel -> outcome ordering; the daemon's start-up ([`engine::start()`]: the store
//!   opened and read, reads served early from a settled store, the pool made, recovery, the
//!   engine published), recovery at start ([`engine::recovery`]; devices of active snapshots made on first use,
//!   quarantine: `engine::activate`), warm spares made ahead of Prepare and View
//!   (`engine::spares`), the inventory behind `thinsnap ls` (`engine::inventory`), the audit of the pool's thin ids against the store (`engine::audit`),
//!   containerd's filter syntax ([`engine::filter`]).
//! - [`store`]: the sled database: snapshot and device records, thin id allocation, schema version.
//! - [`pool`]: the `ThinPool` trait and its device-mapper implementation ([`pool::dm`]) over the
//!   shared dm ioctls (`pool::ioctl`); loop-file ([`pool::loopback`]) and LVM ([`pool::lvm`])
//!   provisioning; the pool that numbers its own changes ([`pool::txid`]); an in-memory fake for
//!   unit tests (`pool::fake`).
//! - [`fs`]: formatting the base device, mount options per filesystem.
//! - [`failpoint`](mod@failpoint): named crash points, inert unless `THINSNAP_FAILPOINT` names one.
//!
//! Dependencies point one way: grpc/admin -> engine -> (pool, store, fs). Only `pool` uses the
//! `devicemapper` crate and only `store` uses `sled`.

pub mod admin;
pub mod config;
pub mod engine;
pub mod failpoint;
pub mod fs;
pub mod grpc;
pub mod ls;
pub mod metrics;
pub mod model;
pub mod pool;
pub mod server;
pub mod status;
pub mod store;
