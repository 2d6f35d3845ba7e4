//! The vocabulary every layer shares: thin ids and snapshot kinds. It owns no behaviour and
//! imports nothing of the crate, so the store, the pool and the engine can all name these types
//! without importing each other (the store must not import the pool, nor the front ends the
//! store).

use serde::{Deserialize, Serialize};

/// A dm-thin device id: the kernel accepts 24 bits (thin-provisioning.rst, "create_thin"), so a
/// new id is made only through [`ThinId::new`], which checks that limit (as devicemapper-rs's
/// `ThinDevId` does). Stored, printed and logged as its number: the store's records hold the
/// same bytes as a plain `u32` (`serde(transparent)`), Display and Debug print the number.
#[derive(Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct ThinId(u32);

/// The largest thin id the kernel accepts.
pub const MAX_THIN_ID: ThinId = ThinId((1 << 24) - 1);

impl ThinId {
    /// The thin id `id`; None above [`MAX_THIN_ID`] (2^24 - 1), which the kernel refuses.
    pub const fn new(id: u32) -> Option<ThinId> {
        if id > MAX_THIN_ID.0 {
            None
        } else {
            Some(ThinId(id))
        }
    }

    /// Its number.
    pub const fn get(self) -> u32 {
        self.0
    }
}

impl std::fmt::Display for ThinId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

impl std::fmt::Debug for ThinId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

/// Tests write thin ids as numbers.
#[cfg(test)]
impl From<u32> for ThinId {
    fn from(id: u32) -> ThinId {
        ThinId::new(id).expect("a test's thin id within 24 bits")
    }
}

#[cfg(test)]
impl PartialEq<u32> for ThinId {
    fn eq(&self, other: &u32) -> bool {
        self.0 == *other
    }
}

impl std::str::FromStr for ThinId {
    type Err = String;

    /// A thin id as device names write it (decimal).
    fn from_str(s: &str) -> Result<ThinId, String> {
        let n: u32 = s.parse().map_err(|e| format!("thin id {s:?}: {e}"))?;
        ThinId::new(n)
            .ok_or_else(|| format!("thin id {n} is above dm-thin's limit of {MAX_THIN_ID}"))
    }
}

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

#[cfg(test)]
mod tests {
    use super::*;

    /// dm-thin's limit: 2^24 - 1 is the largest id, 2^24 is refused, by `new` and by parsing.
    #[test]
    fn thin_ids_are_checked_against_dm_thins_24_bits() {
        assert_eq!(ThinId::new((1 << 24) - 1), Some(MAX_THIN_ID));
        assert_eq!(ThinId::new(1 << 24), None);
        assert_eq!(ThinId::new(u32::MAX), None);
        assert_eq!("16777215".parse::<ThinId>(), Ok(MAX_THIN_ID));
        let err = "16777216".parse::<ThinId>().expect_err("above the limit");
        assert!(
            err.contains("16777216") && err.contains("16777215"),
            "{err}"
        );
    }

    /// Stored, printed and logged as the plain number it was when it was a `u32`: the store's
    /// JSON records and the messages keep their bytes.
    #[test]
    fn a_thin_id_serializes_and_prints_as_its_number() {
        let id = ThinId::new(4242).expect("id");
        assert_eq!(serde_json::to_string(&id).expect("json"), "4242");
        assert_eq!(serde_json::from_str::<ThinId>("4242").expect("json"), id);
        assert_eq!(format!("{id} {id:?}"), "4242 4242");
    }
}
