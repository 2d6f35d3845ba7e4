//! The vocabulary every layer shares: thin ids and snapshot kinds. It owns no behaviour and
//! imports nothing of the crate, so the store, the pool and the engine can all name these types
//! without importing each other (the store must not import the pool, nor the front ends the
//! store).

use serde::{Deserialize, Serialize};

/// A dm-thin device id: the kernel accepts 24 bits (thin-provisioning.rst, "create_thin").
pub type ThinId = u32;

/// The largest thin id the kernel accepts.
pub const MAX_THIN_ID: ThinId = (1 << 24) - 1;

/// containerd's snapshot kinds (Unknown is never stored).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    Active,
    View,
    Committed,
}

impl Kind {
    /// The name containerd's filters use (`kind==committed`).
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Active => "active",
            Kind::View => "view",
            Kind::Committed => "committed",
        }
    }
}
